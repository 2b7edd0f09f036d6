//! `pgpubsub load-fanout` (hidden): the gateway's fan-out, measured with
//! real WebSocket clients. Starts `pgpubsub serve` as a child process (its
//! CPU and memory read from /proc), connects N clients to one channel,
//! publishes timestamped messages, and reports deliveries per second and
//! latency from publish to a client's receipt. With `--nats URL`, the
//! gateway is fed from NATS (`serve --source nats`), through a `pgpubsub
//! bridge` into a stream of the run's own (deleted after), so the two
//! sources compare on the same load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pgpubsub::db::Config;
use tokio_tungstenite::tungstenite::Message;

use super::child::{self, Proc};
use super::probe::now_us;
use super::proc;

pub use super::fanout_args::FanoutArgs;
use super::fanout_args::{http_get, CHANNEL};

/// Runs it and prints the report.
pub async fn run(config: &Config, url: &str, args: &FanoutArgs) -> anyhow::Result<()> {
    let mut admin = crate::cmd::connect(config).await?;
    pgpubsub::migrate::up(&mut admin, false).await?;
    if args.storm {
        return super::storm::storm(config, url, args).await;
    }
    if let Some(duration) = args.idle {
        return super::storm::idle(url, args, duration).await;
    }
    if args.rls {
        return super::rls::rls(config, url, args).await;
    }
    if args.shapes {
        return super::shapes::shapes(config, url, args).await;
    }
    let run = format!("{}_{}", std::process::id(), now_us() % 1_000_000);
    let (stream, prefix) = (format!("PGPUBSUB_FANOUT_{run}"), format!("pgpubsub_fanout_{run}"));
    let mut bridge = None;
    let mut serve_args = vec!["serve", "--bind", "127.0.0.1:0", "--channel", CHANNEL, "--queue", "4096"];
    if let Some(nats) = &args.nats {
        let name = format!("fanout-{run}");
        let bridge_args = [
            "bridge",
            "--nats",
            nats,
            "--channel",
            CHANNEL,
            "--name",
            &name,
            "--stream",
            &stream,
            "--subject-prefix",
            &prefix,
        ];
        let mut b = Proc::spawn(
            {
                let mut c = child::pgpubsub(url)?;
                c.args(bridge_args);
                c
            },
            None,
        )?;
        b.wait_for("copying").await.context("pgpubsub bridge")?;
        bridge = Some(b);
        serve_args.extend(["--source", "nats", nats, "--stream", &stream, "--subject-prefix", &prefix]);
    }
    let mut server = Proc::spawn(
        {
            let mut c = child::pgpubsub(url)?;
            c.args(&serve_args);
            c
        },
        None,
    )?;
    server.wait_for("serving on http://").await.context("pgpubsub serve")?;
    let pid = server.pid();
    let addr = server.after("serving on http://").and_then(|r| r.split_whitespace().next().map(str::to_string));
    let addr = addr.context("the server's address")?;
    let bridge_pid = bridge.as_ref().map(Proc::pid);

    let received = Arc::new(AtomicU64::new(0));
    let lagged = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let first = Arc::new(Mutex::new(None::<Instant>));
    let last = Arc::new(Mutex::new(None::<Instant>));
    let request = serde_json::json!({ "channels": [CHANNEL] }).to_string();
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        // A 16 KiB read buffer: the default 128 KiB is zero-filled on every
        // read, which would make the clients, not the server, the limit.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 << 10);
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), Some(config), true)
            .await
            .context("connecting a client")?;
        ws.send(Message::Text(request.clone().into())).await?;
        let (received, lagged, hist, first, last, expect) =
            (received.clone(), lagged.clone(), hist.clone(), first.clone(), last.clone(), args.events);
        clients.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut got = 0;
            while got < expect {
                let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(15), ws.next()).await else { break };
                let Message::Text(text) = m else { continue };
                let now = now_us();
                // Only what is measured is read: the frame's type and the
                // publish time at the head of the payload (the clients share
                // the machine with the server; their cost is not pgpubsub's).
                if text.starts_with(r#"{"type":"lagged""#) || text.contains(r#""type":"lagged""#) {
                    lagged.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let Some(at) = text.find(r#""payload":""#) else { continue };
                let digits = &text[at + 11..];
                let end = digits.find(':').unwrap_or(0);
                let sent: i64 = digits[..end].parse().unwrap_or(now);
                let _ = local.record((now - sent).max(1) as u64);
                got += 1;
                let at = Instant::now();
                first.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(at);
                *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
            }
            received.fetch_add(got, Ordering::Relaxed);
            let _ = hist.lock().unwrap_or_else(|e| e.into_inner()).add(&local);
        }));
    }
    // Wait for every subscription to exist before publishing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = http_get(&addr, "/healthz").await.unwrap_or_default();
        let n =
            serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["subscribers"].as_u64()).unwrap_or(0);
        if n as usize >= args.clients {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} of {} clients subscribed", args.clients);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_before = proc::usage(pid).map(|u| u.cpu_ns).unwrap_or(0);
    let bridge_before = bridge_pid.and_then(proc::usage).map(|u| u.cpu_ns).unwrap_or(0);

    let channel = pgpubsub::Channel::new(CHANNEL)?;
    let pad = "x".repeat(args.payload);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1e-3));
    let start = Instant::now();
    for i in 0..args.events {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        pgpubsub::publish(&admin, &channel, &format!("{}:{pad}", now_us())).await?;
    }
    for c in clients {
        let _ = c.await;
    }
    let usage = proc::usage(pid).unwrap_or_default();
    let bridge_ns = bridge_pid.and_then(proc::usage).map(|u| u.cpu_ns.saturating_sub(bridge_before)).unwrap_or(0);
    server.kill();
    if let (Some(mut bridge), Some(nats)) = (bridge, &args.nats) {
        bridge.kill();
        if let Ok(client) = async_nats::connect(nats).await {
            let _ = async_nats::jetstream::new(client).delete_stream(&stream).await;
        }
    }

    let total = received.load(Ordering::Relaxed);
    let span = match (*first.lock().unwrap_or_else(|e| e.into_inner()), *last.lock().unwrap_or_else(|e| e.into_inner()))
    {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let h = hist.lock().unwrap_or_else(|e| e.into_inner());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let report = serde_json::json!({
        "source": if args.nats.is_some() { "nats" } else { "postgres" },
        "clients": args.clients,
        "events": args.events,
        "expected_deliveries": args.events * args.clients as u64,
        "deliveries": total,
        "lagged_clients": lagged.load(Ordering::Relaxed),
        "seconds": span,
        "deliveries_per_s": if span > 0.0 { total as f64 / span } else { 0.0 },
        "latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": h.max() as f64 / 1000.0 },
        "server_cpu_ms": (usage.cpu_ns.saturating_sub(cpu_before)) as f64 / 1e6,
        "server_cpu_us_per_delivery": (usage.cpu_ns.saturating_sub(cpu_before)) as f64 / 1e3 / total.max(1) as f64,
        "server_peak_rss_mb": usage.peak_rss as f64 / 1048576.0,
        "bridge_cpu_ms": bridge_ns as f64 / 1e6,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (k, v) in report.as_object().into_iter().flatten() {
            println!("{k:<28} {v}");
        }
    }
    if total < args.events * args.clients as u64 {
        bail!("{} of {} deliveries arrived", total, args.events * args.clients as u64);
    }
    Ok(())
}
