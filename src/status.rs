//! `edgeferry status`: one screen for an operator, read from the running
//! daemon's metrics endpoint (two scrapes a second apart, for rates) or,
//! when nothing answers there, from the queue file.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::event::now_ms;
use crate::units::ByteSize;

const TIMEOUT: Duration = Duration::from_secs(3);

/// Why the daemon's endpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("nothing answers on {addr}: {source}")]
    NotRunning {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} answered, but not like edgeferry's metrics endpoint: {why}")]
    BadAnswer { addr: SocketAddr, why: String },
}

impl StatusError {
    /// What `status` says first: a refused connection means nothing runs
    /// there; a reset, a timeout or an odd answer means something does but
    /// does not answer (busy, stuck, or not edgeferry).
    pub fn headline(&self) -> String {
        match self {
            StatusError::NotRunning { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                format!("edgeferry is not running ({self})")
            }
            _ => format!("edgeferry did not answer: it may be running but busy or stuck ({self})"),
        }
    }
}

/// Why `edgeferry status` has no screen of a running daemon to show.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    /// Nothing answers, or metrics are off: the screen made from the queue
    /// file instead.
    #[error("{0}")]
    Down(String),
    /// The second scrape failed: the daemon went away between the two.
    #[error(transparent)]
    Scrape(#[from] StatusError),
}

/// `edgeferry status`: two scrapes a second apart (for rates) and the
/// health check, rendered; or, when the daemon cannot be asked, its queue.
pub fn show(file: &crate::config::ConfigFile) -> Result<String, ShowError> {
    if !file.metrics.enabled {
        return Err(ShowError::Down(render_offline(
            "cannot tell whether edgeferry runs: metrics.enabled = false in its config",
            &file.queue.path,
        )));
    }
    let addr = file.metrics.listen;
    let scrape = || http_get(addr, "/metrics").map(|t| Scrape::parse(&t));
    let first =
        scrape().map_err(|e| ShowError::Down(render_offline(&e.headline(), &file.queue.path)))?;
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let second = scrape()?;
    // Rates over the time between the two scrapes, not what follows.
    let secs = started.elapsed().as_secs_f64();
    let health = match fetch(addr, "/health") {
        Ok((200, _)) => "healthy".to_string(),
        Ok((_, body)) => format!("UNHEALTHY: {}", body.trim()),
        Err(e) => format!("UNHEALTHY: {e}"),
    };
    Ok(render(
        &file.gateway_id(),
        addr,
        &health,
        &first,
        &second,
        secs,
    ))
}

/// Follow the running daemon's trace (`edgeferry tail`): each line to
/// `line` until it returns false (stdout closed), the daemon stops or the
/// connection drops.
pub fn follow_trace(
    file: &crate::config::ConfigFile,
    filter: Option<&str>,
    line: &mut dyn FnMut(&str) -> bool,
) -> Result<(), StatusError> {
    use std::io::BufRead;
    let addr = file.metrics.listen;
    let not_running = |source| StatusError::NotRunning { addr, source };
    let mut s = connect(addr)?;
    // The stream waits for events as long as it takes.
    s.set_read_timeout(None).map_err(not_running)?;
    let query = filter.map_or(String::new(), |f| {
        format!(
            "?filter={}",
            crate::percent::encode(f, crate::percent::PATH)
        )
    });
    write!(s, "GET /trace{query} HTTP/1.1\r\nHost: {addr}\r\n\r\n").map_err(not_running)?;
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).map_err(not_running)?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut header = String::new();
    while r.read_line(&mut header).map_err(not_running)? > 0 && header.trim() != "" {
        header.clear();
    }
    if code != 200 {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut r, &mut body);
        return Err(StatusError::BadAnswer {
            addr,
            why: match code {
                0 => "no HTTP status".to_string(),
                _ => format!("HTTP {code}: {}", body.trim()),
            },
        });
    }
    for l in r.lines() {
        let l = l.map_err(not_running)?;
        if !line(&l) {
            break;
        }
    }
    Ok(())
}

/// GET `path` from `addr`: the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, StatusError> {
    match fetch(addr, path)? {
        (200, body) => Ok(body),
        (status, _) => Err(StatusError::BadAnswer {
            addr,
            why: format!("HTTP status {status}"),
        }),
    }
}

/// A connection to the metrics endpoint at `addr`, with timeouts.
fn connect(addr: SocketAddr) -> Result<TcpStream, StatusError> {
    let not_running = |source| StatusError::NotRunning { addr, source };
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(not_running)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(not_running)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(not_running)?;
    Ok(s)
}

/// GET `path` from `addr`: status code and body.
pub fn fetch(addr: SocketAddr, path: &str) -> Result<(u16, String), StatusError> {
    let not_running = |source| StatusError::NotRunning { addr, source };
    let mut s = connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(not_running)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(not_running)?;
    let text = String::from_utf8_lossy(&out);
    let bad = |why: &str| StatusError::BadAnswer {
        addr,
        why: why.to_string(),
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP header"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no HTTP status"))?;
    Ok((status, body.to_string()))
}

/// Samples of one scrape, by series as exposed (`name{labels}`).
#[derive(Debug, Default, Clone)]
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    fn up(&self, name: &str, upstream: &str) -> f64 {
        self.get(&format!("{name}{{upstream=\"{upstream}\"}}"))
    }

    /// Upstream names, from the `uplink_connected` series.
    fn upstreams(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .keys()
            .filter_map(|k| {
                k.strip_prefix("edgeferry_uplink_connected{upstream=\"")?
                    .strip_suffix("\"}")
                    .map(str::to_string)
            })
            .collect();
        v.sort();
        v
    }

    /// Sum over the priorities of a per-upstream-and-priority series.
    /// `{upstream, kind}` series: the kind whose value is 1.
    fn kind_set(&self, name: &str, upstream: &str) -> Option<&str> {
        ["tls", "refused", "unreachable", "lost", "stalled"]
            .into_iter()
            .find(|k| self.get(&format!("{name}{{upstream=\"{upstream}\",kind=\"{k}\"}}")) == 1.0)
    }

    fn by_priority(&self, name: &str, upstream: &str) -> f64 {
        ["low", "normal", "high"]
            .iter()
            .map(|p| {
                self.get(&format!(
                    "{name}{{upstream=\"{upstream}\",priority=\"{p}\"}}"
                ))
            })
            .sum()
    }
}

const DROPS: [&str; 7] = [
    "unmatched",
    "rule",
    "throttled",
    "duplicate",
    "deadband",
    "queue_unavailable",
    "loop",
];

/// "DOWN", with what ended the last attempt when known ("DOWN (tls)").
fn down_state(b: &Scrape, upstream: &str) -> String {
    match b.kind_set("edgeferry_uplink_down_because", upstream) {
        Some(kind) => format!("DOWN ({kind})"),
        None => "DOWN".into(),
    }
}

/// The screen, from two scrapes `secs` apart.
pub fn render(
    gateway: &str,
    addr: SocketAddr,
    health: &str,
    a: &Scrape,
    b: &Scrape,
    secs: f64,
) -> String {
    let rates = Rates { a, b, secs };
    let mut out = String::new();
    summary(&mut out, gateway, addr, health, &rates);
    let _ = writeln!(out);
    upstream_table(&mut out, &rates);
    out
}

/// Two scrapes `secs` apart: values from the second, rates between them.
struct Rates<'a> {
    a: &'a Scrape,
    b: &'a Scrape,
    secs: f64,
}

impl Rates<'_> {
    fn rate(&self, series: &str) -> f64 {
        (self.b.get(series) - self.a.get(series)).max(0.0) / self.secs
    }
}

/// The daemon's lines: uptime and health, rules, event rates, drops, memory.
fn summary(out: &mut String, gateway: &str, addr: SocketAddr, health: &str, r: &Rates<'_>) {
    let b = r.b;
    let now_s = now_ms() as f64 / 1e3;
    let started = b.get("edgeferry_start_timestamp_seconds");
    let _ = writeln!(
        out,
        "edgeferry on {gateway}: running for {} (metrics at {addr}), {}",
        age(now_s - started),
        health.trim()
    );
    let last = b.get("edgeferry_rule_last_reload_timestamp_seconds");
    let reload = if last == 0.0 {
        "never reloaded".to_string()
    } else {
        format!(
            "last reload {} ago ({})",
            age(now_s - last),
            if b.get("edgeferry_rule_last_reload_ok") == 1.0 {
                "applied"
            } else {
                "REFUSED: the previous rules are running; see the log"
            }
        )
    };
    let _ = writeln!(out, "rules:  {} loaded, {reload}", b.get("edgeferry_rules"));
    let _ = writeln!(
        out,
        "events: {:.0}/s received, {:.0}/s matched, {:.0}/s queued (totals {}, {}, {})",
        r.rate("edgeferry_events_received_total"),
        r.rate("edgeferry_events_matched_total"),
        r.rate("edgeferry_queue_appended_total"),
        b.get("edgeferry_events_received_total"),
        b.get("edgeferry_events_matched_total"),
        b.get("edgeferry_queue_appended_total"),
    );
    let drops: Vec<String> = DROPS
        .iter()
        .filter_map(|r| {
            let v = b.get(&format!("edgeferry_events_dropped_total{{reason=\"{r}\"}}"));
            (v > 0.0).then(|| format!("{r} {v}"))
        })
        .collect();
    let _ = writeln!(
        out,
        "drops:  {}; dead letters {}, rule errors {}",
        if drops.is_empty() {
            "none".to_string()
        } else {
            drops.join(", ")
        },
        b.get("edgeferry_dead_letters_total"),
        b.get("edgeferry_rule_errors_total"),
    );
    let _ = writeln!(
        out,
        "memory: {} resident",
        // (Before 0.1's process_* series: edgeferry_process_resident_memory_bytes.)
        ByteSize(
            b.get("process_resident_memory_bytes")
                .max(b.get("edgeferry_process_resident_memory_bytes")) as u64
        )
    );
}

/// One line per upstream: state, queue, in flight, acks, limits.
fn upstream_table(out: &mut String, r: &Rates<'_>) {
    let b = r.b;
    let _ = writeln!(
        out,
        "{:<12} {:<16} {:>9} {:>10} {:>9} {:>9} {:>8} {:>10} {:>7} {:>13}",
        "UPSTREAM",
        "STATE",
        "QUEUED",
        "BYTES",
        "OLDEST",
        "IN FLIGHT",
        "ACKED/s",
        "ACKED",
        "RESENT",
        "EVICT/REJ/EXP"
    );
    for u in b.upstreams() {
        let oldest = b.up("edgeferry_queue_oldest_age_seconds", &u);
        let acked = format!("edgeferry_uplink_acked_total{{upstream=\"{u}\"}}");
        let _ = writeln!(
            out,
            "{:<12} {:<16} {:>9} {:>10} {:>9} {:>9} {:>8.0} {:>10} {:>7} {:>13}",
            u,
            if b.up("edgeferry_uplink_connected", &u) == 1.0 {
                "up".to_string()
            } else {
                down_state(b, &u)
            },
            b.by_priority("edgeferry_queue_events", &u),
            ByteSize(b.by_priority("edgeferry_queue_bytes", &u) as u64).to_string(),
            if oldest > 0.0 {
                age(oldest)
            } else {
                "-".into()
            },
            b.up("edgeferry_uplink_inflight", &u),
            r.rate(&acked),
            b.get(&acked),
            b.up("edgeferry_uplink_resent_total", &u),
            format!(
                "{}/{}/{}",
                b.by_priority("edgeferry_queue_evicted_total", &u),
                b.by_priority("edgeferry_queue_rejected_total", &u),
                b.by_priority("edgeferry_queue_expired_total", &u)
            ),
        );
    }
}

/// What `edgeferry status` prints when the daemon cannot be asked:
/// `headline`, then the queue file's stats.
pub fn render_offline(headline: &str, db: &Path) -> String {
    let mut out = format!("{headline}.\nQueue file {}:\n", db.display());
    let mut table = Vec::new();
    match crate::inspect::stats(db, &mut table) {
        Ok(()) => out.push_str(&String::from_utf8_lossy(&table)),
        Err(e) => {
            let _ = writeln!(out, "  cannot read it: {e}");
        }
    }
    out
}

/// "3h 5m", "12s": the two largest units of an age in seconds.
fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_parse_and_ages_read_well() {
        let s = Scrape::parse(
            "# HELP x y\nedgeferry_uplink_connected{upstream=\"cloud\"} 1\nedgeferry_rules 9\nedgeferry_queue_events{upstream=\"cloud\",priority=\"high\"} 2\n",
        );
        assert_eq!(s.upstreams(), ["cloud"]);
        assert_eq!(s.get("edgeferry_rules"), 9.0);
        assert_eq!(s.by_priority("edgeferry_queue_events", "cloud"), 2.0);
        assert_eq!(age(5.0), "5s");
        assert_eq!(age(125.0), "2m 5s");
        assert_eq!(age(7500.0), "2h 5m");
        assert_eq!(age(90_000.0), "1d 1h");
    }
}
