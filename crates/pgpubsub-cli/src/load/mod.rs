//! `pgpubsub load`: the load test. It drives the real path (writers → watched
//! tables → trigger → NOTIFY → `pgpubsub listen --json` as a child process),
//! beside a bare LISTEN loop on the same notifications (`--baseline`), and
//! reports rates, latency, losses, CPU and memory. See docs/performance.md.
//! The other load tests live here too: `fanout.rs` (the gateway's fan-out,
//! `load-fanout`) and `bridge.rs` (the NATS bridge beside the plain
//! listener, `load-bridge`).

pub mod baseline;
pub mod bridge;
pub mod child;
pub mod fanout;
mod fanout_args;
mod plot;
mod probe;
pub use probe::now_us;
pub mod proc;
mod receiver;
mod report;
mod rls;
mod shapes;
mod storm;
mod workload;
mod writer_tables;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::ValueEnum;
use pgpubsub::db::Config;

use self::receiver::Receivers;
use self::report::{Report, WriteRun};
use self::workload::{Plan, Trigger};

/// The known cliffs, as presets (flags given explicitly override them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 4 writers, one row per commit, 100-byte payloads.
    Single,
    /// 4 writers, 100 rows per commit, 100-byte payloads.
    Batched,
    /// 64 KB payloads (chunked).
    Large64k,
    /// 1 MB payloads (sent by reference).
    Large1m,
    /// 1 MB messages published with `pubsub.publish` (no table): the path
    /// to compare with raw pg_notify, which writes no table either.
    Publish1m,
    /// Raw pg_notify of 7,900-byte payloads: the byte rate the database
    /// sustains, for comparison with the large scenarios (baseline only).
    Raw7900,
    /// 50 tables, one channel each.
    Channels,
    /// 50 extra idle LISTEN connections on the same channel.
    IdleListeners,
    /// 32 concurrent writers, one row per commit.
    Writers,
    /// Do watched tables slow concurrent writers? For each `--writers`
    /// count (default 1,4,32), single-row writers into four tables side by
    /// side (plain, the seed's NOTIFY trigger, `watch --inline`, `watch`),
    /// `--duration` each (default 8s), then `--publishers` clients of
    /// `pubsub.publish` against a plain INSERT. A table of writes/s ratios,
    /// delivery latency and CPU.
    WriterTables,
}

/// Options of `load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// A preset; the flags below override its values.
    #[arg(long, value_enum, default_value = "single")]
    pub scenario: Scenario,
    /// Writer connections; for writer-tables a list of counts (1,4,32).
    #[arg(long, short = 'w', value_delimiter = ',', value_name = "N[,N…]")]
    pub writers: Vec<usize>,
    /// writer-tables: clients of the publish comparison (default 8; 0: none).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// writer-tables: run the sweep this many times, the tables' order
    /// rotated each round, and report medians (the machine is noisy).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// writer-tables: PostgreSQL and the writers on CPU 0, pgpubsub's
    /// processes (capture, listen, serve) on CPU 1, with `taskset`: as if
    /// pgpubsub ran on a host of its own (the server must be on this machine).
    #[arg(long)]
    pub pin: bool,
    /// writer-tables: only these targets (each with the baseline it is
    /// compared with), e.g. `--only wal,watched`.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "TARGET[,…]")]
    pub only: Vec<writer_tables::Target>,
    /// Rows per transaction.
    #[arg(long, short = 'b')]
    pub batch: Option<u64>,
    /// Bytes of payload per row (above ~7,700 the event is chunked).
    #[arg(long, short = 'p')]
    pub payload: Option<usize>,
    /// Rows to write in all.
    #[arg(long, short = 'n')]
    pub rows: Option<u64>,
    /// Write for this long instead of a row count (e.g. 30s, 5m); for
    /// writer-tables, the time of each run.
    #[arg(long, short = 'd', value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Target rows per second in all (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Tables (one channel each).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Extra LISTEN connections that only drain.
    #[arg(long)]
    pub idle_listeners: Option<usize>,
    /// Also update and delete every row (three events per row).
    #[arg(long)]
    pub mixed: bool,
    /// Publish messages (`pubsub.publish`) instead of writing rows.
    #[arg(long, conflicts_with = "mixed")]
    pub publish: bool,
    /// Also receive with a bare tokio-postgres LISTEN loop, for ratios.
    #[arg(long)]
    pub baseline: bool,
    /// Receive with the bare loop only, no pgpubsub: what any listener costs
    /// the writers, to compare with pgpubsub's cost.
    #[arg(long, conflicts_with = "baseline")]
    pub baseline_only: bool,
    /// Also write the same rows with no trigger, a notify-only trigger, and
    /// pgpubsub's trigger without listeners (writes/s of each).
    #[arg(long)]
    pub trigger_cost: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print the report as Markdown table rows on stdout.
    #[arg(long)]
    pub markdown: bool,
    /// Draw latency over time and its distribution into this SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
}

impl LoadArgs {
    fn plan(&self) -> Plan {
        use Scenario::*;
        let (writers, batch, payload, rows, tables) = match self.scenario {
            Single => (4, 1, 100, 20_000, 1),
            Batched => (4, 100, 100, 300_000, 1),
            Large64k => (2, 1, 65_536, 2_000, 1),
            Large1m => (2, 1, 1 << 20, 200, 1),
            Publish1m => (2, 1, 1 << 20, 1_000, 1),
            Raw7900 => (2, 100, 7_900, 100_000, 1),
            Channels => (4, 10, 100, 100_000, 50),
            IdleListeners => (4, 10, 100, 100_000, 1),
            Writers | WriterTables => (32, 1, 100, 50_000, 1),
        };
        Plan {
            writers: self.writers.first().copied().unwrap_or(writers).max(1),
            batch: self.batch.unwrap_or(batch).max(1),
            rows: if self.duration.is_some() && self.rows.is_none() { None } else { Some(self.rows.unwrap_or(rows)) },
            duration: self.duration,
            rate: self.rate,
            payload: self.payload.unwrap_or(payload),
            tables: self.channels.unwrap_or(tables).max(1),
            mixed: self.mixed,
            raw: self.scenario == Raw7900,
            publish: self.publish || self.scenario == Publish1m,
        }
    }

    fn idle(&self) -> usize {
        self.idle_listeners.unwrap_or(if self.scenario == Scenario::IdleListeners { 50 } else { 0 })
    }
}

/// Runs the load test and prints its report.
pub async fn run(config: &Config, url: &str, args: &LoadArgs) -> anyhow::Result<()> {
    if args.scenario == Scenario::WriterTables {
        return writer_tables(config, url, args).await;
    }
    if args.writers.len() > 1 {
        bail!("--writers takes one count, except with --scenario writer-tables");
    }
    if args.publishers.is_some() || args.rounds.is_some() || args.pin {
        bail!("--publishers, --rounds and --pin are for --scenario writer-tables");
    }
    let plan = args.plan();
    let mut admin = crate::cmd::connect(config).await?;
    pgpubsub::migrate::up(&mut admin, false).await.context("applying the pubsub schema")?;
    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let mut report = Report::new(format!("{:?}", args.scenario).to_lowercase(), &plan, version);

    if args.trigger_cost && plan.publish {
        eprintln!("--trigger-cost: skipped, published messages go through no trigger");
    }
    if args.trigger_cost && !plan.raw && !plan.publish {
        for (name, trigger) in [
            ("no trigger", Trigger::None),
            ("notify-only trigger", Trigger::NotifyOnly),
            ("pgpubsub trigger, no listener", Trigger::Pubsub),
        ] {
            // The row as JSON (payload plus ~100 bytes of other columns)
            // must fit in one notification.
            if trigger == Trigger::NotifyOnly && plan.payload > 7_800 {
                eprintln!("{name}: skipped, pg_notify refuses payloads of 8000 bytes or more");
                continue;
            }
            workload::setup(&admin, plan.tables, trigger).await?;
            let written = write_with_progress(config, &plan, name, None).await?;
            report.write_runs.push(WriteRun::new(name, &written));
        }
    }

    // The bare baseline reads payloads: with it, tables are watched inline
    // (pgpubsub's listener still reads the log).
    let trigger = if plan.raw || plan.publish {
        Trigger::None
    } else if args.baseline || args.baseline_only {
        Trigger::PubsubInline
    } else {
        Trigger::Pubsub
    };
    workload::setup(&admin, plan.tables, trigger).await?;
    let channels: Vec<String> = (0..plan.tables).map(workload::channel).collect();
    let expected = plan.rows.map(|r| if plan.mixed { r * 3 } else { r });
    let receivers = Receivers::start(
        config,
        url,
        &channels,
        expected,
        !plan.raw && !args.baseline_only,
        args.baseline || args.baseline_only || plan.raw,
        args.idle(),
    )
    .await
    .context("starting the receivers")?;
    let sampler = receivers.sample(config.clone());
    let written = write_with_progress(config, &plan, "writing", Some(&receivers)).await?;
    let finished = receivers.finish(written.events, &sampler).await?;
    report.set_main(&written, finished);
    workload::teardown(&admin).await?;

    if let Some(path) = &args.plot {
        plot::draw(path, &report).with_context(|| format!("drawing {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.markdown {
        print!("{}", report.markdown());
    } else {
        print!("{}", report.table());
    }
    if report.lost() > 0 {
        bail!("{} events were lost", report.lost());
    }
    Ok(())
}

/// `--scenario writer-tables`, after refusing the flags it does not use.
async fn writer_tables(config: &Config, url: &str, args: &LoadArgs) -> anyhow::Result<()> {
    let unused = [
        ("--batch", args.batch.is_some()),
        ("--rows", args.rows.is_some()),
        ("--rate", args.rate.is_some()),
        ("--channels", args.channels.is_some()),
        ("--idle-listeners", args.idle_listeners.is_some()),
        ("--mixed", args.mixed),
        ("--publish", args.publish),
        ("--baseline", args.baseline),
        ("--baseline-only", args.baseline_only),
        ("--trigger-cost", args.trigger_cost),
        ("--markdown", args.markdown),
        ("--plot", args.plot.is_some()),
    ];
    if let Some((flag, _)) = unused.iter().find(|(_, given)| *given) {
        bail!("{flag} does not apply to --scenario writer-tables (it takes --writers, --duration, --publishers, --payload, --rounds, --pin, --json)");
    }
    let opts = writer_tables::Options {
        writers: if args.writers.is_empty() { vec![1, 4, 32] } else { args.writers.clone() },
        per_run: args.duration.unwrap_or(Duration::from_secs(8)),
        publishers: args.publishers.unwrap_or(8),
        payload: args.payload.unwrap_or(100),
        rounds: args.rounds.unwrap_or(1).max(1),
        pin: args.pin,
        only: args.only.clone(),
    };
    writer_tables::run(config, url, &opts, args.json).await
}

/// Writes the plan with a progress bar on stderr (showing what the receivers
/// have when there are any).
async fn write_with_progress(
    config: &Config,
    plan: &Plan,
    label: &str,
    receivers: Option<&Receivers>,
) -> anyhow::Result<workload::Written> {
    let progress = Arc::new(AtomicU64::new(0));
    let bar = match plan.rows {
        Some(rows) => indicatif::ProgressBar::new(rows),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>30} {bar:30} {pos}/{len} rows {per_sec} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_string());
    let (p, b) = (progress.clone(), bar.clone());
    let counts = receivers.map(Receivers::counters);
    let ticker = tokio::spawn(async move {
        loop {
            b.set_position(p.load(Ordering::Relaxed));
            if let Some(c) = &counts {
                b.set_message(format!("received {}", c.load(Ordering::Relaxed)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let result = workload::write(config, plan, progress.clone()).await;
    ticker.abort();
    bar.set_position(progress.load(Ordering::Relaxed));
    bar.finish();
    result
}
