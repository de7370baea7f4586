//! The binary under a (fake) service manager: a datagram socket the test
//! owns as NOTIFY_SOCKET, as systemd would pass it.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// Receive notifications until `done` says so; all of them, in order.
fn collect(sock: &UnixDatagram, mut done: impl FnMut(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) {
        assert!(start.elapsed() < DEADLINE, "notifications so far: {got:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            got.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    got
}

/// Run the binary on config `text` in `d` with a NOTIFY_SOCKET the test
/// owns and a 400 ms watchdog; returns the socket and the child.
fn start_notified(d: &std::path::Path, text: &str) -> (UnixDatagram, Child) {
    let sock_path = d.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    std::fs::write(d.join("edgeferry.toml"), text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c", "edgeferry.toml"])
        .current_dir(d)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (sock, child)
}

#[test]
fn notifies_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (sock, mut child) = start_notified(d, &config_text(d, free_port(), ""));

    let got = collect(&sock, |got| {
        got.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3
    });
    let ready = got.iter().position(|l| l == "READY=1").expect("READY=1");
    let first_ping = got.iter().position(|l| l == "WATCHDOG=1").unwrap();
    assert!(
        ready < first_ping,
        "READY before the first watchdog ping: {got:?}"
    );
    assert!(
        got.iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("cloud down, 0 queued")),
        "status shows the uplink and its backlog: {got:?}"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    collect(&sock, |got| got.iter().any(|l| l == "STOPPING=1"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < DEADLINE, "did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_watchdog_ping_while_the_queue_writer_is_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let metrics_port = free_port();
    let text = metrics_on(
        &listen_on(&config_text(d, free_port(), ""), port),
        metrics_port,
    );
    let (sock, mut child) = start_notified(d, &text);
    collect(&sock, |got| {
        got.iter().filter(|l| *l == "WATCHDOG=1").count() >= 2
    });
    let health = ([127, 0, 0, 1], metrics_port).into();
    assert_eq!(http_get(health, "/health").await.0, 200);

    // Stall the writer: another process holds SQLite's write lock, so the
    // writer's next commit blocks in its busy timeout.
    let lock = rusqlite::Connection::open(d.join("queue.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let sensor = Sensor::connect(([127, 0, 0, 1], port).into()).await;
    // Not acknowledged: with ack = "stored" the PUBACK waits for the commit.
    sensor
        .publish("sensors/a/b/temperature", reading("b", 0))
        .await;
    // The stall shows as pings stopping (one commit attempt blocks for the
    // 5 s busy timeout): wait until none came for 1.5 periods, then watch
    // a further window of several periods inside that 5 s.
    let start = Instant::now();
    let mut last_ping = Instant::now();
    let mut buf = [0u8; 4096];
    while last_ping.elapsed() < Duration::from_millis(600) {
        assert!(start.elapsed() < DEADLINE, "pings never stopped");
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "WATCHDOG=1")
        {
            last_ping = Instant::now();
        }
    }
    let quiet_until = Instant::now() + Duration::from_millis(1500);
    let mut during = Vec::new();
    while Instant::now() < quiet_until {
        if let Ok(n) = sock.recv(&mut buf) {
            during.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    assert!(
        !during.iter().any(|l| l == "WATCHDOG=1"),
        "pinged while stuck: {during:?}"
    );
    // /health says so too (its probe is the watchdog's).
    let (status, body) = http_get(health, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("stuck"), "{body}");

    // Unstuck: pings resume.
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    collect(&sock, |got| got.iter().any(|l| l == "WATCHDOG=1"));
    assert_eq!(http_get(health, "/health").await.0, 200);
    let _ = child.kill();
    let _ = child.wait();
}
