//! Store-and-forward figures, measured on the real `edgeferry` binary as a
//! child process with its default commit settings:
//!
//! 1. steady load: 5,000 events/s for 10 s with the uplink up: SQLite
//!    commits per second, and bytes the daemon wrote to storage per event
//!    (`write_bytes` of /proc/<pid>/io; the queue is on the disk holding
//!    `target/`, not tmpfs);
//! 2. a backlog of EVENTS (default 1,000,000) 200-byte events with the
//!    uplink down: the daemon's RSS before and while holding it;
//! 3. the drain of that backlog when the uplink returns: events/s, every
//!    event checked by sequence number; and what each of those events cost
//!    the disk, stored and then deleted (`write_bytes` over phases 2 and 3).
//!
//!   cargo bench --bench queue
//!   EVENTS=200000 cargo bench --bench queue
//!   SPILL_AFTER=0s cargo bench --bench queue    (written at the next commit
//!                                               unless acked first: the old
//!                                               durability = "always")

#[path = "../tests/integration/util.rs"]
mod util;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use util::*;

const PAYLOAD: usize = 200;
const PUBLISHERS: usize = 10;

fn payload(seq: u64) -> Vec<u8> {
    // The pad is in the example temperature contract's one free-text
    // field: a "pad" field is dead-lettered as not in the contract.
    let head = format!(r#"{{"seq":{seq},"value":21.5,"device":"d-"#);
    let mut s = head.clone();
    s.push_str(&"x".repeat(PAYLOAD - head.len() - 2));
    s.push_str("\"}");
    s.into_bytes()
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:")
}

fn written_bytes(pid: u32) -> u64 {
    proc_field(pid, "io", "write_bytes:")
}

/// Counters from the daemon's "status" summary line, logged every second.
/// The counter from the next summary line that lands in `log`, and when it
/// was seen (polled every 5 ms).
async fn next_counter(log: &Path, key: &str) -> (u64, Instant) {
    let lines = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(&format!(" {key}="))
            .count()
    };
    let seen = lines(log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines(log) == seen {
        assert!(Instant::now() < deadline, "no summary line in 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (last_counter(log, key), Instant::now())
}

fn last_counter(log: &Path, key: &str) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| {
            let at = l.find(&format!(" {key}="))? + key.len() + 2;
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Counts distinct sequence numbers received upstream.
struct Counter {
    distinct: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
}

impl Counter {
    async fn start(addr: std::net::SocketAddr, filter: &str, capacity: usize) -> Counter {
        let mut opts = MqttOptions::new("bench-counter", "127.0.0.1", addr.port());
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 100);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let seen = Arc::new(Mutex::new(vec![false; capacity]));
        let distinct = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let (s, d, t) = (seen, distinct.clone(), total.clone());
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _client = client;
            let mut ready_tx = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        t.fetch_add(1, Relaxed);
                        let seq = seq_of(&p.payload) as usize;
                        let mut seen = s.lock().unwrap();
                        if seq < seen.len() && !seen[seq] {
                            seen[seq] = true;
                            d.fetch_add(1, Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        ready.await.unwrap();
        Counter { distinct, total }
    }
}

/// Publish `seqs` from PUBLISHERS clients, at most `rate` events/s in all
/// (0: as fast as PUBACKs return).
async fn publish(addr: std::net::SocketAddr, seqs: std::ops::Range<u64>, rate: u64) {
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS as u64 {
        let seqs = seqs.clone();
        tasks.push(tokio::spawn(async move {
            let sensor = Sensor::connect(addr).await;
            let start = Instant::now();
            let mut sent = 0usize;
            for seq in seqs.filter(|s| s % PUBLISHERS as u64 == p) {
                sensor
                    .publish(&format!("sensors/bench/d{p}/temperature"), payload(seq))
                    .await;
                sent += 1;
                if rate > 0 {
                    let due = start
                        + Duration::from_secs_f64(sent as f64 * PUBLISHERS as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            sensor.wait_acked(sent).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: u64 = std::env::var("EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    // On the disk that holds target/, so write_bytes sees the writes.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = tempfile::tempdir_in(&base).unwrap();
    let upstream = upstream_broker();
    let proxy = Proxy::start(upstream, true).await;
    let port = free_port();
    // Default queue settings (one durability model), or SPILL_AFTER="0s"
    // for what durability = "always" was: every event written at the next
    // commit unless acknowledged first.
    let spill = std::env::var("SPILL_AFTER").ok();
    let queue_keys = spill
        .as_deref()
        .map_or(String::new(), |s| format!("spill_after = \"{s}\""));
    let text = listen_on(&config_text(dir.path(), proxy.port, ""), port)
        // Default commit settings, not the tests' fast ones.
        .replace("commit_interval = \"10ms\"", &queue_keys)
        + "\n[log]\nsummary_interval = \"1s\"\n";
    let config = dir.path().join("edgeferry.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("daemon.log");
    let child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _daemon = Daemon(child);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = ([127, 0, 0, 1], port).into();
    println!(
        "edgeferry queue bench: spill_after = {}, default commit settings, {PAYLOAD}-byte events, {PUBLISHERS} publishers",
        spill.as_deref().unwrap_or("default (commit_interval)")
    );

    // 1. Steady load with the uplink up.
    const STEADY_RATE: u64 = 5_000;
    const STEADY_SECS: u64 = 10;
    let steady = STEADY_RATE * STEADY_SECS;
    let counter = Counter::start(upstream, "plant/#", (events + steady) as usize).await;
    let rss_idle = rss_kib(pid);
    tokio::time::sleep(Duration::from_millis(1500)).await; // let the first summary line land
    // Commits per second between two summary lines, each read as it lands
    // (one a second), around the publishing: exact counts over an exact
    // window (dividing a longer window's count by the publishing time
    // alone overstated the rate; dividing by the whole window, acks' tail
    // included, understated it).
    let (commits_before, window) = next_counter(&log, "queue_commits").await;
    let written_before = written_bytes(pid);
    let start = Instant::now();
    publish(addr, events..events + steady, STEADY_RATE).await;
    let d = counter.distinct.clone();
    wait_until("steady events upstream", || d.load(Relaxed) >= steady).await;
    let secs = start.elapsed().as_secs_f64();
    let (commits_after, window_end) = next_counter(&log, "queue_commits").await;
    let commits = commits_after - commits_before;
    let window = (window_end - window).as_secs_f64();
    // The deletes of the last acknowledged events, for the bytes written.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_steady = rss_kib(pid);
    let written = written_bytes(pid) - written_before;
    println!(
        "steady {STEADY_RATE} ev/s for {secs:.1}s: {:.1} commits/s, {:.0} bytes written per event ({:.1}x the {PAYLOAD}-byte payload); RSS {} MiB at start, {} MiB after",
        commits as f64 / window,
        written as f64 / steady as f64,
        written as f64 / steady as f64 / PAYLOAD as f64,
        rss_idle / 1024,
        rss_steady / 1024
    );

    // 2. A backlog with the uplink down, published at BACKLOG_RATE.
    let backlog_rate: u64 = std::env::var("BACKLOG_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    proxy.set_up(false);
    let written_before = written_bytes(pid);
    let start = Instant::now();
    publish(addr, 0..events, backlog_rate).await;
    let db = dir.path().join("queue.db");
    let publish_secs = start.elapsed().as_secs_f64();
    // Every event is either committed or counted as dropped (the summary
    // line is a second behind).
    let dropped = || last_counter(&log, "events_dropped_queue_unavailable");
    wait_until("backlog committed or counted", || {
        queued_in(&db, "cloud") + dropped() >= events
    })
    .await;
    let stored_secs = start.elapsed().as_secs_f64();
    let queued = queued_in(&db, "cloud");
    let dropped = dropped();
    println!(
        "backlog: {events} events offered at {backlog_rate} ev/s ({:.0} ev/s achieved): {queued} committed, {dropped} dropped (counted)",
        events as f64 / publish_secs
    );
    let rss_backlog = rss_kib(pid);
    let written_stored = written_bytes(pid);
    let db_size: u64 = ["queue.db", "queue.db-wal"]
        .iter()
        .map(|f| {
            std::fs::metadata(dir.path().join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    println!(
        "backlog: committed after {stored_secs:.1}s; \
         queue file {:.0} MiB ({:.0} bytes/event); RSS {} MiB before the burst, {} MiB holding the backlog",
        db_size as f64 / (1 << 20) as f64,
        db_size as f64 / queued.max(1) as f64,
        rss_steady / 1024,
        rss_backlog / 1024
    );

    // 3. Drain.
    let start = Instant::now();
    proxy.set_up(true);
    let d = counter.distinct.clone();
    wait_until("backlog drained upstream", || {
        d.load(Relaxed) >= queued + steady
    })
    .await;
    let drain = start.elapsed().as_secs_f64();
    let all = counter.distinct.load(Relaxed) == queued + steady;
    println!(
        "drain: {queued} events in {drain:.1}s ({:.0} ev/s, including reconnect backoff); every committed event arrived: {all}; duplicates: {}; RSS after {} MiB",
        queued as f64 / drain,
        counter.total.load(Relaxed) - counter.distinct.load(Relaxed),
        rss_kib(pid) / 1024
    );
    // What a queued-then-acknowledged event cost the disk: written, then
    // deleted (the deletes are committed once the acks come in).
    wait_until("the drained rows deleted", || queued_in(&db, "cloud") == 0).await;
    let per_event = |bytes: u64| bytes as f64 / queued.max(1) as f64;
    let (stored, total) = (
        written_stored - written_before,
        written_bytes(pid) - written_before,
    );
    println!(
        "disk: a queued-then-acknowledged event cost {:.0} bytes written ({:.1}x the {PAYLOAD}-byte payload): {:.0} to store it, {:.0} to delete it",
        per_event(total),
        per_event(total) / PAYLOAD as f64,
        per_event(stored),
        per_event(total - stored)
    );
}
