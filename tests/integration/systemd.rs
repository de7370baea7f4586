//! The binary under a (fake) service manager: a datagram socket the test
//! owns as NOTIFY_SOCKET, as systemd would pass it.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
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

#[test]
fn notifies_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock_path = d.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::fs::write(d.join("edgeferry.toml"), config_text(d, free_port(), "")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c", "edgeferry.toml"])
        .current_dir(d)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

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
