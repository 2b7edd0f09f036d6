//! Two more modes of `pgpubsub load-fanout`:
//!
//! - `--storm`: a reconnect storm. N WebSocket clients subscribe and get one
//!   event (so they stand where a live crowd stands: at one position); the
//!   gateway is killed (SIGKILL), `--events` messages are written while it
//!   is down, and it is started again on the same address. Every client
//!   reconnects at once with `since`. The report: how soon each had every
//!   missed event, duplicates and losses, close codes, `/readyz` answers
//!   during the storm, and the reads of the log the gateway made for it.
//! - `--idle DURATION`: N clients subscribe and nothing is published; the
//!   gateway's CPU and the heartbeat bytes the clients receive, per second
//!   (the cost of `--heartbeat`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use pgpubsub::db::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::child::{self, Proc};
use super::fanout_args::{http_get, metric, until_subscribed, FanoutArgs, CHANNEL};
use super::proc;

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Missed events received, by number.
    missed: HashSet<u64>,
    duplicates: u64,
    /// When it had every missed event.
    done: Option<Instant>,
    /// Close codes (or errors) that ended its connections.
    closes: Vec<String>,
}

/// What the clients share with the run: how many stand at a position
/// (have a last id), how many have every missed event.
#[derive(Default)]
struct Crowd {
    positioned: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
}

/// The value of `"key":"…"` in `text` (no escapes in what is looked for).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    Some(&rest[..rest.find('"')?])
}

/// A client that reconnects at once (then every 50 ms) after any drop,
/// resuming from its last id, until the crowd stops; what it saw. It reads
/// no more of each message than it needs (the clients share the machine
/// with the gateway: their cost is not the gateway's).
async fn client(addr: String, want: u64, crowd: Arc<Crowd>) -> Seen {
    let mut seen = Seen::default();
    let mut last_id: Option<String> = None;
    while !crowd.stop.load(Ordering::Relaxed) {
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 << 10);
        let Ok((mut ws, _)) =
            tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), Some(config), true).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut request = json!({"channels": [CHANNEL], "ack": true});
        if let Some(id) = &last_id {
            request["since"] = id.clone().into();
        }
        if ws.send(Message::text(request.to_string())).await.is_err() {
            continue;
        }
        let why = loop {
            let m = tokio::select! {
                m = ws.next() => m,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if crowd.stop.load(Ordering::Relaxed) { return seen }
                    continue;
                }
            };
            let text = match m {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(frame))) => {
                    break frame.map_or("close".into(), |f| u16::from(f.code).to_string())
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => break format!("error: {e}"),
                None => break "ended".into(),
            };
            let event = text.starts_with(r#"{"type":"event""#);
            if !(event || text.starts_with(r#"{"type":"subscribed""#) && last_id.is_none()) {
                continue;
            }
            if last_id.is_none() {
                crowd.positioned.fetch_add(1, Ordering::Relaxed);
            }
            last_id = field(&text, r#""id":""#).map(str::to_string);
            let Some(n) = field(&text, r#""payload":"missed "#).and_then(|n| n.parse::<u64>().ok()) else { continue };
            if !seen.missed.insert(n) {
                seen.duplicates += 1;
            } else if seen.missed.len() as u64 == want {
                seen.done = Some(Instant::now());
                crowd.done.fetch_add(1, Ordering::Relaxed);
            }
        };
        seen.closes.push(why);
    }
    seen
}

/// A free port on 127.0.0.1, for a gateway that must come back there.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn gateway(url: &str, addr: &str, args: &FanoutArgs) -> anyhow::Result<Proc> {
    let mut c = child::pgpubsub(url)?;
    let max = (args.clients + 1000).to_string();
    c.args(["serve", "--bind", addr, "--channel", CHANNEL, "--max-connections", &max]);
    if let Some(h) = args.heartbeat {
        let timeout = humantime::format_duration(h * 3).to_string();
        c.args(["--heartbeat", &humantime::format_duration(h).to_string(), "--heartbeat-timeout", &timeout]);
    }
    if args.replay_alone {
        c.arg("--replay-alone");
    }
    Proc::spawn(c, None)
}

fn connect_all(addr: &str, args: &FanoutArgs, want: u64, crowd: &Arc<Crowd>) -> Vec<tokio::task::JoinHandle<Seen>> {
    (0..args.clients).map(|_| tokio::spawn(client(addr.to_string(), want, crowd.clone()))).collect()
}

fn print(report: &Value, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        for (k, v) in report.as_object().into_iter().flatten() {
            println!("{k:<28} {v}");
        }
    }
    Ok(())
}

/// `load-fanout --storm`.
pub async fn storm(config: &Config, url: &str, args: &FanoutArgs) -> anyhow::Result<()> {
    let admin = crate::cmd::connect(config).await?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut server = gateway(url, &addr, args)?;
    server.wait_for("serving on http://").await.context("pgpubsub serve")?;
    let crowd = Arc::new(Crowd::default());
    let clients = connect_all(&addr, args, args.events, &crowd);
    until_subscribed(&addr, args.clients).await?;
    // One live event: every client stands where a live crowd stands.
    let channel = pgpubsub::Channel::new(CHANNEL)?;
    pgpubsub::publish(&admin, &channel, "live").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (crowd.positioned.load(Ordering::Relaxed) as usize) < args.clients {
        if Instant::now() > deadline {
            bail!("the live event did not reach every client");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    server.kill();
    for from in (1..=args.events).step_by(100) {
        let to = (from + 99).min(args.events) as i64;
        let sql = "SELECT count(pubsub.publish($1, 'missed ' || i)) FROM generate_series($2::bigint, $3::bigint) i";
        admin.execute(sql, &[&CHANNEL, &(from as i64), &to]).await?;
    }
    let restarted = Instant::now();
    let mut server = gateway(url, &addr, args)?;
    server.wait_for("serving on http://").await.context("pgpubsub serve, again")?;
    let serving = restarted.elapsed();
    let pid = server.pid();
    let cpu_before = proc::usage(pid).map(|u| u.cpu_ns).unwrap_or(0);
    let (mut ready, mut unready, mut reasons) = (0u64, 0u64, HashSet::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if crowd.done.load(Ordering::Relaxed) as usize == args.clients || Instant::now() > deadline {
            break;
        }
        let body = http_get(&addr, "/readyz").await.unwrap_or_default();
        match serde_json::from_str::<Value>(&body).ok().filter(|v| v["status"] == "ok") {
            Some(_) => ready += 1,
            None => {
                unready += 1;
                reasons.insert(body.chars().take(200).collect::<String>());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu_ms = proc::usage(pid).map_or(0, |u| u.cpu_ns.saturating_sub(cpu_before)) as f64 / 1e6;
    let reads = metric(&addr, "pgpubsub_replay_reads_total").await;
    let shared = metric(&addr, "pgpubsub_replay_shared_total").await;
    crowd.stop.store(true, Ordering::Relaxed);

    let mut times: Vec<f64> = Vec::new();
    let (mut lost, mut duplicates, mut codes) = (0u64, 0u64, std::collections::BTreeMap::<String, u64>::new());
    for c in clients {
        let s = c.await?;
        lost += args.events - s.missed.len() as u64;
        duplicates += s.duplicates;
        if let Some(done) = s.done {
            times.push(done.duration_since(restarted).as_secs_f64());
        }
        for why in &s.closes {
            *codes.entry(why.chars().take(60).collect()).or_default() += 1;
        }
    }
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times.get(((times.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied();
    let report = json!({
        "mode": if args.replay_alone { "storm, each resume reading alone" } else { "storm, resumes sharing reads" },
        "clients": args.clients,
        "missed_events": args.events,
        "serving_after_s": serving.as_secs_f64(),
        "caught_up_clients": times.len(),
        "caught_up_s": { "p50": q(0.5), "p99": q(0.99), "max": times.last() },
        "lost": lost,
        "duplicates": duplicates,
        "closes": codes,
        "log_reads_for_resumes": reads,
        "resumes_sharing_a_read": shared,
        "readyz_200": ready,
        "readyz_503": unready,
        "readyz_reasons": reasons.into_iter().collect::<Vec<_>>(),
        "server_cpu_ms": cpu_ms,
    });
    print(&report, args.json)?;
    server.kill();
    if lost > 0 {
        bail!("{lost} missed events never arrived");
    }
    Ok(())
}

/// `load-fanout --idle DURATION`.
pub async fn idle(url: &str, args: &FanoutArgs, duration: Duration) -> anyhow::Result<()> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut server = gateway(url, &addr, args)?;
    server.wait_for("serving on http://").await.context("pgpubsub serve")?;
    let frames = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let (addr, frames, bytes) = (addr.clone(), frames.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
            let url = format!("ws://{addr}/ws");
            let mut ws = loop {
                match tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true).await {
                    Ok((ws, _)) => break ws,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100 + (i % 100) as u64)).await,
                }
            };
            let request = json!({"channels": [CHANNEL]}).to_string();
            if ws.send(Message::text(request)).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = ws.next().await {
                // A server frame under 126 bytes: 2 bytes of header.
                let len = match &m {
                    Message::Text(t) => t.len(),
                    Message::Ping(p) => p.len(),
                    _ => continue,
                };
                frames.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(2 + len as u64, Ordering::Relaxed);
            }
        }));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    until_subscribed(&addr, args.clients).await?;
    let pid = server.pid();
    let (f0, b0) = (frames.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
    let before = proc::usage(pid).unwrap_or_default();
    let began = Instant::now();
    tokio::time::sleep(duration).await;
    let after = proc::usage(pid).unwrap_or_default();
    let secs = began.elapsed().as_secs_f64();
    let (f, b) = (frames.load(Ordering::Relaxed) - f0, bytes.load(Ordering::Relaxed) - b0);
    let cpu_s = after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e9;
    let report = json!({
        "mode": "idle",
        "clients": args.clients,
        "heartbeat": args.heartbeat.map_or("15s (default)".to_string(), |h| humantime::format_duration(h).to_string()),
        "seconds": secs,
        "server_cpu_percent_of_a_core": 100.0 * cpu_s / secs,
        "server_cpu_us_per_connection_per_s": cpu_s * 1e6 / secs / args.clients as f64,
        "server_rss_mb": after.rss as f64 / 1048576.0,
        "frames_per_s": f as f64 / secs,
        "websocket_bytes_per_s": b as f64 / secs,
    });
    print(&report, args.json)?;
    server.kill();
    for t in tasks {
        t.abort();
    }
    Ok(())
}
