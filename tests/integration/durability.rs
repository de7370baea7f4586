//! One durability model: events are sent from RAM while the uplink keeps up
//! (nothing written to the SD card) and written to SQLite when it is down or
//! they wait. The older tests here set the deprecated `durability =
//! "offline"` with a long `spill_after`, which the model still honours.

use std::sync::atomic::Ordering::Relaxed;

use crate::util::*;

/// `[queue]` keys: RAM first, and no spill by age within a test's run.
fn ram_first(text: String) -> String {
    text.replace(
        "commit_interval = \"10ms\"",
        "commit_interval = \"10ms\"\ndurability = \"offline\"\nspill_after = \"60s\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_uplink_keeping_up_nothing_is_written() {
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline_with("", ram_first).await;
    proxy.set_up(true);
    let up = gw.running.metrics.uplinks["cloud"].clone();
    wait_until("uplink connected", || up.connected.load(Relaxed)).await;

    const N: usize = 2000;
    for seq in 0..N {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
    }
    let got = sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seqs, (0..N as u64).collect::<Vec<_>>());
    let m = gw.running.metrics.clone();
    wait_until("every event acknowledged", || {
        m.acked_in_memory.load(Relaxed) == N as u64
    })
    .await;
    assert_eq!(gw.count(|m| &m.queued), 0, "no row written");
    assert_eq!(gw.count(|m| &m.commits), 0, "no commit");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_events_are_written_then_all_arrive_in_order() {
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline_with("", ram_first).await;
    const N: usize = 1000;
    for seq in 0..N {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    // The upstream is down: written at once, not after spill_after (60 s).
    wait_until("all events written", || gw.queued("cloud") == N as u64).await;
    proxy.set_up(true);
    let got = sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seqs, (0..N as u64).collect::<Vec<_>>());
    wait_until("rows deleted after PUBACK", || gw.queued("cloud") == 0).await;
    gw.stop().await;
}

/// With the default settings (no `durability`, `spill_after` = one commit
/// interval): an event its upstream acknowledges before the next commit is
/// never written; one whose upstream is down is written by the first commit
/// after it arrived, so within `commit_interval`, and only then gets its
/// PUBACK (ack = "stored").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_an_event_acked_before_its_commit_is_never_written_and_one_for_a_down_upstream_is_written_at_the_next_commit()
 {
    // A long interval, so the cloud's ack surely comes first on a loaded
    // machine; the second half then waits for one round.
    let slow_commits =
        |t: String| t.replace("commit_interval = \"10ms\"", "commit_interval = \"5s\"");
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline_with("", slow_commits).await;
    let m = gw.running.metrics.clone();
    let up = m.uplinks["cloud"].clone();
    proxy.set_up(true);
    wait_until("uplink connected", || up.connected.load(Relaxed)).await;
    const N: usize = 200;
    for seq in 0..N {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    assert_sequence(
        &sub.wait_for(N)
            .await
            .iter()
            .map(|m| seq_of(&m.payload))
            .collect::<Vec<_>>(),
        0..N as u64,
    );
    assert_eq!(
        m.acked_in_memory.load(Relaxed),
        N as u64,
        "acknowledged from RAM"
    );
    assert_eq!(gw.count(|m| &m.queued), 0, "no row written");
    assert_eq!(gw.count(|m| &m.commits), 0, "no commit at all");

    // The upstream goes: the next event is written by the first commit
    // after it arrived (one commit round, whose spacing is commit_interval).
    proxy.set_up(false);
    wait_until("uplink down", || !up.connected.load(Relaxed)).await;
    sensor
        .publish("sensors/yard/d1/temperature", reading("d1", N))
        .await;
    wait_until("the event written", || gw.queued("cloud") == 1).await;
    assert_eq!(gw.count(|m| &m.commits), 1, "written by the first commit");
    sensor.wait_acked(N + 1).await;
    proxy.set_up(true);
    let got = sub.wait_for(N + 1).await;
    assert_eq!(seq_of(&got[N].payload), N as u64);
    gw.stop().await;
}
