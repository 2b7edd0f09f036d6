//! `pgpubsub publish CHANNEL [PAYLOAD | -]`.

use anyhow::Context;
use clap::Args;
use pgpubsub::db::Config;
use pgpubsub::Channel;
use tokio::io::AsyncReadExt;

/// Options of `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The channel.
    pub channel: Channel,
    /// The message; `-` or nothing reads it from stdin.
    pub payload: Option<String>,
    /// Publish through the WAL (an INSERT into `pubsub.wal_messages`): no
    /// log insert in this transaction; `pgpubsub capture` appends it.
    #[arg(long)]
    pub wal: bool,
}

/// Publishes one message; prints its sequence number on stdout.
pub async fn run(config: &Config, args: &PublishArgs) -> anyhow::Result<()> {
    let payload = match args.payload.as_deref() {
        Some(p) if p != "-" => p.to_string(),
        _ => {
            let mut text = String::new();
            tokio::io::stdin()
                .read_to_string(&mut text)
                .await
                .context("reading the message from stdin (it must be UTF-8 text)")?;
            text
        }
    };
    let client = super::connect(config).await?;
    if args.wal {
        pgpubsub::watch::publish_wal(&client, &args.channel, &payload)
            .await
            .with_context(|| format!("publishing on {} through the WAL", args.channel))?;
        tracing::info!(channel = %args.channel, bytes = payload.len(), "published through the WAL");
        return Ok(());
    }
    let seq = pgpubsub::publish(&client, &args.channel, &payload)
        .await
        .with_context(|| format!("publishing on {}", args.channel))?;
    tracing::info!(channel = %args.channel, seq, bytes = payload.len(), "published");
    println!("{seq}");
    Ok(())
}
