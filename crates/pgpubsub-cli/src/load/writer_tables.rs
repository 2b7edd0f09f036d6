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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgpubsub::db::Config;
use serde::Serialize;
use tokio::process::Command;
use tokio_postgres::Client;

use super::probe::{line_tag, now_us, Probe};
use super::proc;
use super::receiver::{received_at, spawn, wait_ready, OutputFile};
use super::workload::{teardown, SCHEMA};

/// How long a run's delivery may make no progress before the missing
/// events are counted as lost.
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
}

/// What one run writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A table with no trigger.
    Plain,
    /// A table with the seed's trigger: `pg_notify` of the row as JSON.
    Seed,
    /// `pubsub.watch(table, channel, true)`: the log, and the event in the
    /// NOTIFY payload.
    Inline,
    /// `pubsub.watch(table, channel)`: the log only.
    Watched,
    /// A plain INSERT of the message text into a table with no trigger.
    Insert,
    /// `pubsub.publish` of the message.
    Publish,
}

impl Target {
    const TABLES: [Target; 4] = [Target::Plain, Target::Seed, Target::Inline, Target::Watched];

    fn name(self) -> &'static str {
        match self {
            Target::Plain => "plain",
            Target::Seed => "seed",
            Target::Inline => "inline",
            Target::Watched => "watched",
            Target::Insert => "insert",
            Target::Publish => "publish",
        }
    }

    /// The channel its events arrive on, if any.
    fn channel(self) -> Option<String> {
        match self {
            Target::Plain | Target::Insert => None,
            t => Some(format!("pgpubsub_load_{}", t.name())),
        }
    }

    /// What its writes/s are compared with.
    fn baseline(self) -> Target {
        match self {
            Target::Insert | Target::Publish => Target::Insert,
            _ => Target::Plain,
        }
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
    setup(&admin).await?;
    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let result = run_all(config, url, opts, payload, &admin).await;
    let cleanup = teardown(&admin).await;
    let reports = result?;
    cleanup?;

    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", table(&reports, opts, payload, &version));
    }
    let short: Vec<String> = reports
        .iter()
        .filter(|r| r.delivered.is_some_and(|d| d != r.rows))
        .map(|r| format!("{} writers → {}: {} of {}", r.writers, r.target.name(), r.delivered.unwrap_or(0), r.rows))
        .collect();
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
) -> anyhow::Result<Vec<RunReport>> {
    let mut plan: Vec<(usize, usize, Target)> = Vec::new();
    for round in 0..opts.rounds.max(1) {
        for &w in &opts.writers {
            let mut tables = Target::TABLES;
            tables.rotate_left(round % Target::TABLES.len());
            plan.extend(tables.into_iter().map(|t| (round, w, t)));
        }
        if opts.publishers > 0 {
            let mut pair = [Target::Insert, Target::Publish];
            pair.rotate_left(round % 2);
            plan.extend(pair.into_iter().map(|t| (round, opts.publishers, t)));
        }
    }
    let listener = Listener::start(url, plan.len()).await?;
    let mut raws = Vec::new();
    for (i, &(round, writers, target)) in plan.iter().enumerate() {
        let ran = one_run(config, admin, &listener, i, writers, target, opts.per_run, payload)
            .await
            .with_context(|| format!("{writers} writers → {}", target.name()));
        match ran {
            Ok(mut r) => {
                r.round = round;
                raws.push(r)
            }
            Err(e) => {
                let _ = listener.stop().await;
                return Err(e);
            }
        }
    }
    let probes = listener.stop().await?;
    Ok(summarize(opts, &raws, probes))
}

/// One report per writer count and target, in the order of the first
/// round without rotation: the tables for each count, then publishing.
fn summarize(opts: &Options, raws: &[Raw], probes: Vec<Probe>) -> Vec<RunReport> {
    let mut keys: Vec<(usize, Target)> =
        opts.writers.iter().flat_map(|&w| Target::TABLES.into_iter().map(move |t| (w, t))).collect();
    if opts.publishers > 0 {
        keys.extend([(opts.publishers, Target::Insert), (opts.publishers, Target::Publish)]);
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
            }
        }
        reports.push(report);
    }
    reports
}

/// The scratch schema: the four tables, the seed's trigger, the watches,
/// and the message table of the publish comparison.
async fn setup(admin: &Client) -> anyhow::Result<()> {
    teardown(admin).await?;
    let mut sql = format!("CREATE SCHEMA {SCHEMA};");
    for t in Target::TABLES {
        sql.push_str(&format!(
            "CREATE TABLE {SCHEMA}.{} (id bigserial PRIMARY KEY, writer int NOT NULL, n bigint NOT NULL, \
             t bigint NOT NULL);",
            t.name()
        ));
    }
    sql.push_str(&format!(
        "CREATE TABLE {SCHEMA}.msgs (id bigserial PRIMARY KEY, payload text NOT NULL);
         CREATE FUNCTION {SCHEMA}.seed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify('{}', row_to_json(NEW)::text); RETURN NULL; END $$;
         CREATE TRIGGER seed AFTER INSERT ON {SCHEMA}.seed FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.seed_notify();",
        Target::Seed.channel().unwrap_or_default()
    ));
    admin.batch_execute(&sql).await.context("creating the load tables")?;
    for (t, inline) in [(Target::Inline, true), (Target::Watched, false)] {
        admin
            .execute(
                "SELECT pubsub.watch($1::text::regclass, $2, $3)",
                &[&format!("{SCHEMA}.{}", t.name()), &t.channel(), &inline],
            )
            .await
            .with_context(|| format!("watching {SCHEMA}.{}", t.name()))?;
    }
    Ok(())
}

/// The statement a writer repeats.
fn statement(target: Target) -> String {
    match target {
        Target::Insert => format!("INSERT INTO {SCHEMA}.msgs (payload) VALUES ($1)"),
        Target::Publish => "SELECT pubsub.publish($1, $2)".into(),
        t => format!("INSERT INTO {SCHEMA}.{} (writer, n, t) VALUES ($1, $2, $3)", t.name()),
    }
}

/// A message of exactly `bytes` bytes (at least its head) that starts with
/// `writer:n:t:`, the tag the probe reads.
fn message(writer: i32, n: i64, t: i64, bytes: usize) -> String {
    let mut m = format!("{writer}:{n}:{t}:");
    let pad = bytes.saturating_sub(m.len());
    m.push_str(&"x".repeat(pad));
    m
}

/// `pgpubsub listen --json --received-at > file` on every channel, and a
/// thread that reads the file as it grows into one probe per run.
struct Listener {
    child: tokio::process::Child,
    pid: u32,
    /// Distinct events per run so far.
    delivered: Arc<Vec<AtomicU64>>,
    stop: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<Vec<Probe>>,
}

impl Listener {
    async fn start(url: &str, runs: usize) -> anyhow::Result<Listener> {
        let output = OutputFile::create()?;
        let channels: Vec<String> = [Target::Seed, Target::Inline, Target::Watched, Target::Publish]
            .iter()
            .filter_map(|t| t.channel())
            .collect();
        let exe = std::env::current_exe().context("finding the pgpubsub binary")?;
        let mut cmd = Command::new(&exe);
        cmd.args(["listen", "--json", "--received-at", "--channel", &channels.join(",")]);
        let (mut child, pid) = spawn(cmd, url, std::process::Stdio::from(output.file.try_clone()?))?;
        wait_ready(&mut child, "listening").await?;
        let delivered: Arc<Vec<AtomicU64>> = Arc::new((0..runs).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (delivered.clone(), stop.clone());
        let reader = std::thread::spawn(move || read(&output, runs, &d, &s));
        Ok(Listener { child, pid, delivered, stop, reader })
    }

    fn delivered(&self, run: usize) -> u64 {
        self.delivered[run].load(Ordering::SeqCst)
    }

    /// Stops the listener, reads its output to the end, and returns the
    /// probes, one per run.
    async fn stop(mut self) -> anyhow::Result<Vec<Probe>> {
        let _ = self.child.kill().await;
        self.stop.store(true, Ordering::SeqCst);
        let reader = self.reader;
        tokio::task::spawn_blocking(move || reader.join())
            .await
            .context("joining the output reader")?
            .map_err(|_| anyhow::anyhow!("the output reader panicked"))
    }
}

/// Reads the listener's lines into one probe per run (the run is in the
/// writer id), until told to stop and at the end of the file.
fn read(output: &OutputFile, runs: usize, delivered: &[AtomicU64], stop: &AtomicBool) -> Vec<Probe> {
    use std::io::BufRead;
    let mut probes: Vec<Probe> = (0..runs).map(|_| Probe::new()).collect();
    // Opened anew: a clone of the listener's descriptor would share its offset.
    let Ok(file) = std::fs::File::open(&output.path) else { return probes };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    loop {
        // Checked before reading, so the read after it sees all the output.
        let stopped = stop.load(Ordering::SeqCst);
        match reader.read_line(&mut line) {
            Ok(0) if stopped => break,
            Ok(0) => std::thread::sleep(Duration::from_millis(10)),
            Ok(_) if line.ends_with('\n') => {
                let now = received_at(&line).unwrap_or_else(now_us);
                if let Some((writer, n, op, t)) = line_tag(&line) {
                    let run = (writer / RUN_IDS) as usize;
                    if let Some(p) = probes.get_mut(run) {
                        let before = p.distinct();
                        p.record(writer, n, op, t, now);
                        if p.distinct() > before {
                            delivered[run].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                line.clear();
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    probes
}

/// CPU counters at one moment.
struct Snapshot {
    /// CPU ns of each postgres process of this database (and the server's
    /// background processes); empty if none is on this machine.
    db: std::collections::HashMap<i32, u64>,
    /// Busy time of the whole machine, in clock ticks.
    machine: Option<u64>,
    listener_ns: u64,
}

impl Snapshot {
    async fn take(admin: &Client, listener: u32) -> anyhow::Result<Snapshot> {
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
async fn one_run(
    config: &Config,
    admin: &Client,
    listener: &Listener,
    run: usize,
    writers: usize,
    target: Target,
    per_run: Duration,
    payload: usize,
) -> anyhow::Result<Raw> {
    let sql = statement(target);
    let mut clients = Vec::with_capacity(writers);
    for w in 0..writers {
        let client = pgpubsub::db::connect(config)
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
    ticker.abort();
    if let Some(e) = failed {
        bar.abandon_with_message("a writer failed");
        return Err(e.context("a writer failed"));
    }
    bar.set_position(per_run.as_millis() as u64);
    if target.channel().is_some() {
        let (mut last, mut quiet) = (listener.delivered(run), Duration::ZERO);
        while last < written && quiet < SETTLE {
            bar.set_message(format!("{written} rows; waiting for delivery: {last}/{written}"));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = listener.delivered(run);
            quiet = if now == last { quiet + Duration::from_millis(50) } else { Duration::ZERO };
            last = now;
        }
        bar.finish_with_message(format!(
            "{written} rows, {:.0}/s, delivered {last}",
            written as f64 / elapsed.as_secs_f64()
        ));
    } else {
        bar.finish_with_message(format!("{written} rows, {:.0}/s", written as f64 / elapsed.as_secs_f64()));
    }
    let after = Snapshot::take(admin, listener.pid).await?;
    drop(open);

    let db_ns: u64 = after.db.iter().map(|(pid, &ns)| ns.saturating_sub(*before.db.get(pid).unwrap_or(&0))).sum();
    Ok(Raw {
        round: 0,
        writers,
        target,
        rows: written,
        seconds: elapsed.as_secs_f64(),
        listener_ns: after.listener_ns.saturating_sub(before.listener_ns),
        db_ns: (!after.db.is_empty()).then_some(db_ns),
        machine_ticks: match (before.machine, after.machine) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    })
}

/// The report as a Markdown table, with what its columns mean.
fn table(reports: &[RunReport], opts: &Options, payload: usize, postgres: &str) -> String {
    let f = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |x| format!("{x:.d$}"));
    let mut o = format!(
        "single-row writers, {} per run, {} round(s) ({}; PostgreSQL {postgres})\n\n\
         | writers | table | writes/s | vs plain | delivered | p50 ms | p99 ms | listener CPU µs/event | DB CPU µs/write | machine CPU µs/write |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        humantime::format_duration(opts.per_run),
        opts.rounds.max(1),
        super::report::machine(),
    );
    for r in reports {
        let name = match r.target {
            Target::Insert | Target::Publish => format!("{} ({payload} B)", r.target.name()),
            t => t.name().to_string(),
        };
        o.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.writers,
            name,
            r.writes_per_s,
            ratio(r),
            r.delivered.map_or("–".into(), |d| format!("{d}/{}", r.rows)),
            f(r.p50_ms, 2),
            f(r.p99_ms, 2),
            f(r.listener_cpu_us_per_event, 1),
            f(r.db_cpu_us_per_write, 1),
            f(r.machine_cpu_us_per_write, 1),
        ));
    }
    o.push_str(
        "\nvs plain: writes/s ÷ the plain table's at the same writer count in the same round (publish: ÷ insert of \
         the same text); with several rounds, writes/s and ratio are medians, the range in brackets.\n\
         seed: the seed's NOTIFY trigger; its notifications reach the listener as foreign (kind notify).\n\
         Latency: the writer's clock as it sent the row, to the line the listener printed.\n\
         DB CPU: this database's backends and the server's background processes (/proc); \
         machine CPU: every process, the writers and the listener included.\n",
    );
    o
}

/// The median ratio, with the range over rounds when there were several.
fn ratio(r: &RunReport) -> String {
    let lo = r.ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if r.ratios.len() > 1 && r.target != r.target.baseline() {
        format!("{:.2} ({lo:.2}–{hi:.2})", r.ratio)
    } else {
        format!("{:.2}", r.ratio)
    }
}
