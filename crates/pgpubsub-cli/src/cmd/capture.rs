//! `pgpubsub capture`: appends the changes of tables watched with `watch
//! --wal` (and `publish --wal` messages) to the log, from the WAL. One
//! active per database; others stand by (see `pgpubsub::capture`).

use std::time::Duration;

use clap::Args;
use pgpubsub::db::Config;
use pgpubsub::{CaptureOptions, Capturer};

/// Options of `capture`.
#[derive(Debug, Args, Clone)]
pub struct CaptureArgs {
    /// Names the replication slot, `pgpubsub_capture_NAME` (default
    /// `pgpubsub_capture`): slots are per cluster, so capturers of two
    /// databases of one cluster need two names.
    #[arg(long, env = "PGPUBSUB_CAPTURE_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Most events appended in one transaction.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub batch_rows: usize,
    /// Appends begin at most this often: a lone change after a quiet spell
    /// is appended at once; under a stream of commits what arrives
    /// meanwhile goes in the same append (more concurrent writers per
    /// append, less database work per event, one read per listener), at up
    /// to this much latency.
    #[arg(long, env = "PGPUBSUB_CAPTURE_LINGER", default_value = "5ms", value_name = "DURATION", value_parser = parse_duration)]
    pub linger: Duration,
    /// Warn when the slot keeps more WAL than this many bytes (a capturer
    /// that stopped keeping up). See docs/deploying.md on
    /// max_slot_wal_keep_size.
    #[arg(long, default_value_t = 1 << 30, value_name = "BYTES")]
    pub retained_warn_bytes: u64,
    /// How often a standby tries to take over the slot.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub standby_poll: Duration,
}

impl CaptureArgs {
    /// As the library's options.
    pub fn options(&self) -> CaptureOptions {
        let mut o = CaptureOptions::named(self.name.clone());
        o.batch_rows = self.batch_rows.max(1);
        o.linger = self.linger;
        o.retained_warn_bytes = self.retained_warn_bytes;
        o.standby_poll = self.standby_poll;
        o
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 2ms, 1s)"))
}

/// Runs until Ctrl-C or SIGTERM; logs what it appended when it stops.
pub async fn run(config: &Config, args: &CaptureArgs) -> anyhow::Result<()> {
    let capturer = Capturer::new(config, args.options())?;
    let stats = capturer.stats();
    tracing::info!(slot = capturer.slot(), target = %pgpubsub::db::describe(config), "capture starting");
    capturer.run(crate::shutdown::signal()).await?;
    let s = stats.snapshot();
    tracing::info!(
        events = s.events,
        batches = s.batches,
        transactions = s.transactions,
        skipped = s.skipped,
        reconnects = s.reconnects,
        resets = s.resets,
        "capture stopped"
    );
    Ok(())
}

/// A capturer running beside another command.
pub type Beside = (tokio::task::JoinHandle<anyhow::Result<()>>, std::sync::Arc<pgpubsub::capture::CaptureStats>);

/// With `on` (`listen --capture`, `serve --capture`): a capturer running in
/// the background of the command until the process stops, with its
/// counters; the slot named by `PGPUBSUB_CAPTURE_NAME`, as `pgpubsub
/// capture --name` reads it (slots are per cluster).
///
/// # Errors
/// When the name cannot name a slot.
pub fn beside(config: &Config, on: bool) -> anyhow::Result<Option<Beside>> {
    if !on {
        return Ok(None);
    }
    let name = std::env::var("PGPUBSUB_CAPTURE_NAME").ok().filter(|n| !n.is_empty());
    let capturer = Capturer::new(config, CaptureOptions::named(name))?;
    let stats = capturer.stats();
    let task = tokio::spawn(async move { capturer.run(std::future::pending()).await.map_err(anyhow::Error::from) });
    Ok(Some((task, stats)))
}

/// Resolves when a capturer started [`beside`] a command ends (only by an
/// error: it runs until the process stops); never, without one.
pub async fn ended(capture: Option<tokio::task::JoinHandle<anyhow::Result<()>>>) -> anyhow::Result<()> {
    let Some(task) = capture else { return std::future::pending().await };
    match task.await {
        Ok(r) => r.and(Err(anyhow::anyhow!("the capturer stopped"))),
        Err(e) => Err(anyhow::anyhow!("the capturer failed: {e}")),
    }
}
