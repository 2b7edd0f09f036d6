//! `pgpubsub prune [--max-age D] [--max-count N]`.

use std::time::Duration;

use anyhow::{bail, Context};
use pgpubsub::db::Config;
use pgpubsub::retention::{self, Retention};

use crate::cli::RetentionArgs;

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
