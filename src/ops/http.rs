//! The metrics endpoint: `GET /metrics` (Prometheus / OpenMetrics text),
//! `GET /health` (200 while the pipeline answers, 503 when it is stuck) and
//! `GET /trace[?filter=F]` (the live trace `edgeferry tail` reads: JSON
//! lines until the client goes; at most four at once, outside the limits
//! below).
//!
//! A few dozen lines of HTTP/1.1 on a tokio listener rather than a web
//! framework: two read-only GETs do not need routing or keep-alive, and the
//! Pi binary stays small. Requests are bounded: 8 KiB of headers, 2 s to
//! send them, 5 s per connection in all, 16 connections at once. Beyond
//! those, `/health` is still answered and anything else gets a 503 that
//! says "busy" (not "stuck"), so slow clients cannot make a supervisor read
//! the gateway as down; anything malformed gets a 4xx and the connection is
//! closed. The queue figures come from the writer's memory (no table scan),
//! so a scrape stays cheap however large the backlog.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use super::prometheus::{self, Snapshot};
use crate::metrics::Metrics;
use crate::queue::QueueHandle;

const MAX_REQUEST: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole connection, from accept to the last byte of the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape waits for the queue writer's figures.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_CONNECTIONS: usize = 16;
/// Connections beyond those answered at once (`/health`, or "busy").
const OVERFLOW_HANDLERS: usize = 64;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {addr} for metrics: {source} (set metrics.listen, or metrics.enabled = false)"
)]
pub struct HttpError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Bind now (so a port in use fails the start), serve later.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError { addr, source })
}

/// Serve until shutdown.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    queue: QueueHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics on http://{addr}/metrics, health on /health");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let traces = Arc::new(Semaphore::new(MAX_TRACES));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_HANDLERS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, typically: the connection stays in
                // the backlog, so accepting again at once would spin.
                warn!(error = %e, "metrics endpoint cannot accept connections; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the limit: /health is still answered (it costs nothing
            // and a supervisor must not read "busy" as "down"); anything
            // else is told at once that the endpoint is busy, not stuck.
            // Past OVERFLOW_HANDLERS of those at once, the socket is closed.
            let Ok(overflow) = overflow.clone().try_acquire_owned() else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(READ_TIMEOUT, async {
                    let head = read_head(&mut stream).await;
                    let (status, content_type, body) = match &head {
                        Some((_, path)) if path == "/health" => health(&metrics),
                        _ => (
                            503,
                            "text/plain",
                            format!("busy: all {MAX_CONNECTIONS} connections of the metrics endpoint are in use (not stuck; /health is answered regardless)\n"),
                        ),
                    };
                    let head_only = head.as_ref().is_some_and(|(m, _)| m == "HEAD");
                    respond(&mut stream, status, content_type, &body, head_only).await?;
                    // Take in the rest before closing: closing with unread
                    // data resets the connection, and the client could lose
                    // the answer.
                    let mut sink = [0u8; 1024];
                    while stream.read(&mut sink).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                })
                .await;
                drop(overflow);
            });
            continue;
        };
        let metrics = metrics.clone();
        let queue = queue.clone();
        let traces = traces.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let served = tokio::time::timeout(
                CONNECTION_TIMEOUT,
                handle(stream, &metrics, &queue, &traces),
            );
            match served.await {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(trace))) => {
                    // A tail: no deadline, its own limit, not a slot.
                    drop(slot);
                    trace_stream(trace, &metrics, shutdown).await;
                    return;
                }
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => debug!(%peer, "metrics request timed out"),
            }
            drop(slot);
        });
    }
}

/// The request line's method and path, once the head is complete; `None`
/// for a head that is incomplete, too large or not a request.
async fn read_head(stream: &mut TcpStream) -> Option<(String, String)> {
    read_request(stream).await.map(|(m, p, _)| (m, p))
}

/// The request line's method, path and query (after `?`, "" if none).
async fn read_request(stream: &mut TcpStream) -> Option<(String, String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some((method, path.to_string(), query.to_string()))
}

/// A `GET /trace` whose answer has begun: what to stream, to whom.
struct TraceRequest {
    stream: TcpStream,
    filter: Option<crate::topic::Pattern>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Arc<Metrics>,
    queue: &QueueHandle,
    traces: &Arc<Semaphore>,
) -> std::io::Result<Option<TraceRequest>> {
    let request = tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream))
        .await
        .ok()
        .flatten();
    if let Some((method, path, query)) = &request
        && method == "GET"
        && path == "/trace"
    {
        return trace_request(stream, query, traces).await;
    }
    let head = request.map(|(m, p, _)| (m, p));
    let (status, content_type, body) = match &head {
        None => (400, "text/plain", "bad request\n".to_string()),
        Some((method, _)) if method != "GET" && method != "HEAD" => {
            (405, "text/plain", "only GET\n".to_string())
        }
        Some((_, path)) => match path.as_str() {
            "/metrics" => {
                // A stuck writer leaves the queue series out rather than
                // hanging the scrape (and /health says why).
                let queue = tokio::time::timeout(QUEUE_TIMEOUT, queue.stats())
                    .await
                    .ok()
                    .and_then(Result::ok);
                let snapshot = Snapshot {
                    queue,
                    process: super::process::Process::read(),
                };
                (
                    200,
                    // What prometheus-client writes (`# EOF`, `_total` samples).
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    prometheus::render(metrics, snapshot),
                )
            }
            "/health" => health(metrics),
            _ => (
                404,
                "text/plain",
                "not found: try /metrics, /health or /trace\n".to_string(),
            ),
        },
    };
    let head_only = head.as_ref().is_some_and(|(m, _)| m == "HEAD");
    respond(&mut stream, status, content_type, &body, head_only).await?;
    Ok(None)
}

/// Tails at once; one more is told so.
const MAX_TRACES: usize = 4;

/// Start answering `GET /trace[?filter=F]`: the head of a stream of JSON
/// lines (`trace_stream` sends them), or why not.
async fn trace_request(
    mut stream: TcpStream,
    query: &str,
    traces: &Arc<Semaphore>,
) -> std::io::Result<Option<TraceRequest>> {
    let filter = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("filter="))
        .map(crate::percent::decode_query)
        .filter(|f| !f.is_empty());
    let filter = match filter.as_deref().map(crate::topic::Pattern::parse) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            let body = format!("invalid filter: {e}\n");
            respond(&mut stream, 400, "text/plain", &body, false).await?;
            return Ok(None);
        }
    };
    let Ok(permit) = traces.clone().try_acquire_owned() else {
        let body = format!("busy: {MAX_TRACES} tails are already reading the trace\n");
        respond(&mut stream, 503, "text/plain", &body, false).await?;
        return Ok(None);
    };
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
        )
        .await?;
    Ok(Some(TraceRequest {
        stream,
        filter,
        _permit: permit,
    }))
}

/// Send each traced event the filter matches, one JSON line each, until
/// the client goes or the daemon stops. A client that reads too slowly is
/// told how many lines it lost.
async fn trace_stream(mut t: TraceRequest, metrics: &Metrics, mut shutdown: watch::Receiver<bool>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut watch = metrics.trace.watch();
    let mut sink = [0u8; 256];
    // What this client was shown, so that a row's `queued` and `acked`
    // lines follow their event through the filter (bounded: forgotten
    // wholesale past SHOWN, which only costs a few such lines).
    const SHOWN: usize = 10_000;
    let mut events: std::collections::HashSet<String> = Default::default();
    let mut rows: std::collections::HashSet<i64> = Default::default();
    loop {
        let line = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            // The client closing (or sending anything) ends it.
            _ = t.stream.read(&mut sink) => return,
            line = watch.lines.recv() => line,
        };
        let text = match line {
            Ok(line) => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let wanted = if let Some(q) = v.get("queued") {
                    let shown = q["event_id"].as_str().is_some_and(|e| events.contains(e));
                    if shown && let Some(id) = q["id"].as_i64() {
                        rows.insert(id);
                    }
                    shown
                } else if let Some(a) = v.get("acked") {
                    a["id"].as_i64().is_some_and(|id| rows.remove(&id))
                } else {
                    let topic = v["topic"].as_str().unwrap_or("");
                    let shown = t
                        .filter
                        .as_ref()
                        .is_none_or(|f| f.captures(topic).is_some());
                    if shown && let Some(e) = v["event_id"].as_str() {
                        if events.len() >= SHOWN {
                            events.clear();
                        }
                        events.insert(e.to_string());
                    }
                    shown
                };
                if rows.len() >= SHOWN {
                    rows.clear();
                }
                if !wanted {
                    continue;
                }
                format!("{line}\n")
            }
            Err(RecvError::Lagged(n)) => format!("{{\"lost\":{n}}}\n"),
            Err(RecvError::Closed) => return,
        };
        if t.stream.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// Healthy while the health stage's probe passes: the queue writer answers
/// and the router moves when events wait (the same probe that gates the
/// systemd watchdog). Measured on the monotonic clock: a Pi sets its wall
/// clock late, by NTP.
fn health(metrics: &Metrics) -> (u16, &'static str, String) {
    let every = metrics.health_every_ms.load(Relaxed).max(1);
    let last = metrics.healthy_ms.load(Relaxed);
    let age = metrics.uptime_ms().saturating_sub(last);
    if last > 0 && age <= 3 * every {
        (200, "text/plain", "ok\n".to_string())
    } else if last == 0 {
        (
            503,
            "text/plain",
            "starting: the pipeline has not answered yet\n".to_string(),
        )
    } else {
        (
            503,
            "text/plain",
            format!(
                "stuck: the pipeline (queue writer or router) has not moved for {:.1}s; see the log\n",
                age as f64 / 1e3
            ),
        )
    }
}
