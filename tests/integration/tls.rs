//! Upstream TLS against a real Mosquitto with certificates made at test
//! time: the right CA works; a wrong CA, an expired certificate and a wrong
//! host name are refused with an error that says which; mutual TLS works
//! with a client certificate and is refused without one.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use crate::pki::Ca;
use crate::util::*;

/// Gateway config forwarding "cloud" to `mqtts://localhost:<port>` with
/// `cloud_keys` in its table, plus `more` (further tables) at the end.
fn tls_config(dir: &Path, port: u16, cloud_keys: &str, more: &str) -> String {
    config_text(dir, port, cloud_keys)
        .replace("url = \"mqtt://127.0.0.1:", "url = \"mqtts://localhost:")
        + more
}

fn last_error(gw: &Gateway, upstream: &str) -> Option<String> {
    gw.running.metrics.uplinks[upstream]
        .last_error
        .lock()
        .unwrap()
        .clone()
}

/// Wait until `upstream` has failed at least twice, and return its error.
async fn refused(gw: &Gateway, upstream: &str) -> String {
    let m = gw.running.metrics.uplinks[upstream].clone();
    wait_until(&format!("{upstream} refused"), || {
        m.failures.iter().map(|f| f.load(Relaxed)).sum::<u64>() >= 2
    })
    .await;
    assert_eq!(m.connects.load(Relaxed), 0, "{upstream} must never connect");
    last_error(gw, upstream).expect("an error is recorded")
}

async fn forwards(gw: &Gateway, sub: &Subscriber, n: usize) {
    let sensor = Sensor::connect(gw.addr).await;
    for seq in 0..n {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
    }
    let got = sub.wait_for(n).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seqs, (0..n as u64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificates_are_verified_and_failures_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("edgeferry test CA");
    let other = Ca::new("someone else's CA");
    let ca_file = ca.write(d, "ca");
    let good = ca.issue(d, "good", &["localhost", "127.0.0.1"], false);
    let untrusted = other.issue(d, "untrusted", &["localhost"], false);
    let expired = ca.issue(d, "expired", &["localhost"], true);
    let elsewhere = ca.issue(d, "elsewhere", &["broker.example.com"], false);
    let listener = |c: &crate::pki::Issued| {
        format!("certfile {}\nkeyfile {}", c.cert.display(), c.key.display())
    };
    // Plain for the subscriber; then one TLS listener per server certificate.
    let mosq = Mosquitto::start(
        &d.join("mosquitto"),
        &[
            "",
            &listener(&good),
            &listener(&untrusted),
            &listener(&expired),
            &listener(&elsewhere),
        ],
    )
    .await;
    let sub = Subscriber::start(mosq.addr(0), "plant/#").await;
    let more: String = [
        ("untrusted", mosq.ports[2]),
        ("expired", mosq.ports[3]),
        ("elsewhere", mosq.ports[4]),
    ]
    .iter()
    .map(|(name, port)| {
        format!(
            "\n[upstream.{name}]\nurl = \"mqtts://localhost:{port}\"\nca_file = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n",
            ca_file.display()
        )
    })
    .collect::<String>()
        // Without ca_file: the system's roots, which do not know our CA.
        + &format!(
            "\n[upstream.systemroots]\nurl = \"mqtts://localhost:{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n",
            mosq.ports[1]
        );
    let text = tls_config(
        d,
        mosq.ports[1],
        &format!("ca_file = \"{}\"", ca_file.display()),
        &more,
    );
    let gw = Gateway::start_with(d, &text).await;

    forwards(&gw, &sub, 50).await;

    let e = refused(&gw, "systemroots").await;
    assert!(e.contains("not signed by a trusted CA"), "{e}");
    let e = refused(&gw, "untrusted").await;
    assert!(e.contains("not signed by a trusted CA"), "{e}");
    let e = refused(&gw, "expired").await;
    assert!(e.contains("expired"), "{e}");
    let e = refused(&gw, "elsewhere").await;
    assert!(e.contains("not for this host name"), "{e}");
    // Counted as TLS failures, for alerts, and shown as the reason it is down.
    let tls = gw.running.metrics.uplinks["expired"].failures[0].load(Relaxed);
    assert!(tls >= 2);
    let (_, scrape) = http_get(gw.running.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(
        sample(
            &scrape,
            "edgeferry_uplink_down_because{upstream=\"expired\",kind=\"tls\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            "edgeferry_uplink_down_because{upstream=\"cloud\",kind=\"tls\"}"
        ),
        0.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_with_a_client_certificate_and_is_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("edgeferry test CA");
    let ca_file = ca.write(d, "ca");
    let server = ca.issue(d, "server", &["localhost"], false);
    let client = ca.issue(d, "client", &["gw-001"], false);
    let mosq = Mosquitto::start(
        &d.join("mosquitto"),
        &[
            "",
            &format!(
                "certfile {}\nkeyfile {}\ncafile {}\nrequire_certificate true",
                server.cert.display(),
                server.key.display(),
                ca_file.display()
            ),
        ],
    )
    .await;
    let sub = Subscriber::start(mosq.addr(0), "plant/#").await;
    let port = mosq.ports[1];
    let text = tls_config(
        d,
        port,
        &format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            ca_file.display(),
            client.cert.display(),
            client.key.display()
        ),
        &format!(
            "\n[upstream.anonymous]\nurl = \"mqtts://localhost:{port}\"\nca_file = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n",
            ca_file.display()
        ),
    );
    let gw = Gateway::start_with(d, &text).await;
    forwards(&gw, &sub, 50).await;
    let e = refused(&gw, "anonymous").await;
    assert!(e.contains("requires a client certificate"), "{e}");
    assert!(gw.running.metrics.uplinks["anonymous"].failures[0].load(Relaxed) >= 2);
    gw.stop().await;
}
