use std::sync::atomic::Ordering::Relaxed;

use super::*;

fn row(up: &str, n: u8, priority: Priority) -> NewRow {
    NewRow {
        upstream: Arc::from(up),
        event_id: format!("e{n}"),
        topic: format!("t/{n:03}"), // 5 bytes
        qos: 1,
        priority,
        expires_ms: None,
        overflow: Overflow::DropOldest,
        received_ms: 0,
        payload: Bytes::from(vec![n; 5]), // + 5 = 10 bytes per row
        properties: None,
        receipt: None,
        traced: false,
    }
}

fn settings(max_size: u64) -> QueueSettings {
    QueueSettings {
        commit_interval: Duration::from_millis(5),
        commit_max_events: 100,
        max_size: BTreeMap::from([("a".into(), max_size), ("b".into(), max_size)]),
        min_free_disk: 0,
        sweep_interval: Duration::from_millis(20),
        memory_max: 1 << 20,
        // What durability "always" was: written at the next commit.
        spill_after: Duration::ZERO,
        // Three 10-byte rows per segment: every test starts, fills and
        // drops segments.
        segment_bytes: 30,
    }
}

/// RAM first: long enough that nothing spills by age unless a test waits.
fn offline(memory_max: u64, spill_after: Duration) -> QueueSettings {
    QueueSettings {
        memory_max,
        spill_after,
        ..settings(u64::MAX)
    }
}

/// Uplink "a" says it is connected (else its rows spill at once).
async fn online(q: &QueueHandle) {
    q.online("a", true).await.unwrap();
}

/// Rows of `upstream` in the file, read as an operator would.
fn in_file(path: &std::path::Path, upstream: &str) -> u64 {
    depth_of_file(path)
        .unwrap()
        .get(upstream)
        .copied()
        .unwrap_or(0)
}

async fn settle(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(&["a".to_string(), "b".to_string()]))
}

/// Append and commit.
async fn append(q: &QueueHandle, rows: Vec<NewRow>) {
    q.append(rows).await.unwrap();
    q.sync().await.unwrap();
}

fn payloads(rows: &[Row]) -> Vec<u8> {
    rows.iter().map(|r| r.payload[0]).collect()
}

#[tokio::test]
async fn rows_are_read_in_order_deleted_on_ack_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let (q, thread) = open(&path, settings(u64::MAX), metrics()).unwrap();
    let mut rows: Vec<NewRow> = (0..5).map(|n| row("a", n, Priority::Normal)).collect();
    rows.push(row("b", 9, Priority::Normal));
    append(&q, rows).await;
    let rows = q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap();
    assert_eq!(payloads(&rows), [0, 1, 2, 3, 4]);
    q.ack(vec![rows[0].id, rows[1].id]).await.unwrap();
    // Acked rows are hidden at once, before their delete is committed.
    assert_eq!(
        q.fetch("a", Cursor::default(), i64::MAX, 10)
            .await
            .unwrap()
            .len(),
        3
    );
    let mut after = Cursor::default();
    after.advance(&rows[3]);
    assert_eq!(
        payloads(&q.fetch("a", after, i64::MAX, 10).await.unwrap()),
        [4]
    );
    drop(q);
    thread.join().unwrap();

    assert_eq!(
        depth_of_file(&path).unwrap(),
        BTreeMap::from([("a".into(), 3), ("b".into(), 1)])
    );
    let (q, _t) = open(&path, settings(u64::MAX), metrics()).unwrap();
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap()),
        [2, 3, 4]
    );
}

#[tokio::test]
async fn higher_priorities_are_read_first_and_fifo_within_each() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _t) = open(&dir.path().join("q.db"), settings(u64::MAX), metrics()).unwrap();
    use Priority::*;
    let order = [
        (0, Low),
        (1, Normal),
        (2, High),
        (3, Low),
        (4, High),
        (5, Normal),
    ];
    append(&q, order.iter().map(|(n, p)| row("a", *n, *p)).collect()).await;
    let rows = q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap();
    assert_eq!(payloads(&rows), [2, 4, 1, 5, 0, 3]);
    // A limit takes the highest first; the cursor continues from there.
    let first = q.fetch("a", Cursor::default(), i64::MAX, 3).await.unwrap();
    assert_eq!(payloads(&first), [2, 4, 1]);
    let mut after = Cursor::default();
    for r in &first {
        after.advance(r);
    }
    assert_eq!(
        payloads(&q.fetch("a", after, i64::MAX, 10).await.unwrap()),
        [5, 0, 3]
    );
}

#[tokio::test]
async fn a_full_queue_with_drop_newest_keeps_what_it_has_and_counts_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    // Room for exactly 5 rows of 10 bytes.
    let (q, _t) = open(&dir.path().join("q.db"), settings(50), m.clone()).unwrap();
    let rows: Vec<NewRow> = (0..8)
        .map(|n| NewRow {
            overflow: Overflow::DropNewest,
            ..row("a", n, Priority::Normal)
        })
        .collect();
    append(&q, rows).await;
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap()),
        [0, 1, 2, 3, 4]
    );
    let u = &m.uplinks["a"];
    assert_eq!(u.rejected[Priority::Normal.index()].load(Relaxed), 3);
    assert_eq!(u.evicted.iter().map(|c| c.load(Relaxed)).sum::<u64>(), 0);
    // Another upstream has its own cap.
    append(&q, vec![row("b", 1, Priority::Normal)]).await;
    assert_eq!(
        q.fetch("b", Cursor::default(), i64::MAX, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_full_queue_with_drop_oldest_evicts_the_lowest_priority_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let (q, _t) = open(&dir.path().join("q.db"), settings(50), m.clone()).unwrap();
    use Priority::*;
    // Full: low 0, high 1, low 2, normal 3, high 4.
    let first = [(0, Low), (1, High), (2, Low), (3, Normal), (4, High)];
    append(&q, first.iter().map(|(n, p)| row("a", *n, *p)).collect()).await;
    // Normal 5 evicts low 0; normal 6 evicts low 2; normal 7 evicts normal 3;
    // low 8 finds nothing of its priority or lower left: it is dropped.
    append(&q, [5, 6, 7].map(|n| row("a", n, Normal)).to_vec()).await;
    append(&q, vec![row("a", 8, Low)]).await;
    let rows = q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap();
    assert_eq!(payloads(&rows), [1, 4, 5, 6, 7]);
    let u = &m.uplinks["a"];
    assert_eq!(u.evicted[Low.index()].load(Relaxed), 2);
    assert_eq!(u.evicted[Normal.index()].load(Relaxed), 1);
    assert_eq!(u.evicted[High.index()].load(Relaxed), 0);
    assert_eq!(u.rejected[Low.index()].load(Relaxed), 1);
    // A high event evicts the oldest normal rather than a high one.
    append(&q, vec![row("a", 9, High)]).await;
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap()),
        [1, 4, 9, 6, 7]
    );
}

#[tokio::test]
async fn acked_rows_free_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let (q, _t) = open(&dir.path().join("q.db"), settings(30), m.clone()).unwrap();
    let rows: Vec<NewRow> = (0..3)
        .map(|n| NewRow {
            overflow: Overflow::DropNewest,
            ..row("a", n, Priority::Normal)
        })
        .collect();
    append(&q, rows).await;
    let sent = q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap();
    q.ack(sent.iter().map(|r| r.id).collect()).await.unwrap();
    let more: Vec<NewRow> = (3..6)
        .map(|n| NewRow {
            overflow: Overflow::DropNewest,
            ..row("a", n, Priority::Normal)
        })
        .collect();
    // Bytes are released when the deletes commit.
    q.sync().await.unwrap();
    append(&q, more).await;
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap()),
        [3, 4, 5]
    );
    assert_eq!(
        m.uplinks["a"]
            .rejected
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>(),
        0
    );
}

#[tokio::test]
async fn expired_rows_are_never_fetched_and_the_sweep_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let (q, _t) = open(&dir.path().join("q.db"), settings(u64::MAX), m.clone()).unwrap();
    let now = crate::event::now_ms();
    let mut stale = row("a", 0, Priority::High);
    stale.expires_ms = Some(now.saturating_sub(1));
    let mut fresh = row("a", 1, Priority::High);
    fresh.expires_ms = Some(now + 3_600_000);
    append(&q, vec![stale, fresh, row("a", 2, Priority::Low)]).await;
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap()),
        [1, 2]
    );
    let u = m.uplinks["a"].clone();
    let start = std::time::Instant::now();
    while u.expired[Priority::High.index()].load(Relaxed) == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "sweep never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(u.expired[Priority::High.index()].load(Relaxed), 1);
    assert_eq!(q.depth().await.unwrap()["a"], 2);
}

fn evicted(m: &Metrics) -> [u64; 3] {
    let u = &m.uplinks["a"];
    [0, 1, 2].map(|i| u.evicted[i].load(Relaxed))
}

#[tokio::test]
async fn an_event_that_cannot_be_made_room_for_evicts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let (q, _t) = open(&dir.path().join("q.db"), settings(100), m.clone()).unwrap();
    use Priority::*;
    let mut rows = vec![row("a", 0, Low)];
    rows.extend((1..10).map(|n| row("a", n, High)));
    append(&q, rows).await;
    // Larger than the whole cap.
    let mut huge = row("a", 20, Normal);
    huge.payload = Bytes::from(vec![20; 150]);
    // Needs 20 bytes, but only the one low row (10) may go for a low event.
    let mut low = row("a", 21, Low);
    low.payload = Bytes::from(vec![21; 15]);
    append(&q, vec![huge, low]).await;
    assert_eq!(evicted(&m), [0, 0, 0]);
    assert_eq!(m.uplinks["a"].rejected[Normal.index()].load(Relaxed), 1);
    assert_eq!(m.uplinks["a"].rejected[Low.index()].load(Relaxed), 1);
    assert_eq!(
        q.fetch("a", Cursor::default(), i64::MAX, 20)
            .await
            .unwrap()
            .len(),
        10
    );
}

#[tokio::test]
async fn eviction_headroom_stays_within_the_priority_that_made_room() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    // 256 rows of 10 bytes fill it; headroom is 2560 / 256 = 10 bytes.
    let (q, _t) = open(&dir.path().join("q.db"), settings(2560), m.clone()).unwrap();
    let mut rows = vec![row("a", 0, Priority::Low)];
    rows.extend((1..=255).map(|n| row("a", n as u8, Priority::Normal)));
    append(&q, rows).await;
    append(&q, vec![row("a", 0, Priority::Normal)]).await;
    // The low row was enough; no normal row goes for headroom.
    assert_eq!(evicted(&m), [1, 0, 0]);
    assert_eq!(
        q.fetch("a", Cursor::default(), i64::MAX, 300)
            .await
            .unwrap()
            .len(),
        256
    );
}

#[tokio::test]
async fn fetch_stops_at_until_and_last_id_marks_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _t) = open(&dir.path().join("q.db"), settings(u64::MAX), metrics()).unwrap();
    append(&q, (0..3).map(|n| row("a", n, Priority::Normal)).collect()).await;
    let boundary = q.last_id("a").await.unwrap();
    append(&q, (3..5).map(|n| row("a", n, Priority::Normal)).collect()).await;
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), boundary, 10).await.unwrap()),
        [0, 1, 2]
    );
    let live = Cursor([boundary; 3]);
    assert_eq!(
        payloads(&q.fetch("a", live, i64::MAX, 10).await.unwrap()),
        [3, 4]
    );
    assert_eq!(q.last_id("b").await.unwrap(), 0);
}

#[tokio::test]
async fn in_memory_stats_agree_with_the_file_through_appends_acks_evictions_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    // Room for 8 rows of 10 bytes: the ninth and tenth evict the oldest lows.
    let (q, thread) = open(&path, settings(80), metrics()).unwrap();
    let mut rows: Vec<NewRow> = (0..4).map(|n| row("a", n, Priority::Low)).collect();
    rows.extend((4..8).map(|n| row("a", n, Priority::High)));
    rows.extend((8..10).map(|n| row("a", n, Priority::Normal)));
    rows.push(row("b", 20, Priority::Normal));
    for (i, r) in rows.iter_mut().enumerate() {
        r.received_ms = 1_000 + i as u64;
    }
    append(&q, rows).await;
    let high = q.fetch("a", Cursor::default(), i64::MAX, 2).await.unwrap();
    q.ack(high.iter().map(|r| r.id).collect()).await.unwrap();
    q.sync().await.unwrap();
    let strip = |mut v: Vec<Stats>| {
        v.sort_by(|a, b| (&a.upstream, a.priority).cmp(&(&b.upstream, b.priority)));
        v
    };
    let from_file = strip(stats_of_file(&path).unwrap());
    assert_eq!(strip(q.stats().await.unwrap()), from_file);
    let a: u64 = from_file
        .iter()
        .filter(|s| s.upstream == "a")
        .map(|s| s.events)
        .sum();
    assert_eq!(a, 6, "10 in, 2 evicted, 2 acked");
    drop(q);
    thread.join().unwrap();
    let (q, thread) = open(&path, settings(80), metrics()).unwrap();
    assert_eq!(
        strip(q.stats().await.unwrap()),
        from_file,
        "counted again at start"
    );
    drop(q);
    thread.join().unwrap();
}

#[tokio::test]
async fn offline_rows_are_read_from_ram_and_an_ack_there_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let m = metrics();
    let (q, thread) = open(
        &path,
        offline(1 << 20, Duration::from_secs(3600)),
        m.clone(),
    )
    .unwrap();
    online(&q).await;
    q.append((0..3).map(|n| row("a", n, Priority::Normal)).collect())
        .await
        .unwrap();
    q.append(vec![row("a", 7, Priority::High)]).await.unwrap();
    // Readable at once, without a commit, in send order.
    let rows = q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap();
    assert_eq!(payloads(&rows), [7, 0, 1, 2]);
    assert_eq!(q.last_id("a").await.unwrap(), rows[0].id, "the newest");
    assert_eq!(q.depth().await.unwrap()["a"], 4);
    q.ack(rows.iter().map(|r| r.id).collect()).await.unwrap();
    assert_eq!(q.depth().await.unwrap()["a"], 0);
    assert!(
        q.fetch("a", Cursor::default(), i64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    drop(q);
    thread.join().unwrap();
    assert_eq!(m.acked_in_memory.load(Relaxed), 4);
    assert_eq!(m.queued.load(Relaxed), 0, "nothing was written");
    assert_eq!(m.commits.load(Relaxed), 0);
    assert_eq!(in_file(&path, "a"), 0);
}

#[tokio::test]
async fn offline_rows_not_acked_in_time_are_written_and_stay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let m = metrics();
    let (q, _t) = open(
        &path,
        offline(1 << 20, Duration::from_millis(50)),
        m.clone(),
    )
    .unwrap();
    online(&q).await;
    q.append((0..3).map(|n| row("a", n, Priority::Normal)).collect())
        .await
        .unwrap();
    settle("rows written after spill_after", || {
        in_file(&path, "a") == 3
    })
    .await;
    // Younger rows wait in RAM; a read spans both, in id order.
    q.append((3..5).map(|n| row("a", n, Priority::Normal)).collect())
        .await
        .unwrap();
    let rows = q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap();
    assert_eq!(payloads(&rows), [0, 1, 2, 3, 4]);
    let mut after = Cursor::default();
    after.advance(&rows[1]);
    assert_eq!(
        payloads(&q.fetch("a", after, i64::MAX, 2).await.unwrap()),
        [2, 3]
    );
    // An ack of a written row deletes it from the file.
    q.ack(vec![rows[0].id]).await.unwrap();
    q.sync().await.unwrap();
    assert_eq!(in_file(&path, "a"), 4);
    assert_eq!(q.depth().await.unwrap()["a"], 4);
}

#[tokio::test]
async fn offline_rows_of_a_disconnected_upstream_are_written_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    // "b" is not connected; "a" is and keeps its rows in RAM.
    let (q, _t) = open(
        &path,
        offline(1 << 20, Duration::from_secs(3600)),
        metrics(),
    )
    .unwrap();
    online(&q).await;
    q.append(vec![
        row("a", 1, Priority::Normal),
        row("b", 2, Priority::Normal),
    ])
    .await
    .unwrap();
    settle("b's row written", || in_file(&path, "b") == 1).await;
    assert_eq!(in_file(&path, "a"), 0);
    assert_eq!(
        payloads(&q.fetch("b", Cursor::default(), i64::MAX, 10).await.unwrap()),
        [2]
    );
}

#[tokio::test]
async fn offline_ram_beyond_memory_max_spills_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    // 50 bytes of RAM: five 10-byte rows; the next five push out the oldest.
    let (q, _t) = open(&path, offline(50, Duration::from_secs(3600)), metrics()).unwrap();
    online(&q).await;
    q.append((0..10).map(|n| row("a", n, Priority::Normal)).collect())
        .await
        .unwrap();
    settle("oldest written", || in_file(&path, "a") == 5).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let written: Vec<u8> = conn
        .prepare("SELECT payload FROM queue ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|p| p.unwrap()[0])
        .collect();
    assert_eq!(written, [0, 1, 2, 3, 4]);
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), i64::MAX, 20).await.unwrap()),
        (0..10).collect::<Vec<u8>>()
    );
}

#[tokio::test]
async fn offline_rows_are_all_written_at_shutdown_and_read_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let (q, thread) = open(
        &path,
        offline(1 << 20, Duration::from_secs(3600)),
        metrics(),
    )
    .unwrap();
    online(&q).await;
    q.append((0..4).map(|n| row("a", n, Priority::Normal)).collect())
        .await
        .unwrap();
    let first = q.fetch("a", Cursor::default(), i64::MAX, 1).await.unwrap();
    q.ack(vec![first[0].id]).await.unwrap();
    assert_eq!(in_file(&path, "a"), 0);
    drop(q);
    thread.join().unwrap();
    assert_eq!(in_file(&path, "a"), 3);
    // Ids go on above the written ones after a restart.
    let (q, _t) = open(
        &path,
        offline(1 << 20, Duration::from_secs(3600)),
        metrics(),
    )
    .unwrap();
    online(&q).await;
    q.append(vec![row("a", 9, Priority::Normal)]).await.unwrap();
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap()),
        [1, 2, 3, 9]
    );
}

#[tokio::test]
async fn offline_expired_rows_in_ram_are_never_read_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let (q, _t) = open(
        &dir.path().join("q.db"),
        offline(1 << 20, Duration::from_secs(3600)),
        m.clone(),
    )
    .unwrap();
    online(&q).await;
    let mut r = row("a", 1, Priority::Normal);
    r.expires_ms = Some(1);
    q.append(vec![r, row("a", 2, Priority::Normal)])
        .await
        .unwrap();
    assert_eq!(
        payloads(&q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap()),
        [2]
    );
    settle("expired row swept", || {
        m.uplinks["a"].expired[Priority::Normal.index()].load(Relaxed) == 1
    })
    .await;
    assert_eq!(q.depth().await.unwrap()["a"], 1);
}

/// The answer to a waiting read, or a failure if it does not come.
async fn answered(w: Waiting) -> Vec<Row> {
    tokio::time::timeout(Duration::from_secs(60), w)
        .await
        .expect("a waiting read was never answered")
        .expect("the writer dropped a waiting read")
        .unwrap()
}

/// A waiting request: answered at once when rows are there, else held and
/// answered when rows of its upstream become readable (appended with
/// "offline", committed with "always"), never by another upstream's rows.
#[tokio::test]
async fn a_waiting_read_is_answered_when_rows_become_readable() {
    for (mode, s) in [
        ("always", settings(u64::MAX)),
        ("offline", offline(1 << 20, Duration::from_secs(3600))),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (q, _t) = open(&dir.path().join("q.db"), s, metrics()).unwrap();
        online(&q).await;
        append(&q, vec![row("a", 1, Priority::Normal)]).await;
        let rows = answered(q.wait("a", Cursor::default(), 10).await.unwrap()).await;
        assert_eq!(payloads(&rows), [1], "{mode}: there already");

        let mut after = Cursor::default();
        after.advance(&rows[0]);
        let mut later = q.wait("a", after, 2).await.unwrap();
        append(&q, vec![row("b", 9, Priority::Normal)]).await;
        q.depth().await.unwrap(); // the writer has handled both
        assert!(later.try_recv().is_err(), "{mode}: not for b's rows");
        q.append((2..5).map(|n| row("a", n, Priority::Normal)).collect())
            .await
            .unwrap();
        let rows = answered(later).await;
        assert_eq!(payloads(&rows), [2, 3], "{mode}: up to the limit, in order");

        // An uplink that went away (its receiver dropped) and came back:
        // the new request is answered.
        let mut after = Cursor::default();
        after.advance(&rows[1]);
        drop(q.wait("a", after, 10).await.unwrap());
        let rows = answered(q.wait("a", after, 10).await.unwrap()).await;
        assert_eq!(payloads(&rows), [4], "{mode}: row 4 was there");
        after.advance(&rows[0]);
        drop(q.wait("a", after, 10).await.unwrap());
        let again = q.wait("a", after, 10).await.unwrap();
        append(&q, vec![row("a", 5, Priority::Normal)]).await;
        assert_eq!(payloads(&answered(again).await), [5], "{mode}: a new row");
    }
}

/// Below the free-disk watermark a connected upstream's rows wait in RAM
/// however old they are; that many of them must not make the writer commit
/// in a loop with nothing to write (it then answered no command, not even
/// the shutdown).
#[tokio::test]
async fn below_the_watermark_many_old_rows_in_ram_do_not_wedge_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let settings = QueueSettings {
        // Always below the watermark.
        min_free_disk: u64::MAX,
        ..offline(1 << 20, Duration::ZERO)
    };
    let (q, thread) = open(&path, settings, metrics()).unwrap();
    online(&q).await;
    // More than commit_max_events (100), all due by age at once.
    q.append(
        (0..150)
            .map(|n| row("a", n as u8, Priority::Normal))
            .collect(),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let answered = tokio::time::timeout(Duration::from_secs(10), q.depth()).await;
        assert_eq!(answered.expect("the writer answers").unwrap()["a"], 150);
    }
    drop(q);
    thread.join().unwrap();
}

/// An event's UUID goes into the file as 16 bytes (schema version 2) and
/// comes back out of it as the same text.
#[tokio::test]
async fn a_written_rows_uuid_takes_16_bytes_and_reads_back_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let (q, _t) = open(&path, settings(u64::MAX), metrics()).unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    let mut r = row("a", 1, Priority::Normal);
    r.event_id = id.clone();
    q.append(vec![r]).await.unwrap();
    settle("written", || in_file(&path, "a") == 1).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (kind, len): (String, i64) = conn
        .query_row(
            "SELECT typeof(event_id), length(event_id) FROM queue",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((kind.as_str(), len), ("blob", 16));
    let rows = q.fetch("a", Cursor::default(), i64::MAX, 10).await.unwrap();
    assert_eq!(rows[0].event_id, id);
}

/// Segment tables in the file, and ids recorded as gone.
fn segments_and_gone(path: &std::path::Path) -> (usize, i64) {
    let conn = open_read_only(path).unwrap();
    let tables = segments::tables(&conn).unwrap().len();
    let gone = conn
        .query_row("SELECT COUNT(*) FROM gone", [], |r| r.get(0))
        .unwrap();
    (tables, gone)
}

/// Rows spread over many segments are read in send order across them,
/// survive a reopen, and a segment goes (with its gone ids) once every row
/// in it has gone, in whatever order the acks come; the last one stays for
/// the next rows.
#[tokio::test]
async fn segments_fill_and_are_dropped_once_every_row_in_them_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let (q, thread) = open(&path, settings(u64::MAX), metrics()).unwrap();
    // Three 10-byte rows per segment; two upstreams interleaved.
    for n in 0..30u8 {
        let up = if n % 5 == 4 { "b" } else { "a" };
        append(&q, vec![row(up, n, Priority::Normal)]).await;
    }
    let (tables, gone) = segments_and_gone(&path);
    assert!(tables >= 10, "{tables} segments");
    assert_eq!(gone, 0);
    let a = q
        .fetch("a", Cursor::default(), i64::MAX, 100)
        .await
        .unwrap();
    let want: Vec<u8> = (0..30).filter(|n| n % 5 != 4).collect();
    assert_eq!(payloads(&a), want);
    // Every other row of "a", newest first.
    let odd: Vec<i64> = a.iter().skip(1).step_by(2).rev().map(|r| r.id).collect();
    q.ack(odd).await.unwrap();
    q.sync().await.unwrap();
    drop(q);
    thread.join().unwrap();

    let (q, thread) = open(&path, settings(u64::MAX), metrics()).unwrap();
    let a = q
        .fetch("a", Cursor::default(), i64::MAX, 100)
        .await
        .unwrap();
    let even: Vec<u8> = want.iter().copied().step_by(2).collect();
    assert_eq!(
        payloads(&a),
        even,
        "after a reopen, what was not acked, in order"
    );
    let b = q
        .fetch("b", Cursor::default(), i64::MAX, 100)
        .await
        .unwrap();
    assert_eq!(payloads(&b), [4, 9, 14, 19, 24, 29]);
    q.ack(a.iter().map(|r| r.id).collect()).await.unwrap();
    q.sync().await.unwrap();
    let (tables, _) = segments_and_gone(&path);
    assert!(tables >= 5, "segments holding rows of b stay: {tables}");
    q.ack(b.iter().map(|r| r.id).collect()).await.unwrap();
    q.sync().await.unwrap();
    let (tables, gone) = segments_and_gone(&path);
    assert_eq!(tables, 1, "only the last segment stays");
    assert!(
        gone <= 3,
        "gone ids of dropped segments go with them: {gone}"
    );
    assert_eq!(in_file(&path, "a") + in_file(&path, "b"), 0);
    // New rows go on after the dropped ones, and read back.
    append(&q, vec![row("a", 99, Priority::Normal)]).await;
    let after = Cursor([i64::MAX, a.last().unwrap().id, i64::MAX]);
    assert_eq!(
        payloads(&q.fetch("a", after, i64::MAX, 10).await.unwrap()),
        [99]
    );
    drop(q);
    thread.join().unwrap();
}

/// An operator clearing a stuck queue by dropping its segment tables by
/// hand leaves `gone` behind: new rows must not take ids it still holds
/// (they would be hidden from every fetch, and never sent).
#[tokio::test]
async fn segments_removed_by_hand_leave_no_gone_id_to_hide_new_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let (q, thread) = open(&path, settings(u64::MAX), metrics()).unwrap();
    for n in 0..12u8 {
        append(&q, vec![row("a", n, Priority::Normal)]).await;
    }
    let rows = q
        .fetch("a", Cursor::default(), i64::MAX, 100)
        .await
        .unwrap();
    // Two of a segment's three: their ids stay in gone.
    q.ack(vec![rows[6].id, rows[7].id]).await.unwrap();
    q.sync().await.unwrap();
    drop(q);
    thread.join().unwrap();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let gone: i64 = conn
            .query_row("SELECT COUNT(*) FROM gone", [], |r| r.get(0))
            .unwrap();
        assert!(gone > 0, "the test needs gone ids left");
        let tables = segments::tables(&conn).unwrap();
        // Every table but the first: its range now runs over theirs.
        for (_, name) in &tables[1..] {
            conn.execute_batch(&format!("DROP TABLE {name};")).unwrap();
        }
        conn.execute_batch(&segments::view_sql([tables[0].1.as_str()]))
            .unwrap();
    }
    let (q, thread) = open(&path, settings(u64::MAX), metrics()).unwrap();
    // Enough new rows to reach the gone ids.
    for n in 70..80u8 {
        append(&q, vec![row("a", n, Priority::Normal)]).await;
    }
    drop(q);
    thread.join().unwrap();
    let (q, _thread) = open(&path, settings(u64::MAX), metrics()).unwrap();
    let got = q
        .fetch("a", Cursor::default(), i64::MAX, 100)
        .await
        .unwrap();
    let new: Vec<u8> = payloads(&got).into_iter().filter(|&p| p >= 70).collect();
    assert_eq!(
        new,
        (70..80).collect::<Vec<u8>>(),
        "every new row is read back"
    );
}
