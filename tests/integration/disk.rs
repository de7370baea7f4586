//! A full filesystem under the queue: the writer holds what it can, counts
//! what it cannot, keeps the uplink draining, and recovers by itself when
//! space returns. Needs root to mount a small tmpfs (CI runs as root); on a
//! machine where it cannot, the test says so and passes vacuously.

use std::collections::BTreeSet;
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

/// The fallback below the watermark: a filesystem actually full. Best
/// effort (a reserve file, deletes committed first, WAL truncation); it
/// recovers when run alone but not reliably under a loaded parallel suite
/// yet, so it is run by hand: `cargo test --test integration -- --ignored full_disk`.
#[ignore = "not yet reliable under a loaded parallel suite; see the doc comment"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_survived_counted_and_recovered_from_without_losing_committed_events() {
    let Some((_fs, db, world)) =
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

    // About 35 MB of events for a 16 MiB filesystem.
    const N: usize = 100_000;
    for seq in 0..N {
        sensor
            .publish("sensors/full/d/temperature", reading("d", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    let m = gw.running.metrics.clone();
    wait_until("every event ingested", || {
        m.received.load(Relaxed) == N as u64
    })
    .await;
    wait_until("the disk filled and drops were counted", || {
        m.dropped_queue_unavailable.load(Relaxed) > 0
    })
    .await;
    let stored_when_full = gw.queued("cloud");
    assert!(
        stored_when_full > 0,
        "some events were committed before the disk filled"
    );

    // The uplink returns: committed events drain, their deletes free space,
    // and what the writer held in memory is committed and sent too.
    proxy.set_up(true);
    let messages = sub.messages.clone();
    let db2 = db.clone();
    let m2 = m.clone();
    let start = std::time::Instant::now();
    loop {
        let distinct = {
            let got = messages.lock().unwrap();
            got.iter()
                .map(|m| seq_of(&m.payload))
                .collect::<BTreeSet<u64>>()
                .len() as u64
        };
        let dropped = m2.dropped_queue_unavailable.load(Relaxed);
        if distinct + dropped == N as u64 {
            break;
        }
        if start.elapsed() > DEADLINE {
            panic!(
                "delivered {distinct} + dropped {dropped} != {N}; queued {}; {}",
                queued_in(&db2, "cloud"),
                m2.summary()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let start = std::time::Instant::now();
    while gw.queued("cloud") != 0 {
        if start.elapsed() > DEADLINE {
            panic!(
                "queue not empty: {} rows; {}",
                gw.queued("cloud"),
                m.summary()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let got = sub.take();
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, each once");
    assert!(got.len() as u64 >= stored_when_full);
    assert_eq!(
        m.broker_lost.load(Relaxed) + m.dropped_overflow.load(Relaxed),
        0
    );
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
    // About 25 MB of events; the queue may use about 10 MiB of the 24.
    const N: usize = 75_000;
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
    // Every event is queued, evicted, or (in this burst) dropped at ingest;
    // all counted.
    let accounted = || queued_in(&db2, "cloud") + evicted() + m.dropped_overflow.load(Relaxed);
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
    // Kept are the newest that reached the queue (a burst may also drop
    // some at ingest, counted).
    let overflow = m.dropped_overflow.load(Relaxed);
    assert!(
        seqs[0] >= N as u64 - kept - overflow,
        "the oldest were evicted, not the newest: first kept {}, kept {kept}, overflow {overflow}",
        seqs[0]
    );
    gw.stop().await;
}
