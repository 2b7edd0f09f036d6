//! `pgpubsub load-bridge` (hidden; `scripts/bridge-rate` runs it): one set
//! of batched writes, read by the plain listener (`pgpubsub listen --json
//! --received-at > file`, as `pgpubsub load` measures it) and copied by
//! `pgpubsub bridge` into JetStream, in the same run. Reports each one's
//! events/s, commit-to-delivery latency (commit: when the writer's COMMIT
//! returned; delivery: the listener's `received_at`, or the time JetStream
//! stored the message), and CPU per event of the bridge, the listener and,
//! given its pid, nats-server. With `--drain N`, the bridge is then stopped,
//! N rows are written, and the bridge is timed copying that backlog.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context};
use async_nats::jetstream;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use pgpubsub::db::Config;
use serde_json::Value;

use super::child::{self, Proc};
use super::now_us;

/// CPU time of every thread of `pid`, ns (0 once it has exited).
fn cpu_ns(pid: u32) -> u64 {
    super::proc::usage(pid).map_or(0, |u| u.cpu_ns)
}

const TABLE: &str = "pgpubsub_bench_bridge";

/// Options of `load-bridge`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The NATS server (JetStream on).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Writer connections.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Rows per transaction.
    #[arg(long, default_value_t = 100)]
    pub batch: i64,
    /// Rows in all.
    #[arg(long, default_value_t = 100_000)]
    pub rows: i64,
    /// Bytes of padding per row.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Rows per second in all (default: as fast as the database takes them).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Then time the bridge copying a backlog of this many rows, written
    /// while it was stopped (0: skip).
    #[arg(long, default_value_t = 0)]
    pub drain: i64,
    /// nats-server's pid, to count its CPU per event.
    #[arg(long)]
    pub nats_pid: Option<u32>,
    /// `--max-in-flight` for the bridge.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
}

/// When each writer's batches committed: (last n of the batch, µs).
type Commits = Vec<Vec<(i64, i64)>>;

pub async fn run(config: &Config, url: &str, args: &BenchArgs) -> anyhow::Result<()> {
    if args.rows <= 0 || args.batch <= 0 || args.writers == 0 {
        bail!("--rows, --batch and --writers must be positive");
    }
    let mut admin = crate::cmd::connect(config).await?;
    pgpubsub::migrate::up(&mut admin, false).await.context("migrating")?;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; DELETE FROM pubsub.events WHERE channel = '{TABLE}';
             CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, writer int NOT NULL, n bigint NOT NULL, pad text NOT NULL);
             SELECT pubsub.watch('{TABLE}', '{TABLE}');"
        ))
        .await
        .context("creating the bench table")?;
    let tag = format!("bench{}", std::process::id());
    let stream_name = tag.to_uppercase();
    let bridge_cmd = || -> anyhow::Result<Command> {
        let mut c = child::pgpubsub(url)?;
        c.args([
            "bridge",
            "--nats",
            &args.nats,
            "--channel",
            TABLE,
            "--name",
            &tag,
            "--stream",
            &stream_name,
            "--subject-prefix",
            &tag,
            "--max-in-flight",
            &args.max_in_flight.to_string(),
        ]);
        Ok(c)
    };
    let mut bridge = Proc::spawn(bridge_cmd()?, None)?;
    bridge.wait_for("copying").await?;
    let out_path = std::env::temp_dir().join(format!("{tag}.jsonl"));
    let mut listen = child::pgpubsub(url)?;
    listen.args(["listen", "--channel", TABLE, "--json", "--received-at"]);
    let mut listener = Proc::spawn(listen, Some(std::fs::File::create(&out_path)?))?;
    listener.wait_for("listening").await?;

    let js = jetstream::new(async_nats::connect(&args.nats).await.context("connecting to NATS")?);
    let cpu0 = (cpu_ns(bridge.pid()), cpu_ns(listener.pid()), args.nats_pid.map(cpu_ns));
    let started = now_us();
    let t = Instant::now();
    let commits = write(config, args, 0, args.rows).await?;
    let write_s = t.elapsed().as_secs_f64();
    wait_until(Duration::from_secs(300), || async {
        Ok(lines(&out_path)? >= args.rows as usize && stored(&js, &stream_name).await? >= args.rows as u64)
    })
    .await
    .context("waiting for every event")?;
    let cpu1 = (cpu_ns(bridge.pid()), cpu_ns(listener.pid()), args.nats_pid.map(cpu_ns));

    let (bridge_lat, bridge_last, bridge_n, _) = read_stream(&js, &stream_name, &commits, 1).await?;
    let (listen_lat, listen_last, listen_n) = read_listener(&out_path, &commits)?;
    let per_event = |a: u64, b: u64, n: u64| (b.saturating_sub(a)) as f64 / 1e3 / n.max(1) as f64;
    let rows = args.rows as u64;
    println!(
        "{} writers × {} rows/commit × {} B, {} rows{}: written in {:.2} s ({:.0} rows/s)",
        args.writers,
        args.batch,
        args.payload,
        args.rows,
        args.rate.map(|r| format!(" at {r:.0}/s")).unwrap_or_default(),
        write_s,
        args.rows as f64 / write_s
    );
    println!("| receiver | events | events/s | p50 ms | p99 ms | max ms | CPU µs/event |");
    println!("|---|---|---|---|---|---|---|");
    for (who, n, last, lat, cpu) in [
        ("listen --json > file", listen_n, listen_last, &listen_lat, per_event(cpu0.1, cpu1.1, rows)),
        ("bridge → JetStream", bridge_n, bridge_last, &bridge_lat, per_event(cpu0.0, cpu1.0, rows)),
    ] {
        let secs = (last - started) as f64 / 1e6;
        println!(
            "| {who} | {n} | {:.0} | {:.2} | {:.2} | {:.2} | {cpu:.2} |",
            n as f64 / secs,
            lat.value_at_quantile(0.5) as f64 / 1e3,
            lat.value_at_quantile(0.99) as f64 / 1e3,
            lat.max() as f64 / 1e3
        );
    }
    if let Some((a, b)) = cpu0.2.zip(cpu1.2) {
        println!("nats-server CPU: {:.2} µs/event", per_event(a, b, rows));
    }

    if args.drain > 0 {
        // A clean stop stores the bridge's cursor; the backlog is then
        // written while it is away.
        bridge.terminate().await;
        write(config, args, args.rows, args.drain).await?;
        let cpu0 = args.nats_pid.map(cpu_ns);
        let restarted = now_us();
        let mut bridge = Proc::spawn(bridge_cmd()?, None)?;
        let cpu_b0 = cpu_ns(bridge.pid());
        let total = (args.rows + args.drain) as u64;
        wait_until(Duration::from_secs(300), || async { Ok(stored(&js, &stream_name).await? >= total) })
            .await
            .context("waiting for the backlog")?;
        let cpu_b1 = cpu_ns(bridge.pid());
        let cpu1 = args.nats_pid.map(cpu_ns);
        let (_, last, n, first) = read_stream(&js, &stream_name, &commits, rows + 1).await?;
        println!(
            "backlog of {} rows: copied in {:.2} s from the bridge's start ({:.0} events/s), {:.2} s from its first store \
             ({:.0} events/s); bridge CPU {:.2} µs/event{}",
            n,
            (last - restarted) as f64 / 1e6,
            n as f64 / ((last - restarted) as f64 / 1e6),
            (last - first) as f64 / 1e6,
            n as f64 / ((last - first).max(1) as f64 / 1e6),
            per_event(cpu_b0, cpu_b1, n),
            cpu0.zip(cpu1).map(|(a, b)| format!(", nats-server {:.2} µs/event", per_event(a, b, n))).unwrap_or_default()
        );
        bridge.kill();
    }

    bridge.kill();
    listener.kill();
    let _ = js.delete_stream(&stream_name).await;
    let _ = std::fs::remove_file(&out_path);
    let _ = admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; DELETE FROM pubsub.events WHERE channel = '{TABLE}';
             DELETE FROM pubsub.cursors WHERE name = 'bridge:{tag}'"
        ))
        .await;
    Ok(())
}

/// Writes rows `from..from + count` with `args.writers` connections.
async fn write(config: &Config, args: &BenchArgs, from: i64, count: i64) -> anyhow::Result<Commits> {
    let per_writer = (count + args.writers as i64 - 1) / args.writers as i64;
    let pause = args.rate.map(|r| Duration::from_secs_f64(args.batch as f64 * args.writers as f64 / r));
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let client = crate::cmd::connect(config).await?;
        let (batch, pad) = (args.batch, "x".repeat(args.payload));
        let start = from + w as i64 * per_writer;
        let end = (start + per_writer).min(from + count);
        tasks.push(tokio::spawn(async move {
            let mut commits = Vec::new();
            let statement = client
                .prepare(&format!("INSERT INTO {TABLE} (writer, n, pad) SELECT $1, g, $2 FROM generate_series($3::bigint, $4::bigint) g"))
                .await?;
            let mut next = Instant::now();
            let mut n = start;
            while n < end {
                let last = (n + batch).min(end) - 1;
                client.execute(&statement, &[&(w as i32), &pad, &n, &last]).await?;
                commits.push((last, now_us()));
                n = last + 1;
                if let Some(p) = pause {
                    next += p;
                    tokio::time::sleep_until(next.into()).await;
                }
            }
            Ok::<_, tokio_postgres::Error>(commits)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await?.context("writing")?);
    }
    Ok(all)
}

/// When the row (writer, n) committed.
fn committed(commits: &Commits, writer: usize, n: i64) -> Option<i64> {
    let batches = commits.get(writer)?;
    let at = batches.partition_point(|(last, _)| *last < n);
    batches.get(at).map(|(_, t)| *t)
}

/// Latency (µs) of every message from stream sequence `from` on, the time
/// the last and first were stored, and how many there were.
async fn read_stream(
    js: &jetstream::Context,
    name: &str,
    commits: &Commits,
    from: u64,
) -> anyhow::Result<(Histogram<u64>, i64, u64, i64)> {
    let mut stream = js.get_stream(name).await?;
    let last_seq = stream.info().await?.state.last_sequence;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut n, mut first, mut last) = (0u64, i64::MAX, 0i64);
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), messages.next()).await?.transpose()? {
        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let stored_us = (info.published.unix_timestamp_nanos() / 1000) as i64;
        let seq = info.stream_sequence;
        let event: Value = serde_json::from_slice(&m.payload)?;
        if let Some(c) = row_commit(&event, commits) {
            hist.record((stored_us - c).max(0) as u64)?;
        }
        first = first.min(stored_us);
        last = last.max(stored_us);
        n += 1;
        if seq >= last_seq {
            break;
        }
    }
    Ok((hist, last, n, first))
}

fn row_commit(event: &Value, commits: &Commits) -> Option<i64> {
    let writer = event["new"]["writer"].as_i64()? as usize;
    committed(commits, writer, event["new"]["n"].as_i64()?)
}

/// The listener's latency histogram (µs), its last delivery, and its count.
fn read_listener(path: &std::path::Path, commits: &Commits) -> anyhow::Result<(Histogram<u64>, i64, u64)> {
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut n, mut last) = (0u64, 0i64);
    for line in BufReader::new(std::fs::File::open(path)?).lines() {
        let event: Value = serde_json::from_str(&line?)?;
        let at = event["received_at"].as_str().context("no received_at")?;
        let at = humantime::parse_rfc3339(at)?.duration_since(UNIX_EPOCH)?.as_micros() as i64;
        if let Some(c) = row_commit(&event, commits) {
            hist.record((at - c).max(0) as u64)?;
        }
        last = last.max(at);
        n += 1;
    }
    Ok((hist, last, n))
}

fn lines(path: &std::path::Path) -> anyhow::Result<usize> {
    Ok(std::fs::read(path)?.iter().filter(|&&b| b == b'\n').count())
}

async fn stored(js: &jetstream::Context, name: &str) -> anyhow::Result<u64> {
    Ok(js.get_stream(name).await?.info().await?.state.messages)
}

async fn wait_until<F, Fut>(limit: Duration, check: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
