//! Local broker security with real clients (mosquitto_pub): a password file
//! written by `edgeferry passwd` or `mosquitto_passwd`, anonymous clients,
//! wrong passwords and reserved client ids refused, changes picked up while
//! running; a TLS listener.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::pki::Ca;
use crate::util::*;

/// `edgeferry passwd <file> <user>` with `password` on stdin.
pub fn edgeferry_passwd(file: &Path, user: &str, password: &str) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .arg("passwd")
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    assert!(child.wait().unwrap().success());
}

/// `text` with `broker.password_file` set to `file`.
fn with_password_file(text: String, file: &Path) -> String {
    text.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!(
            "listen = \"127.0.0.1:0\"\npassword_file = \"{}\"",
            file.display()
        ),
        1,
    )
}

/// mosquitto_pub of one QoS 1 reading; whether the broker took it.
fn publish(port: u16, args: &[&str], device: &str) -> bool {
    Command::new("mosquitto_pub")
        .args(["-q", "1", "-p", &port.to_string()])
        .args(args)
        .args(["-t", &format!("sensors/yard/{device}/temperature")])
        .args(["-m", r#"{"value": 21.0, "unit": "C"}"#])
        .stderr(Stdio::null())
        .status()
        .expect("mosquitto_pub (apt install mosquitto-clients)")
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_password_file_only_known_users_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("passwd");
    edgeferry_passwd(&file, "sensor-1", "s3cret");
    assert!(!std::fs::read_to_string(&file).unwrap().contains("s3cret"));
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let text = with_password_file(config_text(d, upstream.port(), ""), &file);
    let gw = Gateway::start_with(d, &text).await;
    let port = gw.addr.port();

    assert!(publish(port, &["-u", "sensor-1", "-P", "s3cret"], "ok1"));
    assert!(!publish(port, &["-u", "sensor-1", "-P", "wrong"], "bad1"));
    assert!(!publish(port, &[], "anon"));
    assert!(!publish(port, &["-u", "nobody", "-P", "s3cret"], "bad2"));
    // The embedded broker link's id prefix is reserved even with a good login.
    assert!(!publish(
        port,
        &["-u", "sensor-1", "-P", "s3cret", "-i", "edgeferry-link-x"],
        "bad3"
    ));
    // The front door checks every CONNECT, the anonymous one too.
    assert_eq!(gw.count(|m| &m.broker_auth_failures), 4);

    // Users added while it runs can log in at once: by edgeferry passwd,
    // and by mosquitto_passwd (the same file format).
    edgeferry_passwd(&file, "sensor-2", "other");
    assert!(publish(port, &["-u", "sensor-2", "-P", "other"], "ok2"));
    let status = Command::new("mosquitto_passwd")
        .args(["-b"])
        .arg(&file)
        .args(["sensor-3", "third"])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(publish(port, &["-u", "sensor-3", "-P", "third"], "ok3"));

    let got = sub.wait_for(3).await;
    let mut topics: Vec<String> = got.iter().map(|m| m.topic.clone()).collect();
    topics.sort();
    assert_eq!(
        topics,
        [
            "plant/yard/ok1/temp",
            "plant/yard/ok2/temp",
            "plant/yard/ok3/temp"
        ]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_serves_mqtt_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("gateway CA");
    let ca_file = ca.write(d, "ca");
    let server = ca.issue(d, "gateway", &["localhost"], false);
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let text = config_text(d, upstream.port(), "").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!(
            "listen = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            server.cert.display(),
            server.key.display()
        ),
        1,
    );
    let gw = Gateway::start_with(d, &text).await;
    let tls = gw.running.broker_addr_tls.expect("tls listener").port();
    let ca_arg = ca_file.display().to_string();
    assert!(publish(
        tls,
        &["-h", "localhost", "--cafile", &ca_arg],
        "overtls"
    ));
    // A client that does not trust the gateway's CA is refused.
    let other = Ca::new("other").write(d, "other");
    assert!(!publish(
        tls,
        &["-h", "localhost", "--cafile", &other.display().to_string()],
        "untrusting"
    ));
    let got = sub.wait_for(1).await;
    assert_eq!(got[0].topic, "plant/yard/overtls/temp");
    gw.stop().await;
}

/// MQTT 5 over TLS with client certificates (`tls_client_ca`): a
/// certificate signed by the CA is the login, its common name the user name
/// the ACL sees; no certificate, no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_log_in_over_tls_and_their_name_is_the_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("gateway CA");
    let ca_file = ca.write(d, "ca");
    let server = ca.issue(d, "gateway", &["localhost"], false);
    let alice = ca.issue(d, "alice", &["alice"], false);
    let acl = d.join("acl");
    std::fs::write(&acl, "user alice\ntopic write sensors/alice/#\n").unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let text = config_text(d, upstream.port(), "").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!(
            "listen = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\nacl_file = \"{}\"",
            server.cert.display(),
            server.key.display(),
            ca_file.display(),
            acl.display()
        ),
        1,
    );
    let gw = Gateway::start_with(d, &text).await;
    let tls = gw.running.broker_addr_tls.expect("tls listener").port();
    let (ca_arg, cert, key) = (
        ca_file.display().to_string(),
        alice.cert.display().to_string(),
        alice.key.display().to_string(),
    );
    let with_cert = [
        "-V",
        "mqttv5",
        "-h",
        "localhost",
        "--cafile",
        &ca_arg,
        "--cert",
        &cert,
        "--key",
        &key,
    ];
    let pub_on = |topic: &str| {
        Command::new("mosquitto_pub")
            .args(["-q", "1", "-p", &tls.to_string()])
            .args(with_cert)
            .args(["-t", topic, "-m", r#"{"value": 21.0, "unit": "C"}"#])
            .status()
            .expect("mosquitto_pub")
    };
    assert!(pub_on("sensors/alice/a1/temperature").success());
    // Not hers: refused by the ACL (MQTT 5 says so; mosquitto_pub still exits 0).
    let _ = pub_on("sensors/bob/b1/temperature");
    // Without a certificate the handshake fails.
    assert!(!publish(
        tls,
        &["-h", "localhost", "--cafile", &ca_arg],
        "nocert"
    ));
    let got = sub.wait_for(1).await;
    assert_eq!(got[0].topic, "plant/alice/a1/temp");
    wait_until("bob's topic refused", || {
        gw.count(|m| &m.door_denied_publish) == 1
    })
    .await;
    assert_eq!(sub.take().len(), 1);
    gw.stop().await;
}

/// The files a config names are read once, when it is loaded (what `check`
/// reads is what the daemon runs with): the start does not read them again,
/// so files gone between the load and the start do not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_a_config_names_are_read_once_when_it_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let users = d.join("passwd");
    edgeferry_passwd(&users, "sensor-1", "s3cret");
    let acl = d.join("acl");
    std::fs::write(&acl, "user sensor-1\ntopic write sensors/#\n").unwrap();
    let upstream_password = d.join("upstream-password");
    std::fs::write(&upstream_password, "cloud-secret\n").unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let text = config_text(
        d,
        upstream.port(),
        &format!(
            "username = \"gw\"\npassword_file = \"{}\"",
            upstream_password.display()
        ),
    )
    .replacen(
        "listen = \"127.0.0.1:0\"",
        &format!(
            "listen = \"127.0.0.1:0\"\npassword_file = \"{}\"\nacl_file = \"{}\"",
            users.display(),
            acl.display()
        ),
        1,
    );
    let config = load_config(d, &text);
    for f in [&users, &acl, &upstream_password] {
        std::fs::remove_file(f).unwrap();
    }
    let running = edgeferry::start(config)
        .await
        .expect("starts on what was read at load");
    let port = running.broker_addr.port();
    assert!(publish(port, &["-u", "sensor-1", "-P", "s3cret"], "ok1"));
    assert!(!publish(port, &["-u", "sensor-1", "-P", "wrong"], "bad1"));
    let got = sub.wait_for(1).await;
    assert_eq!(got[0].topic, "plant/yard/ok1/temp");
    running.stop().await.unwrap();
}

/// A user added between the config's load and the start is picked up: the
/// file's identity is taken when it is read, not when the daemon starts
/// watching it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_changed_between_load_and_start_is_reread() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let users = d.join("passwd");
    edgeferry_passwd(&users, "sensor-1", "s3cret");
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let text = with_password_file(config_text(d, upstream.port(), ""), &users);
    let config = load_config(d, &text);
    edgeferry_passwd(&users, "sensor-2", "later");
    let running = edgeferry::start(config).await.unwrap();
    let port = running.broker_addr.port();
    assert!(publish(port, &["-u", "sensor-2", "-P", "later"], "late"));
    assert_eq!(sub.wait_for(1).await[0].topic, "plant/yard/late/temp");
    running.stop().await.unwrap();
}
