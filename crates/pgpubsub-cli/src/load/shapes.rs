//! `load-fanout --shapes`: shapes' snapshots at scale. A table of `--rows`
//! rows; `--clients` WebSocket clients open a shape of the whole table with
//! its snapshot, all at once; each counts its rows up to `ready`. Then one
//! row is written, and every client must get it as a change (the hand-over
//! to the log, live). The report: time to every `ready`, rows per second,
//! the gateway's CPU, and its peak memory against before the run (it
//! streams a snapshot: a million rows must not be held at once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pgpubsub::db::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::child::{self, Proc};
use super::fanout_args::{subscribers, FanoutArgs};
use super::proc;

const TABLE: &str = "pgpubsub_fanout_shape";

/// What the clients share.
struct Tally {
    rows: AtomicU64,
    ready: AtomicU64,
    live: AtomicU64,
    /// Microseconds from the request to `ready`.
    to_ready: Mutex<Histogram<u64>>,
}

/// One client: the shape, its rows to `ready`, then the live row.
async fn client(addr: String, expected: u64, tally: Arc<Tally>) -> anyhow::Result<u64> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().max_message_size(Some(256 << 20));
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), Some(config), true)
        .await
        .context("connecting a client")?;
    let began = Instant::now();
    ws.send(Message::text(json!({"table": TABLE, "snapshot": true}).to_string())).await?;
    let mut rows = 0u64;
    let mut ready = false;
    // A client that hears nothing for this long has stalled: said, not waited on.
    const STALL: Duration = Duration::from_secs(120);
    loop {
        let m = tokio::time::timeout(STALL, ws.next())
            .await
            .with_context(|| format!("no message for {}s after {rows} rows", STALL.as_secs()))?;
        let Some(m) = m else { bail!("the gateway closed the connection after {rows} rows") };
        let Message::Text(text) = m? else { continue };
        let v: Value = serde_json::from_str(&text)?;
        match v["type"].as_str() {
            Some("snapshot") => {
                let n = v["rows"].as_array().map_or(0, Vec::len) as u64;
                rows += n;
                tally.rows.fetch_add(n, Ordering::Relaxed);
            }
            Some("ready") => {
                ready = true;
                tally.ready.fetch_add(1, Ordering::Relaxed);
                let _ =
                    tally.to_ready.lock().unwrap_or_else(|e| e.into_inner()).record(began.elapsed().as_micros() as u64);
            }
            Some("event") if ready => {
                tally.live.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Some("error") => bail!("the gateway refused the shape: {}", v["error"]),
            _ => {}
        }
    }
    if rows != expected {
        bail!("a client got {rows} rows of {expected}");
    }
    Ok(rows)
}

/// `load-fanout --shapes`.
pub async fn shapes(config: &Config, url: &str, args: &FanoutArgs) -> anyhow::Result<()> {
    let admin = crate::cmd::connect(config).await?;
    let made = Instant::now();
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE};
             CREATE TABLE {TABLE} (id bigint PRIMARY KEY, status text NOT NULL, qty int NOT NULL, pad text);
             INSERT INTO {TABLE} SELECT g, (ARRAY['new','paid','void'])[1 + g % 3], g % 1000, repeat('x', {})
                 FROM generate_series(1, {}) g;
             SELECT pubsub.watch('{TABLE}');",
            args.payload, args.rows
        ))
        .await
        .context("creating the table")?;
    admin.batch_execute(&format!("VACUUM ANALYZE {TABLE}")).await.context("vacuuming the table")?;
    eprintln!("{} rows written in {:.1}s", args.rows, made.elapsed().as_secs_f64());
    // The baseline, in this process: the same rows as JSON by one plain
    // SELECT on one connection (what a page would cost without pgpubsub).
    let read = Instant::now();
    let plain = admin
        .query(&format!("SELECT row_to_json(t)::text FROM {TABLE} t"), &[])
        .await
        .context("the baseline SELECT")?
        .len();
    let baseline = read.elapsed();
    eprintln!("baseline: one SELECT of the {plain} rows as JSON in {:.2}s", baseline.as_secs_f64());
    let max = (args.clients + 1000).to_string();
    let mut server = Proc::spawn(
        {
            let mut c = child::pgpubsub(url)?;
            c.args(["serve", "--bind", "127.0.0.1:0", "--channel", TABLE, "--max-connections", &max]);
            c
        },
        None,
    )?;
    server.wait_for("serving on http://").await.context("pgpubsub serve")?;
    let addr = server.after("serving on http://").and_then(|r| r.split_whitespace().next().map(str::to_string));
    let addr = addr.context("the server's address")?;
    let before = proc::usage(server.pid()).unwrap_or_default();
    let tally = Arc::new(Tally {
        rows: AtomicU64::new(0),
        ready: AtomicU64::new(0),
        live: AtomicU64::new(0),
        to_ready: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
    });
    let start = Instant::now();
    let clients: Vec<_> =
        (0..args.clients).map(|_| tokio::spawn(client(addr.clone(), args.rows, tally.clone()))).collect();
    let mut peak = before.peak_rss;
    let deadline = start + Duration::from_secs(3600);
    let mut said = Instant::now();
    while tally.ready.load(Ordering::Relaxed) < args.clients as u64 {
        if Instant::now() > deadline || clients.iter().all(|c| c.is_finished()) {
            break;
        }
        if said.elapsed() >= Duration::from_secs(5) {
            said = Instant::now();
            let (ready, rows) = (tally.ready.load(Ordering::Relaxed), tally.rows.load(Ordering::Relaxed));
            eprintln!(
                "{:.0}s: {ready} of {} clients ready, {rows} rows delivered",
                start.elapsed().as_secs_f64(),
                args.clients
            );
        }
        peak = peak.max(proc::usage(server.pid()).map_or(0, |u| u.peak_rss));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_ready = start.elapsed();
    let cpu_ns = proc::usage(server.pid()).map_or(0, |u| u.cpu_ns).saturating_sub(before.cpu_ns);
    // Live after the snapshot: one row, to every client.
    while (subscribers(&addr).await as usize) < args.clients && !clients.iter().all(|c| c.is_finished()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.execute(&format!("INSERT INTO {TABLE} VALUES (0, 'new', 0, 'live')"), &[]).await?;
    for c in clients {
        c.await??;
    }
    peak = peak.max(proc::usage(server.pid()).map_or(0, |u| u.peak_rss));
    server.kill();
    let h = tally.to_ready.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let rows = tally.rows.load(Ordering::Relaxed);
    let report = json!({
        "clients": args.clients,
        "rows_per_shape": args.rows,
        "row_bytes_padding": args.payload,
        "rows_delivered": rows,
        "live_deliveries": tally.live.load(Ordering::Relaxed),
        "seconds_to_all_ready": all_ready.as_secs_f64(),
        "to_ready_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": h.max() as f64 / 1000.0},
        "rows_per_s": rows as f64 / all_ready.as_secs_f64(),
        "baseline_select_s": baseline.as_secs_f64(),
        // All clients' snapshots against as many plain SELECTs one after another.
        "vs_baseline": all_ready.as_secs_f64() / (baseline.as_secs_f64() * args.clients as f64),
        "gateway_cpu_s": cpu_ns as f64 / 1e9,
        "gateway_rss_before_mib": before.rss as f64 / (1 << 20) as f64,
        "gateway_peak_rss_mib": peak as f64 / (1 << 20) as f64,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    let _ = admin.batch_execute(&format!("SELECT pubsub.unwatch('{TABLE}'); DROP TABLE IF EXISTS {TABLE}")).await;
    if tally.live.load(Ordering::Relaxed) != args.clients as u64 {
        bail!("{} of {} clients got the live row", tally.live.load(Ordering::Relaxed), args.clients);
    }
    Ok(())
}
