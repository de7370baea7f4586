//! Load generator and cloud stand-in for the comparison benchmarks (no
//! dependency outside crates.io; the repo's own crates only):
//!
//!   cargo bench --bench loadgen -- sink --listen 127.0.0.1:1884 [--expect N]
//!       A minimal MQTT 3.1.1 server that plays the cloud broker: it answers
//!       CONNECT, PUBACKs every QoS 1 publish at once, answers pings, and
//!       counts what arrives: distinct, duplicate and out-of-order events
//!       per device, and latency from the timestamp in each payload. It
//!       prints a line per second, and exits with a summary once `--expect`
//!       distinct events have arrived (or on Ctrl-C). With `--down-file F`
//!       it plays an outage while F exists: it closes its connections and
//!       drops new ones at once, and keeps its counts across the outage.
//!
//!   cargo bench --bench loadgen -- publish --to 127.0.0.1:1883 --events N \
//!       [--devices 10] [--size 200] [--rate 0] [--qos 1] [--first 0]
//!       One MQTT client per device publishes `sensors/<site>/d<k>/temperature`
//!       events of `--size` bytes carrying a sequence number and a send time
//!       (µs since the epoch), at full speed or `--rate` events/s in all, and
//!       waits for every PUBACK. It prints the PUBACK latency each sensor saw
//!       (from a publish written to its PUBACK; acks come in publish order):
//!       `puback_p50_ms=` and `puback_p99_ms=`.
//!
//! Payload: {"dev":"d3","seq":123,"ts":1795...,"value":21.5,"pad":"xx..."};
//! a sink can tell events apart by (dev, seq).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// cargo bench passes --bench; ignored.
    #[arg(long, hide = true, global = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Command {
    Sink {
        #[arg(long, default_value = "127.0.0.1:1884")]
        listen: SocketAddr,
        /// Exit once this many distinct events arrived (0: run until killed).
        #[arg(long, default_value_t = 0)]
        expect: u64,
        /// While this file exists the sink is "down" (an upstream outage).
        #[arg(long)]
        down_file: Option<std::path::PathBuf>,
    },
    Publish {
        #[arg(long, default_value = "127.0.0.1:1883")]
        to: SocketAddr,
        #[arg(long)]
        events: u64,
        #[arg(long, default_value_t = 10)]
        devices: u64,
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Events per second in all; 0 = as fast as PUBACKs come back.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// First sequence number (to continue a run).
        #[arg(long, default_value_t = 0)]
        first: u64,
        #[arg(long, default_value = "site1")]
        site: String,
    },
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Sink {
            listen,
            expect,
            down_file,
        } => sink(listen, expect, down_file).await,
        Command::Publish {
            to,
            events,
            devices,
            size,
            rate,
            qos,
            first,
            site,
        } => publish(to, events, devices, size, rate, qos, first, &site).await,
    }
}

// ---------------------------------------------------------------- publish

fn payload(dev: u64, seq: u64, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"dev":"d{dev}","seq":{seq},"ts":{},"value":21.5,"pad":""#,
        now_us()
    );
    let mut s = head;
    let fill = size.saturating_sub(s.len() + 2);
    s.push_str(&"x".repeat(fill));
    s.push_str("\"}");
    s.into_bytes()
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    to: SocketAddr,
    events: u64,
    devices: u64,
    size: usize,
    rate: u64,
    qos: u8,
    first: u64,
    site: &str,
) {
    let qos = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let start = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    // PUBACK latencies in µs, per device, merged at the end.
    let waits: Arc<std::sync::Mutex<Vec<u32>>> = Arc::default();
    let mut tasks = Vec::new();
    for dev in 0..devices {
        let count = events / devices + u64::from(dev < events % devices);
        let acked = acked.clone();
        let waits = waits.clone();
        let topic = format!("sensors/{site}/d{dev}/temperature");
        tasks.push(tokio::spawn(async move {
            let id = format!("loadgen-{}-d{dev}", std::process::id());
            let mut opts = MqttOptions::new(id, to.ip().to_string(), to.port());
            opts.set_keep_alive(Duration::from_secs(30))
                .set_inflight(100)
                .set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut el) = AsyncClient::new(opts, 200);
            let done = acked.clone();
            let poller = tokio::spawn(async move {
                let mut mine = 0u64;
                let mut sent = std::collections::VecDeque::new();
                let mut latencies = Vec::with_capacity(count as usize);
                loop {
                    match el.poll().await {
                        Ok(Event::Outgoing(Outgoing::Publish(_))) => sent.push_back(Instant::now()),
                        Ok(Event::Incoming(Incoming::PubAck(_))) => {
                            if let Some(at) = sent.pop_front() {
                                latencies
                                    .push(at.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            }
                            mine += 1;
                            done.fetch_add(1, Relaxed);
                            if mine == count {
                                waits.lock().unwrap().extend(latencies);
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("loadgen d{dev}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            });
            for i in 0..count {
                let seq = first + i;
                client
                    .publish(&topic, qos, false, payload(dev, seq, size))
                    .await
                    .expect("event loop alive");
                if rate > 0 {
                    let due = start
                        + Duration::from_secs_f64((i + 1) as f64 * devices as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            if qos == QoS::AtLeastOnce {
                let _ = poller.await;
            } else {
                poller.abort();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let mut waits = std::mem::take(&mut *waits.lock().unwrap());
    waits.sort_unstable();
    let pct = |p: f64| {
        waits
            .get(((waits.len() as f64 * p) as usize).min(waits.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    println!(
        "published {events} events of {size} bytes from {devices} devices in {secs:.2}s: {:.0} events/s; PUBACKs: {} puback_p50_ms={:.2} puback_p99_ms={:.2}",
        events as f64 / secs,
        acked.load(Relaxed),
        pct(0.50),
        pct(0.99),
    );
}

// ------------------------------------------------------------------- sink

/// What the sink has seen, shared by its connections.
#[derive(Default)]
struct Seen {
    received: u64,
    distinct: u64,
    duplicates: u64,
    out_of_order: u64,
    /// Per device: highest seq seen, and every seq seen (for duplicates).
    devices: HashMap<String, (u64, std::collections::HashSet<u64>)>,
    /// Latencies (µs) since the last report.
    window: Vec<u64>,
    /// All latencies (µs), for the summary.
    all: Vec<u64>,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

impl Seen {
    fn record(&mut self, payload: &[u8]) {
        let now = Instant::now();
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
        self.received += 1;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let (Some(dev), Some(seq)) = (v["dev"].as_str(), v["seq"].as_u64()) else {
            return;
        };
        if let Some(ts) = v["ts"].as_u64() {
            let lat = now_us().saturating_sub(ts);
            self.window.push(lat);
            self.all.push(lat);
        }
        let (highest, seen) = self
            .devices
            .entry(dev.to_string())
            .or_insert_with(|| (0, Default::default()));
        if !seen.insert(seq) {
            self.duplicates += 1;
            return;
        }
        self.distinct += 1;
        if seq < *highest {
            self.out_of_order += 1;
        }
        *highest = (*highest).max(seq);
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Watches `--down-file`: true while it exists (checked every 100 ms).
fn outage(down_file: Option<std::path::PathBuf>) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(down_file.as_ref().is_some_and(|f| f.exists()));
    // The sender lives as long as the sink: a closed channel would end
    // every connection's wait for an outage at once.
    tokio::spawn(async move {
        let Some(f) = down_file else {
            return std::future::pending::<()>().await;
        };
        loop {
            let down = f.exists();
            tx.send_if_modified(|d| std::mem::replace(d, down) != down);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    rx
}

async fn sink(listen: SocketAddr, expect: u64, down_file: Option<std::path::PathBuf>) {
    let listener = TcpListener::bind(listen).await.expect("sink listens");
    println!("sink listening on {}", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let s = seen.clone();
    let down = outage(down_file);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            if *down.borrow() {
                continue; // dropped: the client sees the connection reset
            }
            let _ = stream.set_nodelay(true);
            let (s, mut down) = (s.clone(), down.clone());
            tokio::spawn(async move {
                tokio::select! {
                    r = serve(stream, s) => if let Err(e) = r {
                        eprintln!("sink: connection ended: {e}");
                    },
                    _ = down.wait_for(|d| *d) => {}
                }
            });
        }
    });
    let start = Instant::now();
    let mut last_received = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let mut g = seen.lock().unwrap();
        let mut w = std::mem::take(&mut g.window);
        w.sort_unstable();
        println!(
            "{:>6.1}s received {} (+{}/s) distinct {} duplicates {} out-of-order {} latency p50 {:.2} ms p99 {:.2} ms",
            start.elapsed().as_secs_f64(),
            g.received,
            g.received - last_received,
            g.distinct,
            g.duplicates,
            g.out_of_order,
            percentile(&w, 0.5),
            percentile(&w, 0.99)
        );
        last_received = g.received;
        if expect > 0 && g.distinct >= expect {
            break;
        }
    }
    let mut g = seen.lock().unwrap();
    let mut all = std::mem::take(&mut g.all);
    all.sort_unstable();
    let span = match (g.first_at, g.last_at) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    println!(
        "SUMMARY received={} distinct={} duplicates={} out_of_order={} first_to_last_s={span:.3} rate={:.0} p50_ms={:.2} p99_ms={:.2}",
        g.received,
        g.distinct,
        g.duplicates,
        g.out_of_order,
        if span > 0.0 {
            g.distinct as f64 / span
        } else {
            0.0
        },
        percentile(&all, 0.5),
        percentile(&all, 0.99)
    );
}

/// Whether `buf` starts with a complete MQTT packet.
fn whole_packet(buf: &[u8]) -> bool {
    let mut len = 0usize;
    for (i, b) in buf.iter().skip(1).take(4).enumerate() {
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return buf.len() >= 1 + i + 1 + len;
        }
    }
    false
}

/// One client connection: just enough MQTT 3.1.1 to be a broker that acks.
async fn serve(stream: TcpStream, seen: Arc<std::sync::Mutex<Seen>>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let header = match r.read_u8().await {
            Ok(h) => h,
            Err(_) => return Ok(()),
        };
        let mut len = 0usize;
        for shift in (0..28).step_by(7) {
            let b = r.read_u8().await?;
            len |= ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        match header >> 4 {
            1 => out.extend_from_slice(&[0x20, 0x02, 0x00, 0x00]), // CONNACK
            3 => {
                let qos = (header >> 1) & 3;
                let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
                let mut at = 2 + tlen;
                if qos > 0 {
                    out.extend_from_slice(&[0x40, 0x02, body[at], body[at + 1]]); // PUBACK
                    at += 2;
                }
                seen.lock().unwrap().record(&body[at..]);
            }
            8 => {
                // SUBSCRIBE: grant QoS 1 to each filter.
                let (id, mut at, mut codes) = ([body[0], body[1]], 2, Vec::new());
                while at + 2 <= body.len() {
                    let l = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
                    at += 2 + l + 1;
                    codes.push(1u8);
                }
                out.extend_from_slice(&[0x90, 2 + codes.len() as u8, id[0], id[1]]);
                out.extend_from_slice(&codes);
            }
            12 => out.extend_from_slice(&[0xd0, 0x00]), // PINGRESP
            14 => return Ok(()),                        // DISCONNECT
            _ => {}
        }
        // Write unless a whole next packet is already buffered: a burst is
        // acked in one write, and we never wait to read while acks are held
        // (a client with a full in-flight window would wait for them).
        if !out.is_empty() && !whole_packet(r.buffer()) {
            w.write_all(&out).await?;
            out.clear();
        }
    }
}
