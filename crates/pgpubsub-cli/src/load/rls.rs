//! `load-fanout --rls`: row-level authorization at fan-out scale. One
//! gateway, `--clients` WebSocket subscribers on one table spread over
//! `--tenants` tenants, rows written at `--rate` spread over the tenants,
//! in two phases against the same gateway:
//!
//! - `filter`: tokens without a role, each subscriber asking for its
//!   tenant's rows with `where` (the gateway's equality filter): the same
//!   deliveries with no authorization at all, the baseline;
//! - `rls`: tokens with a `role` claim and a `tenant` claim, no filter: the
//!   table's policy decides, one class per tenant.
//!
//! Each subscriber counts its tenant's rows (missed when one does not come)
//! and any other tenant's (leaked). The report: deliveries, leaks, misses,
//! latency from the write to receipt, the gateway's CPU per delivery, and
//! the statements per second authorization cost.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pgpubsub::db::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::child::{self, Proc};
use super::fanout_args::{metric, subscribers, until_subscribed, FanoutArgs};
use super::probe::now_us;
use super::proc;

const TABLE: &str = "pgpubsub_fanout_rls";
const ROLE: &str = "pgpubsub_fanout_tenant";

/// What the clients of one phase share.
struct Tally {
    ok: AtomicU64,
    leaked: AtomicU64,
    /// Each client's rows of its own tenant, for counting misses.
    own: Mutex<Vec<HashSet<i64>>>,
    latency: Mutex<Histogram<u64>>,
    stop: AtomicBool,
}

/// The table, its policy and the tenants' role.
async fn setup(admin: &tokio_postgres::Client) -> anyhow::Result<()> {
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {ROLE} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             DROP TABLE IF EXISTS {TABLE};
             CREATE TABLE {TABLE} (id bigint PRIMARY KEY, tenant int NOT NULL, sent bigint NOT NULL, pad text);
             ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY;
             CREATE POLICY by_tenant ON {TABLE} FOR SELECT TO {ROLE}
                 USING (tenant = (current_setting('request.jwt.claims', true)::json ->> 'tenant')::int);
             GRANT SELECT ON {TABLE} TO {ROLE};
             SELECT pubsub.watch('{TABLE}');"
        ))
        .await
        .context("creating the table, its policy and the tenants' role")
}

/// A WebSocket subscriber of tenant `tenant`: counts what arrives until
/// the phase stops.
async fn client(addr: String, request: String, tenant: i64, index: usize, tally: Arc<Tally>) -> anyhow::Result<()> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 << 10);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), Some(config), true)
        .await
        .context("connecting a client")?;
    ws.send(Message::text(request)).await?;
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut own = HashSet::new();
    while !tally.stop.load(Ordering::Relaxed) {
        let m = tokio::select! {
            m = ws.next() => m,
            () = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let Some(Ok(Message::Text(text))) = m else {
            if matches!(m, Some(Ok(_))) {
                continue;
            }
            break;
        };
        if !text.starts_with(r#"{"type":"event""#) {
            continue;
        }
        let now = now_us();
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        let row = &v["event"]["new"];
        let (Some(id), Some(t), Some(sent)) = (row["id"].as_i64(), row["tenant"].as_i64(), row["sent"].as_i64()) else {
            continue;
        };
        if t == tenant {
            own.insert(id);
            tally.ok.fetch_add(1, Ordering::Relaxed);
            let _ = local.record((now - sent).max(1) as u64);
        } else {
            tally.leaked.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = tally.latency.lock().unwrap_or_else(|e| e.into_inner()).add(&local);
    tally.own.lock().unwrap_or_else(|e| e.into_inner())[index] = own;
    Ok(())
}

fn token(secret: &str, claims: &Value) -> anyhow::Result<String> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), claims, &key)?)
}

/// One phase: connect, write, count; its report.
async fn phase(
    admin: &tokio_postgres::Client,
    server: &Proc,
    addr: &str,
    secret: &str,
    args: &FanoutArgs,
    rls: bool,
    first_id: i64,
) -> anyhow::Result<Value> {
    let tenants = args.tenants.max(1) as i64;
    let tally = Arc::new(Tally {
        ok: AtomicU64::new(0),
        leaked: AtomicU64::new(0),
        own: Mutex::new(vec![HashSet::new(); args.clients]),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        stop: AtomicBool::new(false),
    });
    let exp = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600) as i64;
    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let tenant = i as i64 % tenants;
        let request = if rls {
            let claims = json!({"exp": exp, "read": [TABLE], "role": ROLE, "tenant": tenant});
            json!({"channels": [TABLE], "token": token(secret, &claims)?})
        } else {
            let claims = json!({"exp": exp, "read": [TABLE]});
            json!({"channels": [TABLE], "token": token(secret, &claims)?, "where": {"tenant": tenant}})
        };
        clients.push(tokio::spawn(client(addr.to_string(), request.to_string(), tenant, i, tally.clone())));
        if i % 500 == 499 {
            // Connect in waves: a burst of thousands of handshakes at once
            // measures the accept queue, not the fan-out.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    until_subscribed(addr, args.clients).await?;
    let statements_before = metric(addr, "pgpubsub_rls_statements_total").await;
    let cpu_before = proc::usage(server.pid()).map(|u| u.cpu_ns).unwrap_or(0);
    let pad = "x".repeat(args.payload);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1e-3));
    let start = Instant::now();
    let insert = admin.prepare(&format!("INSERT INTO {TABLE} VALUES ($1, $2, $3, $4)")).await?;
    for i in 0..args.events as i64 {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        let id = first_id + i;
        admin.execute(&insert, &[&id, &((id % tenants) as i32), &now_us(), &pad]).await?;
    }
    let written = start.elapsed();
    // Every tenant's rows, to every one of its clients.
    let mut per_tenant = vec![0u64; tenants as usize];
    for i in 0..args.events as i64 {
        per_tenant[((first_id + i) % tenants) as usize] += 1;
    }
    let expected: u64 = (0..args.clients).map(|i| per_tenant[i % tenants as usize]).sum();
    let settle = Instant::now() + Duration::from_secs(15);
    while tally.ok.load(Ordering::Relaxed) < expected && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_ns = proc::usage(server.pid()).map(|u| u.cpu_ns).unwrap_or(0).saturating_sub(cpu_before);
    let statements = metric(addr, "pgpubsub_rls_statements_total").await - statements_before;
    tally.stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await??;
    }
    let missed: u64 = {
        let own = tally.own.lock().unwrap_or_else(|e| e.into_inner());
        (0..args.clients).map(|i| per_tenant[i % tenants as usize].saturating_sub(own[i].len() as u64)).sum()
    };
    let ok = tally.ok.load(Ordering::Relaxed);
    let latency = {
        let h = tally.latency.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        json!({ "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": h.max() as f64 / 1000.0 })
    };
    // Let the gateway drop the closed connections before the next phase.
    let deadline = Instant::now() + Duration::from_secs(60);
    while subscribers(addr).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(json!({
        "mode": if rls { "rls" } else { "filter" },
        "rows_written": args.events,
        "write_seconds": written.as_secs_f64(),
        "expected_deliveries": expected,
        "deliveries": ok,
        "missed": missed,
        "leaked": tally.leaked.load(Ordering::Relaxed),
        "latency_ms": latency,
        "gateway_cpu_us_per_delivery": cpu_ns as f64 / 1e3 / ok.max(1) as f64,
        "gateway_cpu_share": cpu_ns as f64 / 1e9 / seconds,
        "authorization_statements_per_s": statements / seconds,
    }))
}

/// `load-fanout --rls`.
pub async fn rls(config: &Config, url: &str, args: &FanoutArgs) -> anyhow::Result<()> {
    let admin = crate::cmd::connect(config).await?;
    setup(&admin).await?;
    let secret = format!("pgpubsub-load-{}-{}", std::process::id(), now_us());
    let max = (args.clients + 1000).to_string();
    let mut server = Proc::spawn(
        {
            let mut c = child::pgpubsub(url)?;
            c.args(["serve", "--bind", "127.0.0.1:0", "--channel", TABLE, "--queue", "4096"]);
            c.args(["--max-connections", &max, "--jwt-secret", &secret]);
            c
        },
        None,
    )?;
    server.wait_for("serving on http://").await.context("pgpubsub serve")?;
    let addr = server.after("serving on http://").and_then(|r| r.split_whitespace().next().map(str::to_string));
    let addr = addr.context("the server's address")?;
    let filter = phase(&admin, &server, &addr, &secret, args, false, 0).await?;
    let rls = phase(&admin, &server, &addr, &secret, args, true, args.events as i64).await?;
    server.kill();
    let report = json!({
        "clients": args.clients,
        "tenants": args.tenants,
        "rate": args.rate,
        "filter": filter,
        "rls": rls,
        "classes": args.tenants.min(args.clients),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    let _ = admin.batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}")).await;
    for r in [&filter, &rls] {
        if r["missed"].as_u64() != Some(0) || r["leaked"].as_u64() != Some(0) {
            bail!("{} mode: {} missed, {} leaked", r["mode"], r["missed"], r["leaked"]);
        }
    }
    Ok(())
}
