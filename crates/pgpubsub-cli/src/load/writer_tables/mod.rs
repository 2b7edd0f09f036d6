//! `pgpubsub load --scenario writer-tables`: do watched tables slow
//! concurrent writers? The Rust port of `scripts/writers` (which stays, as
//! the pgbench cross-check).
//!
//! For each writer count (default 1, 4 and 32), single-row writers insert
//! into four tables side by side, one after the other, for the same time
//! each: a plain table, the seed's trigger (`pg_notify` of
//! `row_to_json(NEW)`), `watch --inline` and the default `watch` (log only).
//! Then, at `--publishers` clients, `pubsub.publish` of a `--payload`-byte
//! message against a plain INSERT of the same text. One
//! `pgpubsub listen --json --received-at` child runs throughout on every
//! channel. Each writer is a connection of this process that sends one
//! prepared statement at a time (autocommit: one row, one transaction),
//! stamping the row with its clock as it sends it.
//!
//! Per run: writes/s and their ratio to the plain table's at the same
//! writer count, delivery p50/p99 (the writer's stamp to the listener's
//! printed line), listener CPU per event, the database's CPU per write
//! (backends of this database and the server's background processes, from
//! /proc: so only with the server on this machine) and the whole machine's
//! CPU per write, and whether every row was delivered. `--rounds N`
//! repeats the whole sweep with the tables' order rotated and reports
//! medians, since one run on a shared 2-core machine can be far off.

use std::time::Duration;

use anyhow::{bail, Context};
use pgpubsub::db::Config;
use serde::Serialize;
use tokio_postgres::Client;

use super::probe::Probe;
use super::workload::teardown;

/// How long a run's delivery may make no progress before the missing
/// events are counted as lost.
mod capture;
mod listen;
mod pin;
mod round;
mod table;
mod tables;
mod target;

use self::capture::{Capture, Gateway};
use self::listen::Listener;
use self::pin::Pin;
use self::round::one_run;
use self::table::table;
use self::tables::setup;
pub use self::target::Target;

const SETTLE: Duration = Duration::from_secs(15);

/// Writer ids are `run × RUN_IDS + writer`, so every event names its run.
const RUN_IDS: i32 = 1000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Writer counts, each a round over the four tables.
    pub writers: Vec<usize>,
    /// How long each run writes.
    pub per_run: Duration,
    /// Clients of the publish comparison (0: none).
    pub publishers: usize,
    /// Bytes of each published (and inserted) message.
    pub payload: usize,
    /// Times the whole sweep runs, the tables' order rotated each time;
    /// more than one reports medians.
    pub rounds: usize,
    /// PostgreSQL and the writers on CPU 0, pgpubsub's processes on CPU 1
    /// (`taskset`), as if pgpubsub ran on a host of its own.
    pub pin: bool,
    /// Only these targets (with the baselines they are compared with);
    /// empty: all of them.
    pub only: Vec<Target>,
}

impl Options {
    /// The targets of one writer count (`publishing`: the publish
    /// comparison), as `only` narrows them.
    fn targets(&self, wal: bool, publishing: bool) -> Vec<Target> {
        let all = if publishing { Target::publishing(wal) } else { Target::tables(wal) };
        if !self.only.is_empty() && !all.iter().any(|t| self.only.contains(t)) {
            return Vec::new();
        }
        all.into_iter().filter(|t| self.only.is_empty() || self.only.contains(t) || t.baseline() == *t).collect()
    }
}

/// The figures of one writer count and target, over every round.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub writers: usize,
    pub target: Target,
    /// Rows written in all rounds.
    pub rows: u64,
    pub seconds: f64,
    /// The median over rounds.
    pub writes_per_s: f64,
    /// writes/s ÷ those of the plain table (of the plain INSERT, for
    /// publish) at the same writer count in the same round; the median.
    pub ratio: f64,
    /// Each round's ratio.
    pub ratios: Vec<f64>,
    /// Distinct events the listener printed (None: the target sends none).
    pub delivered: Option<u64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub listener_cpu_us_per_event: Option<f64>,
    /// WAL targets: distinct events an SSE subscriber of `pgpubsub serve` received.
    pub sse_delivered: Option<u64>,
    /// WAL targets: the capturer's CPU per event appended.
    pub capture_cpu_us_per_event: Option<f64>,
    /// WAL targets: bytes of WAL the slot had not confirmed when the writers
    /// stopped (the largest over rounds).
    pub slot_lag_bytes: Option<u64>,
    /// Backends of this database plus the server's background processes.
    pub db_cpu_us_per_write: Option<f64>,
    pub machine_cpu_us_per_write: Option<f64>,
}

/// What one run measured, before it is summed up.
struct Raw {
    round: usize,
    writers: usize,
    target: Target,
    rows: u64,
    seconds: f64,
    listener_ns: u64,
    capture_ns: Option<u64>,
    slot_lag: Option<u64>,
    db_ns: Option<u64>,
    machine_ticks: Option<u64>,
}

impl Raw {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.seconds.max(1e-9)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the scenario and prints its table (or JSON).
///
/// # Errors
/// When the database cannot be reached or set up, the listener does not
/// start, a writer fails, or some row was not delivered (after the report).
pub async fn run(config: &Config, url: &str, opts: &Options, json: bool) -> anyhow::Result<()> {
    if opts.writers.is_empty() || opts.writers.iter().any(|&w| w == 0 || w >= RUN_IDS as usize) {
        bail!("--writers: give writer counts from 1 to {}, e.g. 1,4,32", RUN_IDS - 1);
    }
    if opts.publishers >= RUN_IDS as usize {
        bail!("--publishers: at most {}", RUN_IDS - 1);
    }
    let payload = opts.payload.max(24);
    let admin = crate::cmd::connect(config).await?;
    let mut m = crate::cmd::connect(config).await?;
    pgpubsub::migrate::up(&mut m, false).await.context("applying the pubsub schema")?;
    drop(m);
    let wal_level: String = admin.query_one("SHOW wal_level", &[]).await?.get(0);
    let wal = wal_level == "logical";
    if !wal {
        eprintln!(
            "wal_level is {wal_level}: the WAL-watched table and publish_wal are left out \
             (set wal_level = logical and restart the server to measure them)"
        );
    }
    setup(&admin, wal).await?;
    Pin(opts.pin).server_and_writers(&admin).await?;
    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let result = run_all(config, url, opts, payload, &admin, wal).await;
    let cleanup = teardown(&admin).await;
    let reports = result?;
    cleanup?;

    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", table(&reports, opts, payload, &version));
    }
    let mut short: Vec<String> = reports
        .iter()
        .filter(|r| r.delivered.is_some_and(|d| d != r.rows))
        .map(|r| format!("{} writers → {}: {} of {}", r.writers, r.target.name(), r.delivered.unwrap_or(0), r.rows))
        .collect();
    short.extend(reports.iter().filter(|r| r.sse_delivered.is_some_and(|d| d != r.rows)).map(|r| {
        format!("{} writers → {} (SSE): {} of {}", r.writers, r.target.name(), r.sse_delivered.unwrap_or(0), r.rows)
    }));
    if !short.is_empty() {
        bail!("NOT every row delivered: {}", short.join("; "));
    }
    let events: u64 = reports.iter().filter_map(|r| r.delivered).sum();
    println!("every row delivered ({events} events)");
    Ok(())
}

/// Every run, in order, with the listener running throughout.
async fn run_all(
    config: &Config,
    url: &str,
    opts: &Options,
    payload: usize,
    admin: &Client,
    wal: bool,
) -> anyhow::Result<Vec<RunReport>> {
    let mut plan: Vec<(usize, usize, Target)> = Vec::new();
    for round in 0..opts.rounds.max(1) {
        for &w in &opts.writers {
            let mut tables = opts.targets(wal, false);
            let n = tables.len().max(1);
            tables.rotate_left(round % n);
            plan.extend(tables.into_iter().map(|t| (round, w, t)));
        }
        if opts.publishers > 0 {
            let mut pair = opts.targets(wal, true);
            let n = pair.len().max(1);
            pair.rotate_left(round % n);
            plan.extend(pair.into_iter().map(|t| (round, opts.publishers, t)));
        }
    }
    let pin = Pin(opts.pin);
    let listener = Listener::start(url, plan.len(), pin).await?;
    let gateway = if wal { Some(Gateway::start(url, plan.len(), pin).await?) } else { None };
    let mut raws = Vec::new();
    for (i, &(round, writers, target)) in plan.iter().enumerate() {
        let ran = async {
            // The capturer runs for the WAL targets' runs only.
            let capture = if target.wal() { Some(Capture::start(url, admin, pin).await?) } else { None };
            let ran = one_run(
                config,
                admin,
                &listener,
                gateway.as_ref(),
                capture.as_ref(),
                i,
                writers,
                target,
                opts,
                payload,
            )
            .await;
            if let Some(c) = capture {
                c.stop().await;
            }
            ran
        }
        .await
        .with_context(|| format!("{writers} writers → {}", target.name()));
        match ran {
            Ok(mut r) => {
                r.round = round;
                raws.push(r)
            }
            Err(e) => {
                let _ = listener.stop().await;
                if let Some(g) = gateway {
                    let _ = g.stop().await;
                }
                return Err(e);
            }
        }
    }
    let probes = listener.stop().await?;
    let sse = match gateway {
        Some(g) => g.stop().await?,
        None => Vec::new(),
    };
    Ok(summarize(opts, &raws, probes, sse, wal))
}

/// One report per writer count and target, in the order of the first
/// round without rotation: the tables for each count, then publishing.
fn summarize(opts: &Options, raws: &[Raw], probes: Vec<Probe>, sse: Vec<Probe>, wal: bool) -> Vec<RunReport> {
    let mut keys: Vec<(usize, Target)> =
        opts.writers.iter().flat_map(|&w| opts.targets(wal, false).into_iter().map(move |t| (w, t))).collect();
    if opts.publishers > 0 {
        keys.extend(opts.targets(wal, true).into_iter().map(|t| (opts.publishers, t)));
    }
    let mut probes: Vec<Option<Probe>> = probes.into_iter().map(Some).collect();
    let mut reports = Vec::new();
    for (writers, target) in keys {
        let runs: Vec<usize> =
            (0..raws.len()).filter(|&i| raws[i].writers == writers && raws[i].target == target).collect();
        if runs.is_empty() {
            continue;
        }
        let ratios: Vec<f64> = runs
            .iter()
            .map(|&i| {
                let r = &raws[i];
                let base = raws
                    .iter()
                    .find(|b| b.round == r.round && b.writers == writers && b.target == target.baseline())
                    .map_or(r.rate(), Raw::rate);
                r.rate() / base.max(1e-9)
            })
            .collect();
        let rows: u64 = runs.iter().map(|&i| raws[i].rows).sum();
        let per_write = |x: f64| x / rows.max(1) as f64;
        let sum_opt = |f: &dyn Fn(&Raw) -> Option<u64>| runs.iter().map(|&i| f(&raws[i])).sum::<Option<u64>>();
        let mut report = RunReport {
            writers,
            target,
            rows,
            seconds: runs.iter().map(|&i| raws[i].seconds).sum(),
            writes_per_s: median(runs.iter().map(|&i| raws[i].rate()).collect()),
            ratio: median(ratios.clone()),
            ratios,
            delivered: None,
            p50_ms: None,
            p99_ms: None,
            listener_cpu_us_per_event: None,
            sse_delivered: None,
            capture_cpu_us_per_event: None,
            slot_lag_bytes: runs.iter().filter_map(|&i| raws[i].slot_lag).max(),
            db_cpu_us_per_write: sum_opt(&|r| r.db_ns).map(|ns| per_write(ns as f64 / 1000.0)),
            // /proc/stat counts in USER_HZ, 100 per second on Linux.
            machine_cpu_us_per_write: sum_opt(&|r| r.machine_ticks).map(|t| per_write(t as f64 * 10_000.0)),
        };
        if target.channel().is_some() {
            let mut merged = Probe::new();
            let mut distinct = 0;
            for &i in &runs {
                if let Some(p) = probes.get_mut(i).and_then(Option::take) {
                    distinct += p.distinct();
                    let _ = merged.latency.add(&p.latency);
                }
            }
            let q = |x: f64| merged.latency.value_at_quantile(x) as f64 / 1000.0;
            report.delivered = Some(distinct);
            if distinct > 0 {
                report.p50_ms = Some(q(0.5));
                report.p99_ms = Some(q(0.99));
                let ns: u64 = runs.iter().map(|&i| raws[i].listener_ns).sum();
                report.listener_cpu_us_per_event = Some(ns as f64 / 1000.0 / distinct as f64);
                if let Some(ns) = sum_opt(&|r| r.capture_ns) {
                    report.capture_cpu_us_per_event = Some(ns as f64 / 1000.0 / distinct as f64);
                }
            }
            if target.wal() && !sse.is_empty() {
                report.sse_delivered = Some(runs.iter().filter_map(|&i| sse.get(i)).map(Probe::distinct).sum());
            }
        }
        reports.push(report);
    }
    reports
}
