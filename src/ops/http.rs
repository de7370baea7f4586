//! The metrics endpoint: `GET /metrics` (Prometheus text format) and
//! `GET /health` (200 while the pipeline answers, 503 when it is stuck).
//!
//! A few dozen lines of HTTP/1.1 on a tokio listener rather than a web
//! framework: two read-only GETs on loopback do not need routing or
//! keep-alive, and the Pi binary stays small. Requests are bounded (8 KiB of
//! headers, 5 s to send them, 16 connections at once); anything else gets a
//! 4xx and the connection is closed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info};

use super::prometheus::{self, Snapshot};
use crate::event::now_ms;
use crate::metrics::Metrics;

const MAX_REQUEST: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 16;

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
    queue_path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics on http://{addr}/metrics, health on /health");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let queue_path = Arc::new(queue_path);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        // Over the limit: close at once rather than queue work.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        let queue_path = queue_path.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &metrics, &queue_path).await {
                debug!(%peer, error = %e, "metrics request failed");
            }
            drop(slot);
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Arc<Metrics>,
    queue_path: &std::path::Path,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(false);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if buf.len() > MAX_REQUEST {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(head, Ok(Ok(true)));
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = if !complete {
        (400, "text/plain", "bad request\n".to_string())
    } else if method != "GET" && method != "HEAD" {
        (405, "text/plain", "only GET\n".to_string())
    } else {
        match path.split('?').next().unwrap_or("") {
            "/metrics" => {
                let path = queue_path.to_path_buf();
                let queue =
                    tokio::task::spawn_blocking(move || crate::queue::stats_of_file(&path).ok())
                        .await
                        .ok()
                        .flatten();
                let snapshot = Snapshot {
                    queue,
                    rss_bytes: prometheus::rss_bytes(),
                };
                (
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    prometheus::render(metrics, snapshot),
                )
            }
            "/health" => health(metrics),
            _ => (
                404,
                "text/plain",
                "not found: try /metrics or /health\n".to_string(),
            ),
        }
    };
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
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// Healthy while the health stage's probe of the queue writer keeps getting
/// answers (the same probe that gates the systemd watchdog).
fn health(metrics: &Metrics) -> (u16, &'static str, String) {
    let every = metrics.health_every_ms.load(Relaxed).max(1);
    let last = metrics.healthy_ms.load(Relaxed);
    let age = now_ms().saturating_sub(last);
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
                "stuck: the queue writer has not answered for {:.1}s\n",
                age as f64 / 1e3
            ),
        )
    }
}
