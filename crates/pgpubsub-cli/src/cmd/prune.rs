//! `pgpubsub prune [--max-age D] [--max-count N]`.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use pgpubsub::db::Config;
use pgpubsub::retention::{self, Retention};

use super::parse_duration;

/// Retention bounds.
#[derive(Debug, Args, Clone, Default)]
pub struct RetentionArgs {
    /// Delete events older than this (e.g. 7d, 12h, 30m).
    #[arg(long, env = "PGPUBSUB_RETENTION_AGE", value_name = "DURATION", value_parser = parse_duration)]
    pub max_age: Option<std::time::Duration>,
    /// Keep at most this many of the newest events.
    #[arg(long, env = "PGPUBSUB_RETENTION_COUNT", value_name = "N")]
    pub max_count: Option<i64>,
}

impl RetentionArgs {
    /// As the library's policy.
    pub fn policy(&self) -> pgpubsub::retention::Retention {
        pgpubsub::retention::Retention::new(self.max_age, self.max_count)
    }
}

/// Prunes once and prints how many events went.
pub async fn run(config: &Config, args: &RetentionArgs) -> anyhow::Result<()> {
    if !args.policy().is_set() {
        bail!("nothing to prune by: give --max-age and/or --max-count (or PGPUBSUB_RETENTION_AGE / _COUNT)");
    }
    let client = super::connect(config).await?;
    let n = retention::prune(&client, args.policy()).await.context("pruning")?;
    println!("pruned {n} events");
    Ok(())
}

/// Prunes every `every` until the process ends; failures are logged and
/// retried at the next round.
pub fn spawn_periodic(config: Config, policy: Retention, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let result = match pgpubsub::db::connect(&config).await {
                Ok(client) => retention::prune(&client, policy).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "pruned the log"),
                Err(e) => tracing::warn!(error = %e, "pruning failed; will retry"),
            }
        }
    });
}
