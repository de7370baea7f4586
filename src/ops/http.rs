//! The metrics endpoint: `GET /metrics` (Prometheus / OpenMetrics text) and
//! `GET /health` (200 while the pipeline answers, 503 when it is stuck).
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
        tokio::spawn(async move {
            let served = tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &metrics, &queue));
            match served.await {
                Ok(Ok(())) => {}
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
    let path = parts
        .next()
        .unwrap_or("")
        .split('?')
        .next()
        .unwrap_or("")
        .to_string();
    Some((method, path))
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Arc<Metrics>,
    queue: &QueueHandle,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .ok()
        .flatten();
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
                "not found: try /metrics or /health\n".to_string(),
            ),
        },
    };
    let head_only = head.as_ref().is_some_and(|(m, _)| m == "HEAD");
    respond(&mut stream, status, content_type, &body, head_only).await
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
