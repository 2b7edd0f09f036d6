//! One run: N writers on one table for the duration, with CPU snapshots around it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgpubsub::db::Config;
use tokio_postgres::Client;

use super::capture::{self, Capture, Gateway};
use super::listen::Listener;
use super::tables::{message, statement};
use super::{Options, Raw, Target, RUN_IDS, SETTLE};
use crate::load::probe::now_us;
use crate::load::proc;

/// CPU counters at one moment.
pub(super) struct Snapshot {
    /// CPU ns of each postgres process of this database (and the server's
    /// background processes); empty if none is on this machine.
    pub(super) db: std::collections::HashMap<i32, u64>,
    /// Busy time of the whole machine, in clock ticks.
    pub(super) machine: Option<u64>,
    pub(super) listener_ns: u64,
}

impl Snapshot {
    pub(super) async fn take(admin: &Client, listener: u32) -> anyhow::Result<Snapshot> {
        let rows = admin
            .query("SELECT pid FROM pg_stat_activity WHERE datname = current_database() OR datname IS NULL", &[])
            .await
            .context("listing the database's processes")?;
        let db = rows
            .iter()
            .map(|r| r.get::<_, i32>(0))
            // Only with the server on this machine: a pid here must be postgres.
            .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
            .filter_map(|pid| proc::usage(pid as u32).map(|u| (pid, u.cpu_ns)))
            .collect();
        let machine = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            let v: Vec<u64> = s.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal …: busy is all but idle and iowait.
            Some(v.iter().sum::<u64>() - v.get(3)? - v.get(4)?)
        });
        Ok(Snapshot { db, machine, listener_ns: proc::usage(listener).map_or(0, |u| u.cpu_ns) })
    }
}

/// One run: `writers` connections write `target` for `per_run`, then wait
/// until the listener has every event (or none came for [`SETTLE`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn one_run(
    config: &Config,
    admin: &Client,
    listener: &Listener,
    gateway: Option<&Gateway>,
    capture: Option<&Capture>,
    run: usize,
    writers: usize,
    target: Target,
    opts: &Options,
    payload: usize,
) -> anyhow::Result<Raw> {
    let per_run = opts.per_run;
    let sql = statement(target);
    let mut clients = Vec::with_capacity(writers);
    let mut config = config.clone();
    config.pg_mut().application_name("pgpubsub load writer");
    for w in 0..writers {
        let client = pgpubsub::db::connect(&config)
            .await
            .with_context(|| format!("connecting writer {} of {writers} (is max_connections large enough?)", w + 1))?;
        let stmt = client.prepare(&sql).await.with_context(|| format!("preparing {sql}"))?;
        clients.push((client, stmt));
    }
    let bar = indicatif::ProgressBar::new(per_run.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>22} {bar:30} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(format!("{writers} writers → {}", target.name()));
    let rows = Arc::new(AtomicU64::new(0));
    let before = Snapshot::take(admin, listener.pid).await?;
    let capture_cpu = || capture.and_then(|c| proc::usage(c.pid)).map(|u| u.cpu_ns);
    let capture_before = capture_cpu();
    let start = Instant::now();
    let deadline = start + per_run;
    let channel = target.channel().unwrap_or_default();
    let mut tasks = Vec::with_capacity(writers);
    for (w, (client, stmt)) in clients.into_iter().enumerate() {
        let (rows, channel) = (rows.clone(), channel.clone());
        let id = run as i32 * RUN_IDS + w as i32;
        tasks.push(tokio::spawn(async move {
            let mut n: i64 = 0;
            while Instant::now() < deadline {
                let t = now_us();
                match target {
                    Target::Insert => client.execute(&stmt, &[&message(id, n, t, payload)]).await?,
                    Target::PublishWal => client.execute(&stmt, &[&channel, &message(id, n, t, payload)]).await?,
                    Target::Publish => {
                        client.query_one(&stmt, &[&channel, &message(id, n, t, payload)]).await?;
                        1
                    }
                    _ => client.execute(&stmt, &[&id, &n, &t]).await?,
                };
                n += 1;
                rows.fetch_add(1, Ordering::Relaxed);
            }
            // The connection is kept open until the run's CPU is read.
            anyhow::Ok((client, n as u64))
        }));
    }
    let (b, r) = (bar.clone(), rows.clone());
    let ticker = tokio::spawn(async move {
        loop {
            let done = start.elapsed();
            b.set_position(done.as_millis() as u64);
            let n = r.load(Ordering::Relaxed);
            b.set_message(format!("{n} rows, {:.0}/s", n as f64 / done.as_secs_f64().max(1e-3)));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut written = 0;
    let mut open = Vec::with_capacity(writers);
    let mut failed = None;
    for t in tasks {
        match t.await.context("a writer panicked")? {
            Ok((client, n)) => {
                written += n;
                open.push(client);
            }
            Err(e) => failed = Some(e),
        }
    }
    let elapsed = start.elapsed();
    let slot_lag = if capture.is_some() { capture::slot_lag(admin).await } else { None };
    ticker.abort();
    if let Some(e) = failed {
        bar.abandon_with_message("a writer failed");
        return Err(e.context("a writer failed"));
    }
    bar.set_position(per_run.as_millis() as u64);
    if target.channel().is_some() {
        // WAL targets: the gateway's subscriber must have them all too.
        let sse = || gateway.filter(|_| target.wal()).map_or(written, |g| g.delivered(run));
        let (mut last, mut last_sse, mut quiet) = (listener.delivered(run), sse(), Duration::ZERO);
        while (last < written || last_sse < written) && quiet < SETTLE {
            bar.set_message(format!("{written} rows; waiting for delivery: {last}/{written}"));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (now, now_sse) = (listener.delivered(run), sse());
            quiet = if (now, now_sse) == (last, last_sse) { quiet + Duration::from_millis(50) } else { Duration::ZERO };
            (last, last_sse) = (now, now_sse);
        }
        bar.finish_with_message(format!(
            "{written} rows, {:.0}/s, delivered {last}",
            written as f64 / elapsed.as_secs_f64()
        ));
    } else {
        bar.finish_with_message(format!("{written} rows, {:.0}/s", written as f64 / elapsed.as_secs_f64()));
    }
    let after = Snapshot::take(admin, listener.pid).await?;

    let db_ns: u64 = after.db.iter().map(|(pid, &ns)| ns.saturating_sub(*before.db.get(pid).unwrap_or(&0))).sum();
    if std::env::var_os("PGPUBSUB_LOAD_DB_PROCESSES").is_some() {
        // Where the database's CPU went, by process kind (for finding costs).
        let rows = admin
            .query("SELECT pid, coalesce(nullif(application_name, ''), backend_type) FROM pg_stat_activity", &[])
            .await?;
        let mut by: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        for r in rows {
            let (pid, name): (i32, String) = (r.get(0), r.get(1));
            if let Some(&ns) = after.db.get(&pid) {
                *by.entry(name).or_default() += ns.saturating_sub(*before.db.get(&pid).unwrap_or(&0));
            }
        }
        let per: Vec<String> = by
            .iter()
            .map(|(k, ns)| format!("{k}: {:.1} µs/write", *ns as f64 / 1000.0 / written.max(1) as f64))
            .collect();
        eprintln!("[db cpu] {writers} writers → {}: {}", target.name(), per.join(", "));
    }
    // Closed only now: the breakdown above finds the writers' backends by
    // their sessions, which end with their connections.
    drop(open);
    Ok(Raw {
        round: 0,
        writers,
        target,
        rows: written,
        seconds: elapsed.as_secs_f64(),
        listener_ns: after.listener_ns.saturating_sub(before.listener_ns),
        capture_ns: capture_before.zip(capture_cpu()).map(|(b, a)| a.saturating_sub(b)),
        slot_lag,
        db_ns: (!after.db.is_empty()).then_some(db_ns),
        machine_ticks: match (before.machine, after.machine) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    })
}
