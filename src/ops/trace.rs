//! The live trace behind `edgeferry tail`: while someone watches, the
//! router describes each routed event (who sent it, what each matching rule
//! did, where it went) as one JSON line on a broadcast channel that the
//! metrics endpoint streams from `GET /trace`.
//!
//! Off the hot path when nobody watches: the router asks `watched()` once
//! per batch (one atomic load). While someone watches, at most `RATE`
//! events a second are described (a token bucket in the router), so a
//! busy gateway is not slowed by its watchers; the others are counted in
//! the next line's `skipped`. A watcher that reads too slowly loses the
//! oldest lines (the channel is bounded) and is told how many.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use tokio::time::Instant;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::event::Event;
use crate::pacing::Bucket;
use crate::rules::{Step, Verdict};

/// Events described per second at most, while someone watches.
pub const RATE: u32 = 500;
/// Lines a watcher may fall behind before it loses the oldest.
const BACKLOG: usize = 1024;

#[derive(Debug)]
pub struct Tracer {
    lines: broadcast::Sender<std::sync::Arc<str>>,
    watchers: AtomicUsize,
}

impl Default for Tracer {
    fn default() -> Self {
        Tracer {
            lines: broadcast::channel(BACKLOG).0,
            watchers: AtomicUsize::new(0),
        }
    }
}

/// A watcher's end; dropping it stops the tracing when it was the last.
pub struct Watch<'a> {
    tracer: &'a Tracer,
    pub lines: broadcast::Receiver<std::sync::Arc<str>>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.tracer.watchers.fetch_sub(1, Relaxed);
    }
}

impl Tracer {
    /// Whether anyone watches (the router's one question per batch).
    pub fn watched(&self) -> bool {
        self.watchers.load(Relaxed) > 0
    }

    pub fn watch(&self) -> Watch<'_> {
        self.watchers.fetch_add(1, Relaxed);
        Watch {
            tracer: self,
            lines: self.lines.subscribe(),
        }
    }

    /// The row a traced event got in `upstream`'s queue.
    pub fn row_queued(&self, id: i64, upstream: &str, event_id: &str) {
        let line = json!({"queued": {"id": id, "upstream": upstream, "event_id": event_id}});
        let _ = self.lines.send(line.to_string().into());
    }

    /// A traced event's row acknowledged by its upstream.
    pub fn row_acked(&self, id: i64, upstream: &str) {
        let line = json!({"acked": {"id": id, "upstream": upstream}});
        let _ = self.lines.send(line.to_string().into());
    }

    /// Describe one routed event (nobody listening: nothing happens).
    pub fn send(&self, event: &Event, verdict: &Verdict, skipped: u64) {
        let line = describe(event, verdict, skipped).to_string();
        let _ = self.lines.send(line.into());
    }
}

/// The token bucket the router keeps: `RATE` a second, a second's burst.
#[derive(Debug)]
pub struct Budget {
    bucket: Bucket,
    /// Events not described since the last one that was.
    pub skipped: u64,
}

impl Default for Budget {
    fn default() -> Self {
        let rate = f64::from(RATE);
        Budget {
            bucket: Bucket::with_burst(rate, rate, Instant::now()),
            skipped: 0,
        }
    }
}

impl Budget {
    /// Whether this event may be described.
    pub fn take(&mut self) -> bool {
        let ok = self.bucket.try_take(Instant::now());
        if !ok {
            self.skipped += 1;
        }
        ok
    }
}

/// One event as a JSON object: topic, client, each matching rule's step,
/// the destinations, and what went wrong.
pub fn describe(event: &Event, verdict: &Verdict, skipped: u64) -> Value {
    let rules: Vec<Value> = verdict
        .trace
        .iter()
        .flatten()
        .map(|(rule, step)| {
            let mut r = json!({"rule": &**rule, "step": step_name(step)});
            match step {
                Step::Held(reason) => r["reason"] = json!(reason.as_str()),
                Step::Applied { outputs, stop } => {
                    r["outputs"] = json!(outputs);
                    if *stop {
                        r["stop"] = json!(true);
                    }
                }
                _ => {}
            }
            r
        })
        .collect();
    let mut to: Vec<Value> = verdict
        .routes
        .iter()
        .map(|r| json!({"upstream": &*r.upstream, "topic": r.topic}))
        .collect();
    to.extend(verdict.republish.iter().map(|r| json!({"local": r.topic})));
    let mut line = json!({
        "event_id": event.id.to_string(),
        "at_ms": event.received_ms,
        "topic": event.topic,
        "client_id": &*event.client_id,
        "rules": rules,
        "to": to,
    });
    if let Some(user) = &event.username {
        line["username"] = json!(&**user);
    }
    if verdict.matched == 0 && verdict.trace.as_ref().is_some_and(|t| t.is_empty()) {
        line["unmatched"] = json!(true);
    }
    if !verdict.errors.is_empty() {
        line["errors"] = verdict
            .errors
            .iter()
            .map(|(rule, why)| json!({"rule": &**rule, "error": why}))
            .collect();
    }
    if let Some(why) = &verdict.dead_letter {
        line["dead_letter"] = json!(why);
    }
    if skipped > 0 {
        line["skipped"] = json!(skipped);
    }
    line
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::OwnRepublish => "own republish",
        Step::WhenFalse => "when false",
        Step::Failed => "failed",
        Step::Dropped => "dropped",
        Step::Held(_) => "held",
        Step::Absorbed => "absorbed into window",
        Step::Applied { .. } => "applied",
    }
}

/// A traced event as a person reads it: one line for the event, one per
/// matching rule, one per destination.
pub fn human(line: &Value) -> String {
    if let Some(lost) = line["lost"].as_u64() {
        return format!("... {lost} events not shown (this tail read too slowly)\n");
    }
    if let Some(q) = line.get("queued") {
        return format!(
            "  queued for {} as row {} (event {})\n",
            q["upstream"].as_str().unwrap_or("?"),
            q["id"],
            q["event_id"].as_str().unwrap_or("?")
        );
    }
    if let Some(a) = line.get("acked") {
        return format!(
            "  row {} acknowledged by {}\n",
            a["id"],
            a["upstream"].as_str().unwrap_or("?")
        );
    }
    let from = match line["client_id"].as_str().unwrap_or("") {
        "" => "a client without a client id".to_string(),
        id => format!("{id:?}"),
    };
    let mut out = format!("{} from {from}", line["topic"].as_str().unwrap_or("?"));
    if let Some(n) = line["skipped"].as_u64() {
        out += &format!(" ({n} events before it not traced: rate cap)");
    }
    out.push('\n');
    let rules = line["rules"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if rules.is_empty() {
        out += "  no rule matched\n";
    }
    for r in rules {
        let rule = r["rule"].as_str().unwrap_or("?");
        let step = r["step"].as_str().unwrap_or("?");
        let detail = match (r["reason"].as_str(), r["outputs"].as_u64()) {
            (Some(reason), _) => format!(" ({reason})"),
            (_, Some(n)) if r["stop"] == true => format!(" ({}, stop)", destinations(n)),
            (_, Some(n)) => format!(" ({})", destinations(n)),
            _ => String::new(),
        };
        out += &format!("  rule {rule:?}: {step}{detail}\n");
    }
    for e in line["errors"].as_array().into_iter().flatten() {
        out += &format!(
            "  rule {:?} failed: {}\n",
            e["rule"].as_str().unwrap_or("?"),
            e["error"].as_str().unwrap_or("?")
        );
    }
    for to in line["to"].as_array().into_iter().flatten() {
        match (to["upstream"].as_str(), to["local"].as_str()) {
            (Some(up), _) => {
                out += &format!(
                    "  -> upstream {up}: {}\n",
                    to["topic"].as_str().unwrap_or("")
                )
            }
            (_, Some(local)) => out += &format!("  -> local {local}\n"),
            _ => {}
        }
    }
    if let Some(why) = line["dead_letter"].as_str() {
        out += &format!("  dead letter: {why}\n");
    }
    out
}

fn destinations(n: u64) -> String {
    match n {
        1 => "1 destination".to_string(),
        n => format!("{n} destinations"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traced_line_reads_as_an_operator_writes_it() {
        let line = json!({"topic": "a/b", "client_id": "", "rules": [
            {"rule": "r1", "step": "when false"},
            {"rule": "r2", "step": "held", "reason": "deadband"},
            {"rule": "r3", "step": "applied", "outputs": 2, "stop": true},
        ], "to": [{"upstream": "cloud", "topic": "x/y"}, {"local": "alerts/b"}], "skipped": 7});
        assert_eq!(
            human(&line),
            "a/b from a client without a client id (7 events before it not traced: rate cap)\n\
             \x20 rule \"r1\": when false\n\
             \x20 rule \"r2\": held (deadband)\n\
             \x20 rule \"r3\": applied (2 destinations, stop)\n\
             \x20 -> upstream cloud: x/y\n\
             \x20 -> local alerts/b\n"
        );
        assert_eq!(
            human(&json!({"lost": 3})),
            "... 3 events not shown (this tail read too slowly)\n"
        );
        assert_eq!(
            human(&json!({"acked": {"id": 5, "upstream": "cloud"}})),
            "  row 5 acknowledged by cloud\n"
        );
    }

    #[test]
    fn the_budget_allows_its_rate_and_counts_the_rest() {
        let mut b = Budget::default();
        let taken = (0..RATE * 2).filter(|_| b.take()).count();
        // A second's burst, and whatever refilled while counting.
        assert!(
            taken >= RATE as usize && taken < (RATE as usize) * 2,
            "{taken}"
        );
        assert_eq!(b.skipped as usize, (RATE * 2) as usize - taken);
    }
}
