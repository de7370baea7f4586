//! A full filesystem under the queue: the writer holds what it can, counts
//! what it cannot, keeps the uplink draining, and recovers by itself when
//! space returns. Needs root to mount a small tmpfs (CI runs as root); on a
//! machine where it cannot, the test says so and passes vacuously.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;

use crate::util::*;

/// A small tmpfs mounted in its own temp dir for the test's lifetime
/// (unmounted before the dir is removed).
struct SmallFs {
    at: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("small");
        std::fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        ok.then_some(SmallFs { at, _dir: dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// A [`World`] whose queue is on a fresh tmpfs of `size`, with `queue_extra`
/// keys in `[queue]`; `None` (and a SKIPPED line) where mounting is impossible.
async fn world_on_small_fs(size: &str, queue_extra: &str) -> Option<(SmallFs, PathBuf, World)> {
    let Some(fs) = SmallFs::mount(size) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?); CI runs this test as root");
        return None;
    };
    let db = fs.at.join("queue.db");
    let world = World::offline_with("", |text| queue_at(&text, &db, queue_extra)).await;
    Some((fs, db, world))
}

/// Fill the rest of the filesystem holding `dir` with a file, as another
/// program might; returns its path.
fn fill(dir: &std::path::Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    // The last partial block.
    while f.write_all(&block[..512]).is_ok() {}
    let _ = f.sync_all();
    path
}

/// The fallback below the watermark (here turned off): the filesystem is
/// filled by someone else while events arrive. What was committed stays;
/// new events wait in memory and, since the front door acknowledges only
/// what is stored, the sensor is held (its window full) instead of events
/// being dropped. When the space returns the writer commits what it holds
/// by itself, and every event is delivered, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_committed_events_counts_drops_and_recovers_when_space_returns() {
    let Some((fs, db, world)) =
        world_on_small_fs("16m", "min_free_disk = 0\ncommit_max_events = 100").await
    else {
        return;
    };
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = world;
    let m = gw.running.metrics.clone();

    // Committed before the disk fills.
    const BEFORE: usize = 2_000;
    for seq in 0..BEFORE {
        sensor
            .publish("sensors/full/d/temperature", reading("d", seq))
            .await;
    }
    sensor.wait_acked(BEFORE).await;
    wait_until("first events committed", || {
        queued_in(&db, "cloud") == BEFORE as u64
    })
    .await;

    // Someone fills the disk; then more events than the 2 MiB reserve and
    // the in-memory allowance can take. The sensor is held meanwhile (no
    // PUBACK for what is not stored), so it publishes from a task.
    let filler = fill(&fs.at);
    const N: usize = 40_000;
    let sensor = std::sync::Arc::new(sensor);
    let publisher = {
        let sensor = sensor.clone();
        tokio::spawn(async move {
            for seq in BEFORE..N {
                sensor
                    .publish("sensors/full/d/temperature", reading("d", seq))
                    .await;
            }
        })
    };
    wait_until("commits failed", || m.commit_failures.load(Relaxed) > 0).await;
    // Nothing committed was lost, and what is not stored is not acknowledged.
    assert!(queued_in(&db, "cloud") >= BEFORE as u64);
    assert!(sensor.acked() < N);

    // The space returns; the writer commits what it holds, by itself, and
    // the sensor's resends are stored too.
    std::fs::remove_file(&filler).unwrap();
    publisher.await.unwrap();
    sensor.wait_acked(N).await;

    proxy.set_up(true);
    let got = sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    // All, in order, once.
    assert_sequence(&seqs, 0..N as u64);
    assert_eq!(
        m.dropped_queue_unavailable.load(Relaxed),
        0,
        "held, not dropped"
    );
    wait_until("queue drained", || gw.queued("cloud") == 0).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_disk_watermark_the_queue_stops_growing_and_keeps_the_newest() {
    let Some((_fs, db, world)) = world_on_small_fs("24m", "min_free_disk = \"12MiB\"").await else {
        return;
    };
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = world;
    // About 16 MB of queue file (about 135 bytes a row since schema 4; the
    // WAL's copy made 75,000 enough before); the queue may use about 10
    // MiB of the 24.
    const N: usize = 120_000;
    for seq in 0..N {
        sensor
            .publish("sensors/wm/d/temperature", reading("d", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    let m = gw.running.metrics.clone();
    let up = m.uplinks["cloud"].clone();
    let evicted = || up.evicted.iter().map(|c| c.load(Relaxed)).sum::<u64>();
    let db2 = db.clone();
    let start = std::time::Instant::now();
    // Every event is queued or evicted, counted (the front door holds a
    // burst instead of dropping it).
    let accounted = || queued_in(&db2, "cloud") + evicted();
    while !(m.received.load(Relaxed) == N as u64 && accounted() == N as u64) {
        if start.elapsed() > DEADLINE {
            panic!(
                "queued {} + evicted {} != {N}: {}",
                queued_in(&db2, "cloud"),
                evicted(),
                m.summary()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(evicted() > 0, "the watermark was reached");
    assert_eq!(
        m.dropped_queue_unavailable.load(Relaxed),
        0,
        "never ran out of space"
    );
    let kept = queued_in(&db, "cloud");

    proxy.set_up(true);
    let got = sub.wait_for(kept as usize).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    // The oldest made room: what remains is the newest, in order.
    assert_eq!(seqs.len() as u64, kept);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, each once");
    assert_eq!(seqs.last(), Some(&(N as u64 - 1)));
    // Kept are exactly the newest.
    assert_eq!(
        seqs[0],
        N as u64 - kept,
        "the oldest were evicted, not the newest"
    );
    gw.stop().await;
}

/// Hostile-run finding 5: a clean stop that could not store what it held
/// (the disk full) logged the loss and exited 0. Now the stop fails (the
/// binary exits 1) and the final counters include those events. With
/// `ack = "received"`, the only mode in which a sensor can have been told
/// so, and then of at most `max_inflight` events: with nothing becoming
/// safe, its next PUBACKs wait and the sensor is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_cannot_store_what_it_holds_fails_and_counts_them() {
    let Some(fs) = SmallFs::mount("16m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?); CI runs this test as root");
        return;
    };
    let db = fs.at.join("queue.db");
    const WINDOW: usize = 50;
    let World {
        sub: _sub,
        proxy: _proxy,
        gw,
        sensor,
    } = World::offline_with("", |text| {
        queue_at(&text, &db, "min_free_disk = 0\ncommit_max_events = 10").replacen(
            "[broker]\n",
            &format!("[broker]\nack = \"received\"\nmax_inflight = {WINDOW}\n"),
            1,
        )
    })
    .await;
    let m = gw.running.metrics.clone();
    let _filler = fill(&fs.at);
    const N: usize = 500;
    for seq in 0..N {
        sensor
            .publish("sensors/stop/d/temperature", reading("d", seq))
            .await;
    }
    sensor.wait_acked(WINDOW).await;
    wait_until("commits fail", || m.commit_failures.load(Relaxed) > 0).await;
    let Gateway { running, .. } = gw;
    let err = running
        .stop()
        .await
        .expect_err("a stop that lost events fails");
    let edgeferry::RunError::NotStored { lost } = err else {
        panic!("{err}");
    };
    // Told received and not stored: at most the window. What it lost it was
    // not told of (a window more), or was never read: its session sends
    // those again.
    let stored = queued_in(&db, "cloud");
    assert!(
        sensor.acked() as u64 <= stored + WINDOW as u64,
        "told received of {}, {stored} stored",
        sensor.acked()
    );
    assert!(lost > 0 && lost <= 2 * WINDOW as u64, "lost {lost}");
    // Every event read is stored or counted: the final counters include the lost.
    assert_eq!(
        queued_in(&db, "cloud") + m.dropped_queue_unavailable.load(Relaxed),
        m.received.load(Relaxed)
    );
}

/// Hostile-run finding 5: with the default watermark (64 MiB) on a smaller
/// filesystem every event was refused, even while the upstream was
/// connected, and `check` said ok. Now `check` warns, with the figures and
/// a value to use, and events go through memory while the upstream is
/// connected: forwarded, acknowledged from RAM, never written, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_watermark_events_still_go_through_memory_while_the_upstream_is_connected() {
    let Some((fs, db, world)) = world_on_small_fs("16m", "").await else {
        return;
    };
    // `check` on the same config says what is wrong, and still passes.
    let text = queue_at(&config_text(&fs.at, 1884, ""), &db, "");
    let config = fs.at.join("edgeferry.toml");
    std::fs::write(&config, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr
                .contains("queue.min_free_disk (64.0 MiB) is not below the size of the filesystem")
            && stderr.contains("min_free_disk = \""),
        "{stderr}"
    );

    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = world;
    let m = gw.running.metrics.clone();
    let up = m.uplinks["cloud"].clone();
    proxy.set_up(true);
    wait_until("uplink connected", || up.connected.load(Relaxed)).await;
    const N: usize = 3_000;
    for seq in 0..N {
        sensor
            .publish("sensors/low/d/temperature", reading("d", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    let got = sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_sequence(&seqs, 0..N as u64);
    let rejected: u64 = up.rejected.iter().map(|c| c.load(Relaxed)).sum();
    assert_eq!(rejected, 0, "none refused: {}", m.summary());
    assert_eq!(m.dropped_queue_unavailable.load(Relaxed), 0);
    wait_until("all acknowledged from memory", || {
        m.acked_in_memory.load(Relaxed) == N as u64
    })
    .await;
    assert_eq!(queued_in(&db, "cloud"), 0, "nothing was written");
    gw.stop().await;
}
