//! A damaged queue database at start is moved aside; the gateway runs on
//! with a fresh queue.

use crate::util::*;

fn damaged_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("queue.db.damaged-"))
        .collect()
}

async fn assert_runs_on_fresh_queue(dir: &std::path::Path) {
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let gw = Gateway::start(dir, upstream.port()).await;
    assert_eq!(gw.count(|m| &m.queue_recovered), 1);
    let sensor = Sensor::connect(gw.addr).await;
    sensor
        .publish("sensors/x/y/temperature", reading("y", 1))
        .await;
    let got = sub.wait_for(1).await;
    assert_eq!(got[0].topic, "plant/x/y/temp");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_queue_file_is_moved_aside_and_a_fresh_queue_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let garbage =
        b"this is not an SQLite database, just what a bad SD card left behind\n".repeat(100);
    std::fs::write(dir.path().join("queue.db"), &garbage).unwrap();
    assert_runs_on_fresh_queue(dir.path()).await;
    let aside = damaged_files(dir.path());
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(dir.path().join(&aside[0])).unwrap(),
        garbage,
        "kept as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_queue_file_is_moved_aside_and_a_fresh_queue_is_used() {
    let dir = tempfile::tempdir().unwrap();
    // A real queue with a backlog, cut in half as by a failing card.
    let proxy = Proxy::start(upstream_broker(), false).await;
    let gw = Gateway::start(dir.path(), proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    for seq in 0..2000 {
        sensor
            .publish("sensors/x/z/temperature", reading("z", seq))
            .await;
    }
    wait_until("backlog stored", || gw.queued("cloud") == 2000).await;
    gw.stop().await;
    let db = dir.path().join("queue.db");
    {
        // Fold the WAL into the file so the cut hits the real pages.
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
            .unwrap();
    }
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_runs_on_fresh_queue(dir.path()).await;
    assert_eq!(damaged_files(dir.path()).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_queue_path_is_a_clear_start_error_not_a_move_aside() {
    // A path under a regular file: no permission trick, so it fails for root too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"keep me").unwrap();
    let text = queue_at(
        &config_text(dir.path(), free_port(), ""),
        &dir.path().join("file/queue.db"),
        "",
    );
    let err = match edgeferry::start(load_config(dir.path(), &text)).await {
        Ok(_) => panic!("started with an impossible queue path"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("file/queue.db: cannot create its directory"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.path().join("file")).unwrap(), b"keep me");
}

/// A queue on a filesystem that became read-only (an SD card the kernel
/// remounted after errors): a clear start error naming the file, and the
/// file is neither moved aside nor touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_on_a_read_only_filesystem_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("ro");
    std::fs::create_dir_all(&at).unwrap();
    let mount = |opts: &str| {
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !mount("size=8m") {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?); CI runs this test as root");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(at.clone());
    let db = at.join("queue.db");
    // (The free-disk watermark would refuse everything on 8 MiB.)
    let text = queue_at(
        &config_text(dir.path(), free_port(), ""),
        &db,
        "min_free_disk = 0",
    );
    // Some events queued (the upstream is unreachable), then a clean stop.
    let gw = Gateway::start_with(dir.path(), &text).await;
    let sensor = Sensor::connect(gw.addr).await;
    for seq in 0..10 {
        sensor
            .publish("sensors/ro/d/temperature", reading("d", seq))
            .await;
    }
    sensor.wait_acked(10).await;
    wait_until("queued", || queued_in(&db, "cloud") == 10).await;
    gw.stop().await;
    let before = std::fs::read(&db).unwrap();

    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&at)
        .status()
        .unwrap();
    assert!(remounted.success());
    let err = match edgeferry::start(load_config(dir.path(), &text)).await {
        Ok(_) => panic!("started on a read-only queue"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&db.display().to_string()) && err.contains("read-only"),
        "{err}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), before, "untouched");
    assert!(damaged_files(&at).is_empty(), "not moved aside");
    // Still readable for an operator (edgeferry queue stats works on it).
    assert_eq!(queued_in(&db, "cloud"), 10);
}

/// Hostile-run finding 10: a WAL cut short by another program while the
/// daemon ran made `queue stats` say "malformed" while the daemon logged
/// nothing and went on committing behind the hole. The queue has no WAL
/// since schema 4; the same holds for the database file itself, which
/// SQLite never shrinks: the next commit notices, the queue stops writing,
/// so what comes after is held and not acknowledged, the damage is counted
/// and the stop fails; a restart moves the damaged file aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_file_cut_short_while_running_stops_the_writes_and_is_reported() {
    damaged_while_running(|db| {
        let len = std::fs::metadata(db).unwrap().len();
        assert!(len > 4 * 4096, "the events are in the file ({len} bytes)");
        std::fs::OpenOptions::new()
            .write(true)
            .open(db)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    })
    .await;
}

/// A file moved over the queue while the daemon runs (a backup restored
/// in place): the daemon's connection would go on writing the unlinked
/// file, and everything it committed from then on would be gone at the
/// next start. Noticed by its inode, like a cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_file_replaced_while_running_stops_the_writes_and_is_reported() {
    damaged_while_running(|db| {
        let copy = db.with_extension("copy");
        std::fs::copy(db, &copy).unwrap();
        std::fs::rename(&copy, db).unwrap();
    })
    .await;
}

/// 300 events acknowledged, `damage` done to the queue file, then 10 more
/// that must not be acknowledged; the stop fails, and a restart runs.
async fn damaged_while_running(damage: impl FnOnce(&std::path::Path)) {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let World {
        sub: _sub,
        proxy: _proxy,
        gw,
        sensor,
    } = World::offline_with("", |text| queue_at(&text, &db, "")).await;
    for seq in 0..300 {
        sensor
            .publish("sensors/wal/d/temperature", reading("d", seq))
            .await;
    }
    sensor.wait_acked(300).await;
    damage(&gw.db);
    for seq in 300..310 {
        sensor
            .publish("sensors/wal/d/temperature", reading("d", seq))
            .await;
    }
    let m = gw.running.metrics.clone();
    wait_until("the damage is noticed", || {
        m.queue_damaged.load(Relaxed) > 0
    })
    .await;
    wait_until("commits fail", || m.commit_failures.load(Relaxed) > 0).await;
    assert_eq!(
        sensor.acked(),
        300,
        "nothing after the damage is acknowledged"
    );
    let err = gw
        .running
        .stop()
        .await
        .expect_err("a stop that could not store fails");
    assert!(
        matches!(err, edgeferry::RunError::NotStored { .. }),
        "{err}"
    );
    drop(sensor);
    // A restart runs on what is intact.
    let text = queue_at(&config_text(dir.path(), free_port(), ""), &db, "");
    let gw = Gateway::start_with(dir.path(), &text).await;
    assert!(gw.queued("cloud") <= 300);
    gw.stop().await;
}
