//! Both directions, with Mosquitto as the cloud broker: commands come down
//! an upstream's subscriptions, through `from` rules, to local devices
//! (QoS 1, retained); a rule set that would loop through the cloud does
//! not; the gateway's health goes up on its status topic (birth,
//! heartbeats with exact counters, the will on SIGKILL, `offline` on a
//! clean stop).

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use rumqttc::QoS;
use serde_json::{Value, json};

use crate::crash::Daemon;
use crate::util::*;

const RULES: &str = r#"
[[rule]]
name = "relay-command"
from = "cloud"
match = "gw/+/cmd/{device}/relay"
set = { device = "device", via = "meta.source" }
to = [{ local = "devices/{device}/relay/set", qos = 1, retain = true }]

# Would loop: what comes down goes straight back up on the same topic.
[[rule]]
name = "echo-back"
from = "cloud"
match = "gw/+/echo/#"
to = [{ upstream = "cloud" }]

[[rule]]
name = "ping"
from = "cloud"
match = "gw/+/ping"
to = [{ local = "devices/ping" }]

[[rule]]
name = "readings"
match = "sensors/#"
to = [{ upstream = "cloud", topic = "plant/readings" }]
"#;

const SUBSCRIBE: &str = r#"subscribe = ["gw/{gateway}/cmd/#", "gw/{gateway}/echo/#", { filter = "gw/{gateway}/ping", qos = 1 }]"#;

/// Config text for a gateway ("test") on the cloud at `port`, with
/// [`RULES`] and `upstream` keys for `[upstream.cloud]`.
fn config(d: &Path, port: u16, upstream: &str) -> String {
    let rules = d.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("commands.toml"), RULES).unwrap();
    rules_at(&config_text(d, port, upstream), &rules, "")
}

fn json_of(m: &Message) -> Value {
    serde_json::from_slice(&m.payload).unwrap_or_else(|e| panic!("{e}: {m:?}"))
}

async fn subscribed(gw: &Gateway, filters: u64) {
    let up = gw.running.metrics.uplinks["cloud"].clone();
    wait_until("downlink subscribed", || {
        up.downlink_subscribed.load(Relaxed) == filters
    })
    .await;
}

async fn a_command_reaches_a_device_retained_at_qos_1(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let text = config(
        d,
        mosq.ports[0],
        &format!("protocol = \"{protocol}\"\n{SUBSCRIBE}"),
    );
    let gw = Gateway::start_with(d, &text).await;
    subscribed(&gw, 3).await;
    let device = Subscriber::start(gw.addr, "devices/+/relay/set").await;
    let cloud = Sensor::connect(mosq.addr(0)).await;

    cloud
        .publish("gw/test/cmd/d1/relay", br#"{"state":"on"}"#.to_vec())
        .await;
    let got = device.wait_for(1).await;
    assert_eq!(got[0].topic, "devices/d1/relay/set");
    assert_eq!(
        got[0].qos,
        QoS::AtLeastOnce,
        "delivered at the rule's QoS 1"
    );
    assert_eq!(
        json_of(&got[0]),
        json!({"state": "on", "device": "d1", "via": "cloud"})
    );

    // A device that connects later still gets the last command.
    let late = Subscriber::start(gw.addr, "devices/d1/relay/set").await;
    let kept = late.wait_for(1).await;
    assert!(kept[0].retain, "retained: {kept:?}");
    assert_eq!(json_of(&kept[0])["state"], "on");
    let up = &gw.running.metrics.uplinks["cloud"];
    assert_eq!(up.downlink_received.load(Relaxed), 1);
    assert_eq!(gw.count(|m| &m.dropped_unmatched_downlink), 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_a_command_from_the_cloud_reaches_a_device_retained_at_qos_1() {
    a_command_reaches_a_device_retained_at_qos_1("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_a_command_from_the_cloud_reaches_a_device_retained_at_qos_1() {
    a_command_reaches_a_device_retained_at_qos_1("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_while_the_uplink_is_down_arrives_when_the_session_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let proxy = Proxy::start(mosq.addr(0), true).await;
    let gw = Gateway::start_with(d, &config(d, proxy.port, SUBSCRIBE)).await;
    subscribed(&gw, 3).await;
    let device = Subscriber::start(gw.addr, "devices/#").await;
    let cloud = Sensor::connect(mosq.addr(0)).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();
    let connects = up.connects.load(Relaxed);

    proxy.set_up(false);
    wait_until("uplink down", || !up.connected.load(Relaxed)).await;
    cloud
        .publish("gw/test/cmd/d7/relay", br#"{"state":"off"}"#.to_vec())
        .await;
    cloud.wait_acked(1).await;
    proxy.set_up(true);

    let got = device.wait_for(1).await;
    assert_eq!(got[0].topic, "devices/d7/relay/set");
    assert_eq!(json_of(&got[0])["state"], "off");
    assert!(up.connects.load(Relaxed) > connects);
    assert!(
        up.session_present.load(Relaxed),
        "the broker kept the session"
    );
    gw.stop().await;
}

/// `echo-back` sends what comes down straight back up on the same topic,
/// which the gateway subscribes to: each round would come down again
/// (MQTT 3.1.1 brokers send a client its own publishes). Exactly one
/// forward reaches the cloud.
async fn a_rule_set_that_would_loop_through_the_cloud_does_not(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let text = config(
        d,
        mosq.ports[0],
        &format!("protocol = \"{protocol}\"\n{SUBSCRIBE}"),
    );
    let gw = Gateway::start_with(d, &text).await;
    subscribed(&gw, 3).await;
    let watcher = Subscriber::start(mosq.addr(0), "gw/test/echo/#").await;
    let device = Subscriber::start(gw.addr, "devices/ping").await;
    let cloud = Sensor::connect(mosq.addr(0)).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();

    cloud.publish("gw/test/echo/x", b"hello".to_vec()).await;
    watcher.wait_for(2).await;
    wait_until("the forward acknowledged", || up.acked.load(Relaxed) >= 1).await;
    // A later command on the same session: once it is through, whatever
    // the broker sent back for the forward has arrived before it.
    cloud.publish("gw/test/ping", b"1".to_vec()).await;
    device.wait_for(1).await;

    assert_eq!(
        watcher.count(),
        2,
        "the command and one forward: {:?}",
        watcher.take()
    );
    assert_eq!(up.acked.load(Relaxed), 1);
    let echoes = up.downlink_echoes.load(Relaxed);
    match protocol {
        // The broker sent the forward back; edgeferry knew it for its own.
        "3.1.1" => assert_eq!(echoes, 1),
        // No Local: the broker never sent it.
        _ => assert_eq!(echoes, 0),
    }
    assert_eq!(
        up.downlink_received.load(Relaxed),
        2,
        "the command and the ping"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_a_rule_set_that_would_loop_through_the_cloud_does_not() {
    a_rule_set_that_would_loop_through_the_cloud_does_not("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_a_rule_set_that_would_loop_through_the_cloud_does_not() {
    a_rule_set_that_would_loop_through_the_cloud_does_not("5").await;
}

const STATUS: &str = "status_topic = \"gw/{gateway}/status\"\nstatus_interval = \"1s\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_topic_has_a_birth_heartbeats_with_exact_counters_and_offline_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let status = Subscriber::start(mosq.addr(0), "gw/test/status").await;
    let gw = Gateway::start_with(d, &config(d, mosq.ports[0], STATUS)).await;

    let birth = json_of(&status.wait_for(1).await[0]);
    assert_eq!(birth["gateway"], "test");
    assert_eq!(birth["state"], "online");
    assert_eq!(birth["version"], env!("CARGO_PKG_VERSION"));

    let sensor = Sensor::connect(gw.addr).await;
    for i in 0..7 {
        sensor
            .publish(&format!("sensors/s{i}"), reading("s", i))
            .await;
    }
    sensor.publish("nowhere/x", b"{}".to_vec()).await;
    sensor.wait_acked(8).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();
    wait_until("every reading acknowledged", || up.acked.load(Relaxed) == 7).await;
    // The first heartbeat taken after that shows the exact totals.
    let settled = status.count();
    let beat = loop {
        let all = status.wait_for(settled + 1).await;
        let last = json_of(all.last().unwrap());
        if last["upstreams"]["cloud"]["acked"] == 7 && last["upstreams"]["cloud"]["queued"] == 0 {
            break last;
        }
    };
    assert_eq!(beat["state"], "online");
    assert_eq!(beat["events"]["received"], 8);
    assert_eq!(beat["events"]["matched"], 7);
    assert_eq!(beat["dropped"]["unmatched"], 1);
    assert_eq!(beat["upstreams"]["cloud"]["connected"], true);
    assert_eq!(beat["upstreams"]["cloud"]["sent"], 7);
    assert_eq!(beat["rules"]["count"], 4);
    let digest = gw.running.metrics.rules_digest.lock().unwrap().clone();
    assert_eq!(beat["rules"]["digest"], digest.as_str());
    assert!(beat["rss_bytes"].as_u64().unwrap() > 0);
    assert!(beat["rates"]["received_per_s"].is_number(), "{beat}");

    gw.stop().await;
    // What the broker keeps for whoever asks next.
    let later = Subscriber::start(mosq.addr(0), "gw/test/status").await;
    let kept = later.wait_for(1).await;
    assert!(kept[0].retain);
    let kept = json_of(&kept[0]);
    assert_eq!(
        (kept["state"].as_str(), kept["reason"].as_str()),
        (Some("offline"), Some("stopped"))
    );
}

/// The binary: SIGKILL leaves the broker to publish the will; restarted,
/// it is born again; SIGTERM leaves a retained `offline`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_delivers_the_will_and_sigterm_leaves_offline_retained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let status = Subscriber::start(mosq.addr(0), "gw/test/status").await;
    let port = free_port();
    let config_path = d.join("edgeferry.toml");
    let text = listen_on(&config(d, mosq.ports[0], STATUS), port);
    std::fs::write(
        &config_path,
        text.replace("status_interval = \"1s\"", "status_interval = \"1h\""),
    )
    .unwrap();
    let mut daemon = Daemon::start(d, &config_path, port).await;
    let got = status.wait_for(1).await;
    assert_eq!(json_of(&got[0])["state"], "online");
    daemon.signal("-KILL");
    let got = status.wait_for(2).await;
    let will = json_of(&got[1]);
    assert_eq!(
        (will["state"].as_str(), will["reason"].as_str()),
        (Some("offline"), Some("lost")),
        "{will}"
    );
    assert_eq!(will["gateway"], "test");

    let mut daemon = Daemon::start(d, &config_path, port).await;
    let got = status.wait_for(3).await;
    assert_eq!(json_of(&got[2])["state"], "online");
    assert!(daemon.signal("-TERM").success());
    let got = status.wait_for(4).await;
    let last = json_of(&got[3]);
    assert_eq!(
        (last["state"].as_str(), last["reason"].as_str()),
        (Some("offline"), Some("stopped"))
    );
    let later = Subscriber::start(mosq.addr(0), "gw/test/status").await;
    let kept = later.wait_for(1).await;
    assert!(kept[0].retain);
    assert_eq!(
        json_of(&kept[0])["reason"],
        "stopped",
        "the will was not sent after a clean stop"
    );
}

/// A gateway taking remote operations (`control_topic`) from Mosquitto as
/// its cloud, with a cloud subscriber on `plant/#` and a local sensor.
struct Remote {
    _mosq: Mosquitto,
    gw: Gateway,
    plant: Subscriber,
    sensor: Sensor,
    control: Control,
}

/// The cloud's side of the control topic: a command sent, its result read.
struct Control {
    cloud: Sensor,
    results: Subscriber,
    asked: usize,
}

impl Remote {
    async fn start(d: &Path) -> Remote {
        let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
        let text = config(d, mosq.ports[0], "control_topic = \"gw/{gateway}/control\"");
        let gw = Gateway::start_with(d, &text).await;
        subscribed(&gw, 1).await;
        let results = Subscriber::start(mosq.addr(0), "gw/test/control/result").await;
        let plant = Subscriber::start(mosq.addr(0), "plant/#").await;
        let cloud = Sensor::connect(mosq.addr(0)).await;
        let sensor = Sensor::connect(gw.addr).await;
        Remote {
            _mosq: mosq,
            gw,
            plant,
            sensor,
            control: Control {
                cloud,
                results,
                asked: 0,
            },
        }
    }
}

impl Control {
    async fn ask(&mut self, command: Value) -> Value {
        self.asked += 1;
        self.cloud
            .publish("gw/test/control", command.to_string().into_bytes())
            .await;
        let got = self.results.wait_for(self.asked).await;
        json_of(&got[self.asked - 1])
    }
}

/// Remote operations on the control topic: `status`, a refused bad set
/// (file:line in the result, the old rules still running), a set whose own
/// test fails, a good set applied, and `rollback`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_rules_are_checked_and_tested_before_they_replace_the_running_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Remote {
        _mosq,
        gw,
        plant,
        sensor,
        mut control,
    } = Remote::start(d).await;
    let m = gw.running.metrics.clone();
    let digest = || m.rules_digest.lock().unwrap().clone();
    let before = digest();
    let mut ask = async |command: Value| control.ask(command).await;

    let r = ask(json!({"request_id": "s1", "command": "status"})).await;
    assert_eq!(
        (r["request_id"].as_str(), r["ok"].as_bool()),
        (Some("s1"), Some(true)),
        "{r}"
    );
    assert_eq!(r["status"]["gateway"], "test");
    assert_eq!(r["status"]["rules"]["count"], 4);

    let bad = "[[rule]]\nname = \"bad\"\nmatch = \"a/#/b\"\ndrop = true\n";
    let r =
        ask(json!({"request_id": "r1", "command": "rules", "files": {"10-bad.toml": bad}})).await;
    assert_eq!(r["ok"], false, "{r}");
    let e = r["errors"][0].as_str().unwrap();
    assert!(
        e.starts_with("10-bad.toml:3:") && e.contains("'#' is only allowed as the last level"),
        "{r}"
    );
    assert_eq!(
        r["rules"]["digest"],
        before.as_str(),
        "the old set still runs"
    );

    let untested = "[[rule]]\nname = \"new\"\nmatch = \"sensors/#\"\nto = [{ upstream = \"cloud\", topic = \"plant/new\" }]\n\n[[test]]\nname = \"goes to plant/old\"\ninput = { topic = \"sensors/x\", payload = {} }\nexpect = [{ upstream = \"cloud\", topic = \"plant/old\" }]\n";
    let r =
        ask(json!({"request_id": "r2", "command": "rules", "files": {"10-new.toml": untested}}))
            .await;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["errors"][0]
            .as_str()
            .unwrap()
            .contains("test failed: 10-new.toml:6: goes to plant/old"),
        "{r}"
    );
    assert_eq!(digest(), before);

    let good = untested
        .replace("plant/old", "plant/new")
        .replace("goes to plant/old", "goes to plant/new");
    let r =
        ask(json!({"request_id": "r3", "command": "rules", "files": {"10-new.toml": good}})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["added"], json!(["new"]));
    assert_eq!(r["rules"]["count"], 1);
    assert_ne!(r["rules"]["digest"], before.as_str());
    let rules = d.join("rules");
    assert!(rules.join("10-new.toml").is_file() && !rules.join("commands.toml").exists());
    assert!(
        rules.join(".previous/commands.toml").is_file(),
        "kept for rollback"
    );
    sensor.publish("sensors/x", b"{}".to_vec()).await;
    assert_eq!(
        plant.wait_for(1).await[0].topic,
        "plant/new",
        "the new set runs"
    );

    let r = ask(json!({"request_id": "r4", "command": "rollback"})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["rules"]["digest"], before.as_str());
    assert!(rules.join("commands.toml").is_file() && !rules.join("10-new.toml").exists());

    let r = ask(json!({"request_id": "x", "command": "reboot"})).await;
    assert!(
        r["errors"][0].as_str().unwrap().contains("unknown command"),
        "{r}"
    );
    assert_eq!(
        gw.running.metrics.uplinks["cloud"]
            .control_commands
            .load(Relaxed),
        6
    );
    assert_eq!(
        gw.running.metrics.uplinks["cloud"]
            .downlink_received
            .load(Relaxed),
        0,
        "commands are not events"
    );
    gw.stop().await;
}

/// Commands are acknowledged to the cloud broker by edgeferry, once
/// routed: a hundred flow through (Mosquitto holds at most 20
/// unacknowledged per client, so unacknowledged ones would stall), and a
/// restarted gateway resuming its session gets none of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_commands_are_acknowledged_so_a_resumed_session_does_not_repeat_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let text = config(d, mosq.ports[0], SUBSCRIBE);
    let gw = Gateway::start_with(d, &text).await;
    subscribed(&gw, 3).await;
    let device = Subscriber::start(gw.addr, "devices/#").await;
    let cloud = Sensor::connect(mosq.addr(0)).await;
    const N: usize = 100;
    for i in 0..N {
        cloud
            .publish("gw/test/ping", i.to_string().into_bytes())
            .await;
    }
    device.wait_for(N).await;
    gw.stop().await;

    let gw = Gateway::start_with(d, &text).await;
    subscribed(&gw, 3).await;
    assert!(
        gw.running.metrics.uplinks["cloud"]
            .session_present
            .load(Relaxed)
    );
    let device = Subscriber::start(gw.addr, "devices/#").await;
    cloud.publish("gw/test/ping", b"after".to_vec()).await;
    let got = device.wait_for(1).await;
    assert_eq!(got[0].payload, b"after", "nothing repeated: {got:?}");
    assert_eq!(
        gw.running.metrics.uplinks["cloud"]
            .downlink_received
            .load(Relaxed),
        1
    );
    gw.stop().await;
}

/// A command too large for max_packet_size cannot be read; the broker
/// would send it again on every reconnect. The next connection starts a
/// fresh session, and commands flow again (a hostile run found the uplink
/// reconnecting twice a second for good, the sensors' data stuck).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_too_large_to_read_does_not_wedge_the_uplink() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let text = config(
        d,
        mosq.ports[0],
        &format!("{SUBSCRIBE}\nmax_packet_size = \"4KiB\""),
    );
    let gw = Gateway::start_with(d, &text).await;
    subscribed(&gw, 3).await;
    let device = Subscriber::start(gw.addr, "devices/#").await;
    let cloud = Sensor::connect(mosq.addr(0)).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();

    cloud.publish("gw/test/ping", vec![b'x'; 10_000]).await;
    wait_until("the oversized command noticed", || {
        up.downlink_oversized.load(Relaxed) == 1
    })
    .await;
    subscribed(&gw, 3).await;
    cloud.publish("gw/test/ping", b"small".to_vec()).await;
    let got = device.wait_for(1).await;
    assert_eq!(got[0].payload, b"small");
    assert_eq!(up.downlink_oversized.load(Relaxed), 1, "once, not a loop");
    gw.stop().await;
}

/// A flood of control commands is cut to 10 a second (the rest dropped,
/// counted) and never ends the session (a hostile run took the uplink
/// down with 20,000 `status` commands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_control_commands_is_paced_and_the_uplink_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let text = config(d, mosq.ports[0], "control_topic = \"gw/{gateway}/control\"");
    let gw = Gateway::start_with(d, &text).await;
    subscribed(&gw, 1).await;
    let results = Subscriber::start(mosq.addr(0), "gw/test/control/result").await;
    let cloud = Sensor::connect(mosq.addr(0)).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();
    const N: u64 = 300;
    for i in 0..N {
        let c = json!({"request_id": i, "command": "status"}).to_string();
        cloud
            .client
            .publish("gw/test/control", QoS::AtMostOnce, false, c.into_bytes())
            .await
            .unwrap();
    }
    wait_until("every command read", || {
        up.control_commands.load(Relaxed) == N
    })
    .await;
    results.wait_for(20).await;
    assert!(
        up.control_dropped.load(Relaxed) >= N - 100,
        "{}",
        up.control_dropped.load(Relaxed)
    );
    assert_eq!(up.connects.load(Relaxed), 1, "the session stayed up");
    assert!(up.connected.load(Relaxed));
    gw.stop().await;
}

/// A retained command is not delivered again when the session resumes
/// (re-subscribing made a 3.1.1 broker send it at every reconnect), and
/// the gateway's own status messages that come back down a wide filter
/// are known for echoes, not taken as commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_repeats_no_retained_command_and_own_messages_are_not_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let proxy = Proxy::start(mosq.addr(0), true).await;
    let upstream = "subscribe = [\"gw/{gateway}/#\"]\nstatus_topic = \"gw/{gateway}/status\"";
    let gw = Gateway::start_with(d, &config(d, proxy.port, upstream)).await;
    subscribed(&gw, 1).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();
    wait_until("the birth came back and was known", || {
        up.downlink_echoes.load(Relaxed) == 1
    })
    .await;
    let device = Subscriber::start(gw.addr, "devices/#").await;
    let cloud = Sensor::connect(mosq.addr(0)).await;
    cloud
        .client
        .publish(
            "gw/test/cmd/d1/relay",
            QoS::AtLeastOnce,
            true,
            br#"{"state":"on"}"#.to_vec(),
        )
        .await
        .unwrap();
    device.wait_for(1).await;

    let connects = up.connects.load(Relaxed);
    proxy.set_up(false);
    wait_until("uplink down", || !up.connected.load(Relaxed)).await;
    proxy.set_up(true);
    wait_until("uplink back", || {
        up.connects.load(Relaxed) > connects && up.connected.load(Relaxed)
    })
    .await;
    assert!(up.session_present.load(Relaxed));
    // The will the broker published when the link was cut, and the new
    // birth: both the gateway's own.
    wait_until("the will and the new birth known too", || {
        up.downlink_echoes.load(Relaxed) == 3
    })
    .await;
    cloud.publish("gw/test/ping", b"after".to_vec()).await;
    let got = device.wait_for(2).await;
    assert_eq!(got.len(), 2, "the relay once, then the ping: {got:?}");
    assert_eq!(got[1].payload, b"after");
    assert_eq!(
        up.downlink_received.load(Relaxed),
        2,
        "the relay and the ping; no status"
    );
    gw.stop().await;
}

/// A remote set carries its schemas: checked with them (a set whose rule
/// names a schema file it did not send is refused), installed beside the
/// rule files, enforced, and part of the digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_rule_set_carries_its_schema_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Remote {
        _mosq,
        gw,
        plant,
        sensor,
        mut control,
    } = Remote::start(d).await;
    let mut ask = async |command: Value| control.ask(command).await;
    let rules = "[[schema]]\nname = \"t\"\nmatch = \"sensors/+\"\nfile = \"t.schema.json\"\nenforce = true\n\n[[rule]]\nname = \"t\"\nmatch = \"sensors/{d}\"\nto = [{ upstream = \"cloud\", topic = \"plant/{d}\" }]\n\n[[test]]\nname = \"a string is not a reading\"\ninput = { topic = \"sensors/x\", payload = { value = \"hot\" } }\nexpect = [{ dead_letter = \"schema\", path = \"/value\" }]\n";
    let schema = r#"{"type": "object", "properties": {"value": {"type": "number"}}}"#;

    let r =
        ask(json!({"request_id": "r1", "command": "rules", "files": {"10-t.toml": rules}})).await;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["errors"][0].as_str().unwrap().starts_with("10-t.toml:4:")
            && r["errors"][0].as_str().unwrap().contains("cannot read"),
        "{r}"
    );

    let r = ask(json!({"request_id": "r2", "command": "rules", "files": {"10-t.toml": rules, "t.schema.json": schema}})).await;
    assert_eq!(r["ok"], true, "{r}");
    let first = r["rules"]["digest"].as_str().unwrap().to_string();
    assert!(d.join("rules/t.schema.json").is_file());
    sensor
        .publish("sensors/x", br#"{"value": "hot"}"#.to_vec())
        .await;
    sensor
        .publish("sensors/x", br#"{"value": 21.5}"#.to_vec())
        .await;
    sensor.wait_acked(2).await;
    let got = plant.wait_for(1).await;
    assert_eq!(&got[0].payload[..], br#"{"value": 21.5}"#);
    wait_until("the string dead-lettered", || {
        gw.running.metrics.dead_letters.load(Relaxed) == 1
    })
    .await;

    // The same rule file with another schema is another set.
    let other =
        r#"{"type": "object", "properties": {"value": {"type": "number", "minimum": -40}}}"#;
    let r = ask(json!({"request_id": "r3", "command": "rules", "files": {"10-t.toml": rules, "t.schema.json": other}})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_ne!(r["rules"]["digest"].as_str().unwrap(), first);
    gw.stop().await;
}
