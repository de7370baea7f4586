//! The daemon as a real child process, killed for real: SIGKILL loses at
//! most what was not yet committed, never a committed event; SIGTERM loses
//! nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::util::*;

pub struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    /// Start the binary on `config` (which listens on `port`) and wait until
    /// its broker accepts connections.
    pub async fn start(dir: &Path, config: &Path, port: u16) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
            .args(["run", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon { child, port };
        let start = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!(
                    "daemon exited: {status}: {}",
                    std::fs::read_to_string(dir.join("daemon.log")).unwrap()
                );
            }
            assert!(start.elapsed() < DEADLINE, "daemon did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// A line of the process's `/proc/<pid>/status` in KiB (`VmHWM`: peak RSS).
    pub fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix(" kB")?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {status}"))
    }

    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "daemon did not exit after {sig}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temp dir with a config, an upstream broker behind a proxy (down at
/// first) and a subscriber on it.
struct World {
    dir: tempfile::TempDir,
    sub: Subscriber,
    proxy: Proxy,
    config: PathBuf,
    port: u16,
    db: PathBuf,
}

/// `[queue]` keys for RAM-first durability.
const OFFLINE: &str = "durability = \"offline\"";

impl World {
    /// With `queue` keys added to `[queue]` ("" for the defaults).
    async fn new(queue: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let upstream = upstream_broker();
        let sub = Subscriber::start(upstream, "plant/#").await;
        let proxy = Proxy::start(upstream, false).await;
        let (config, port) = write_config(dir.path(), proxy.port, queue);
        let db = dir.path().join("queue.db");
        World {
            dir,
            sub,
            proxy,
            config,
            port,
            db,
        }
    }
}

fn write_config(dir: &Path, upstream_port: u16, queue: &str) -> (PathBuf, u16) {
    let port = free_port();
    // The sensors here publish as fast as PUBACKs return; 4 MiB of broker
    // segments keep a loaded CI machine's ingest lag from skipping events
    // (these tests are about the queue, and reason from gap-free input).
    let text = config_text(dir, upstream_port, "").replace(
        "[broker]\n",
        "[broker]\nsegment_size = \"1MiB\"\nsegment_count = 4\n",
    );
    let text = listen_on(&text, port);
    let text = queue_at(&text, &dir.join("queue.db"), queue);
    let path = dir.join("edgeferry.toml");
    std::fs::write(&path, text).unwrap();
    (path, port)
}

/// Sequence numbers of the rows in the queue file, in queue order.
fn queued_seqs(db: &Path) -> Vec<u64> {
    // As `edgeferry queue export` reads it: a kill mid-commit leaves a hot
    // journal that a read-only connection cannot roll back.
    let conn = edgeferry::queue::open_read_only(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT payload FROM queue ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|p| seq_of(&p.unwrap()))
        .collect()
}

/// Publish readings `first`, `first + 1`, ... until stopped; returns the
/// count of publishes handed to the client.
fn steady_publisher(
    sensor: &Sensor,
    first: usize,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let client = sensor.client.clone();
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let task = tokio::spawn(async move {
        for seq in first.. {
            let payload = reading("k", seq);
            if client
                .publish(
                    "sensors/crash/k/temperature",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .is_err()
            {
                return;
            }
            s.fetch_add(1, Ordering::Relaxed);
            if seq % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    (task, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_the_upstream_down_keeps_every_committed_event() {
    sigkill_with_the_upstream_down("").await;
}

/// RAM first: with the upstream down, events are written at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sigkill_with_the_upstream_down_keeps_every_written_event() {
    sigkill_with_the_upstream_down(OFFLINE).await;
}

async fn sigkill_with_the_upstream_down(queue: &str) {
    let World {
        dir,
        sub,
        proxy,
        config,
        port,
        db,
    } = World::new(queue).await;
    let mut daemon = Daemon::start(dir.path(), &config, port).await;
    let sensor = Sensor::connect(daemon.addr()).await;
    let (publisher, _) = steady_publisher(&sensor, 0);
    wait_until("a backlog builds up", || queued_in(&db, "cloud") >= 2000).await;
    assert!(!daemon.signal("-KILL").success());
    publisher.abort();
    // The sensor would resend its unacknowledged publishes to the new daemon.
    drop(sensor);

    // What was committed is a prefix of the stream, in order.
    let committed = queued_seqs(&db);
    let k = committed.len() as u64;
    assert!(k >= 2000);
    assert_sequence(&committed, 0..k);

    let _daemon = Daemon::start(dir.path(), &config, port).await;
    proxy.set_up(true);
    let got = sub.wait_for(k as usize).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(
        seqs,
        (0..k).collect::<Vec<_>>(),
        "every committed event, in order, once"
    );
    wait_until("queue drained", || queued_in(&db, "cloud") == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_forwarding_loses_no_committed_event() {
    let World {
        dir,
        sub,
        proxy,
        config,
        port,
        db,
    } = World::new("").await;
    proxy.set_up(true);
    let mut daemon = Daemon::start(dir.path(), &config, port).await;
    let sensor = Sensor::connect(daemon.addr()).await;
    let (publisher, _) = steady_publisher(&sensor, 0);
    wait_until("forwarding under way", || sub.count() >= 3000).await;
    assert!(!daemon.signal("-KILL").success());
    publisher.abort();
    // The sensor would resend its unacknowledged publishes to the new daemon.
    drop(sensor);
    // Every event at or below the highest one committed (still queued, or
    // already forwarded) was committed, since commits are in order.
    let queued = queued_seqs(&db);
    let forwarded: BTreeSet<u64> = sub.take().iter().map(|m| seq_of(&m.payload)).collect();
    let last = queued
        .iter()
        .chain(forwarded.iter())
        .copied()
        .max()
        .unwrap();

    let _daemon = Daemon::start(dir.path(), &config, port).await;
    wait_until("queue drained", || queued_in(&db, "cloud") == 0).await;
    // Deleted means acknowledged by the upstream broker; its delivery to the
    // subscriber may still be on the way.
    wait_delivered(&sub, &(0..=last).collect()).await;
    assert_at_least_once(&sub, &queued.into_iter().collect(), 2);
}

/// Waits until every one of `must` has reached the subscriber.
async fn wait_delivered(sub: &Subscriber, must: &BTreeSet<u64>) {
    let messages = sub.messages.clone();
    wait_until("every committed event delivered", || {
        let got = messages.lock().unwrap();
        let seen: BTreeSet<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
        must.is_subset(&seen)
    })
    .await;
}

/// At least once: an event arrives twice only if its row was still in the
/// queue at a kill (in flight, or acknowledged but its delete not yet
/// committed); nothing already deleted is sent again, and nothing arrives
/// more than `max` times. Returns how many events arrived more than once.
fn assert_at_least_once(sub: &Subscriber, queued_at_kills: &BTreeSet<u64>, max: usize) -> usize {
    let mut counts = std::collections::BTreeMap::new();
    for m in sub.take() {
        *counts.entry(seq_of(&m.payload)).or_insert(0usize) += 1;
    }
    let dups: Vec<u64> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    assert!(
        dups.iter().all(|s| queued_at_kills.contains(s)),
        "duplicates of deleted rows: {dups:?}"
    );
    assert!(
        counts.values().all(|n| *n <= max),
        "an event arrived more than {max} times"
    );
    dups.len()
}

/// SIGKILL in a loop under load, the upstream alternately up (the kill
/// hits forwarding) and down (it hits a growing backlog). Each round
/// publishes its own range of sequence numbers. Every event at or below the
/// highest one committed in a round (queued in the file after the kill, or
/// already forwarded) arrives in the end; an event arrives twice only if its
/// row was still queued at a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_under_load_loses_no_committed_event() {
    let World {
        dir,
        sub,
        proxy,
        config,
        port,
        db,
    } = World::new("").await;
    const ROUNDS: usize = 10;
    const SPAN: u64 = 1_000_000;
    let round_of = |seq: u64| seq / SPAN;
    let mut must: BTreeSet<u64> = BTreeSet::new();
    let mut queued_at_kills: BTreeSet<u64> = BTreeSet::new();
    for round in 0..ROUNDS as u64 {
        proxy.set_up(round % 2 == 0);
        let mut daemon = Daemon::start(dir.path(), &config, port).await;
        let sensor = Sensor::connect(daemon.addr()).await;
        let before = queued_in(&db, "cloud");
        let (publisher, _) = steady_publisher(&sensor, (round * SPAN) as usize);
        let messages = sub.messages.clone();
        let db_path = db.clone();
        wait_until("this round under way", || {
            let forwarded = messages
                .lock()
                .unwrap()
                .iter()
                .filter(|m| round_of(seq_of(&m.payload)) == round)
                .count() as u64;
            forwarded + queued_in(&db_path, "cloud").saturating_sub(before) >= 1000
        })
        .await;
        assert!(!daemon.signal("-KILL").success());
        publisher.abort();
        drop(sensor);
        // Commits are in order: everything of this round up to its highest
        // committed event was committed.
        let queued = queued_seqs(&db);
        let last = queued
            .iter()
            .copied()
            .chain(sub.distinct_seqs())
            .filter(|s| round_of(*s) == round)
            .max()
            .expect("something of the round committed");
        must.extend(round * SPAN..=last);
        queued_at_kills.extend(queued);
    }

    proxy.set_up(true);
    let _daemon = Daemon::start(dir.path(), &config, port).await;
    wait_until("queue drained", || queued_in(&db, "cloud") == 0).await;
    wait_delivered(&sub, &must).await;
    let dups = assert_at_least_once(&sub, &queued_at_kills, ROUNDS + 1);
    eprintln!(
        "{ROUNDS} kills: {} events committed, all delivered; {dups} delivered twice or more",
        must.len(),
    );
}

/// The front door's promise, from the sensor's side: the real binary is
/// SIGKILLed repeatedly under a steady QoS 1 publish (upstream alternately
/// up and down), and every event whose PUBACK the sensor received arrives
/// upstream in the end. PUBACKs come in publish order, so `n` PUBACKs mean
/// the round's first `n` events were acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_loses_no_event_a_sensor_was_told_was_received() {
    let World {
        dir,
        sub,
        proxy,
        config,
        port,
        db,
    } = World::new("").await;
    const ROUNDS: u64 = 6;
    const SPAN: u64 = 1_000_000;
    let mut acknowledged: BTreeSet<u64> = BTreeSet::new();
    let mut queued_at_kills: BTreeSet<u64> = BTreeSet::new();
    for round in 0..ROUNDS {
        proxy.set_up(round % 2 == 0);
        let mut daemon = Daemon::start(dir.path(), &config, port).await;
        let sensor = Sensor::connect(daemon.addr()).await;
        let (publisher, _) = steady_publisher(&sensor, (round * SPAN) as usize);
        sensor.wait_acked(500).await;
        assert!(!daemon.signal("-KILL").success());
        // Read after the kill: no PUBACK can come any more.
        let n = sensor.acked() as u64;
        publisher.abort();
        drop(sensor);
        acknowledged.extend(round * SPAN..round * SPAN + n);
        queued_at_kills.extend(queued_seqs(&db));
    }
    proxy.set_up(true);
    let _daemon = Daemon::start(dir.path(), &config, port).await;
    wait_until("queue drained", || queued_in(&db, "cloud") == 0).await;
    wait_delivered(&sub, &acknowledged).await;
    let dups = assert_at_least_once(&sub, &queued_at_kills, ROUNDS as usize + 1);
    eprintln!(
        "{ROUNDS} kills: {} events acknowledged to the sensor, all delivered; {dups} delivered twice or more",
        acknowledged.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_with_the_upstream_down_loses_nothing() {
    sigterm_under_load_with_the_upstream_down("").await;
}

/// RAM first: with the upstream connected but not acknowledging (a stalled
/// link), events wait in RAM; a clean stop writes every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sigterm_with_a_stalled_upstream_writes_what_ram_held() {
    let World {
        dir,
        sub,
        proxy,
        config,
        port,
        db,
    } = World::new(&format!("{OFFLINE}\nspill_after = \"60s\"")).await;
    proxy.set_up(true);
    let mut daemon = Daemon::start(dir.path(), &config, port).await;
    let sensor = Sensor::connect(daemon.addr()).await;
    // Connected and forwarding.
    sensor
        .publish("sensors/crash/s/temperature", reading("s", 0))
        .await;
    sub.wait_for(1).await;
    proxy.set_stalled(true);
    const N: usize = 2000;
    for seq in 1..N {
        sensor
            .publish("sensors/crash/s/temperature", reading("s", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    assert!(daemon.signal("-TERM").success());
    assert_sequence(&queued_seqs(&db), 1..N as u64);

    proxy.set_stalled(false);
    let _daemon = Daemon::start(dir.path(), &config, port).await;
    let messages = sub.messages.clone();
    wait_until("every event upstream", || {
        let got = messages.lock().unwrap();
        let seen: BTreeSet<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
        seen.len() == N
    })
    .await;
}

async fn sigterm_under_load_with_the_upstream_down(queue: &str) {
    let World {
        dir,
        sub,
        proxy,
        config,
        port,
        db,
    } = World::new(queue).await;
    let mut daemon = Daemon::start(dir.path(), &config, port).await;
    let sensor = Sensor::connect(daemon.addr()).await;
    const N: usize = 3000;
    for seq in 0..N {
        sensor
            .publish("sensors/crash/t/temperature", reading("t", seq))
            .await;
    }
    // Stop as soon as the broker acknowledged the last one: whatever is
    // still in the pipeline must be drained into the queue.
    sensor.wait_acked(N).await;
    assert!(daemon.signal("-TERM").success());
    assert_sequence(&queued_seqs(&db), 0..N as u64);

    let _daemon = Daemon::start(dir.path(), &config, port).await;
    proxy.set_up(true);
    let got = sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_sequence(&seqs, 0..N as u64);
}

/// A clean stop while forwarding loses nothing in either mode: what the
/// broker acknowledged to the sensor arrives upstream, after a restart if
/// not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_forwarding_loses_nothing() {
    sigterm_while_forwarding("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sigterm_while_forwarding_loses_nothing() {
    sigterm_while_forwarding(OFFLINE).await;
}

async fn sigterm_while_forwarding(queue: &str) {
    let World {
        dir,
        sub,
        proxy,
        config,
        port,
        ..
    } = World::new(queue).await;
    proxy.set_up(true);
    let mut daemon = Daemon::start(dir.path(), &config, port).await;
    let sensor = Sensor::connect(daemon.addr()).await;
    const N: usize = 5000;
    for seq in 0..N {
        sensor
            .publish("sensors/crash/f/temperature", reading("f", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    assert!(daemon.signal("-TERM").success());
    let _daemon = Daemon::start(dir.path(), &config, port).await;
    let messages = sub.messages.clone();
    wait_until("every acknowledged event upstream", || {
        let got = messages.lock().unwrap();
        let seen: BTreeSet<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
        seen.len() == N
    })
    .await;
    let seen: BTreeSet<u64> = sub.take().iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seen, (0..N as u64).collect::<BTreeSet<_>>());
}
