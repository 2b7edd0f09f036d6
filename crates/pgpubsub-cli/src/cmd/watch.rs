//! `pgpubsub watch [TABLE] [--channel C] [--inline]` and `pgpubsub unwatch TABLE`.

use anyhow::Context;
use clap::Args;
use pgpubsub::db::Config;
use pgpubsub::Channel;

/// Options of `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The table, optionally schema-qualified; omit to list watched tables.
    pub table: Option<String>,
    /// Channel for its events (default: the table's name).
    #[arg(long, short = 'c')]
    pub channel: Option<Channel>,
    /// Also notify each event's JSON in the payload (chunked past 8000
    /// bytes), the seeds' way, for programs that read NOTIFY themselves.
    /// Readable by every role that can LISTEN, and every write takes
    /// PostgreSQL's NOTIFY lock: see docs/delivery.md.
    #[arg(long, conflicts_with = "wal")]
    pub inline: bool,
    /// Capture from the WAL: no trigger, writers unhurt; `pgpubsub capture`
    /// appends the changes to the log (needs wal_level = logical). See
    /// docs/delivery.md.
    #[arg(long)]
    pub wal: bool,
}

/// Watches a table, or lists watched tables when none is given.
pub async fn run(
    config: &Config,
    table: Option<&str>,
    channel: Option<&Channel>,
    inline: bool,
    wal: bool,
) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let Some(table) = table else {
        for (table, channel) in pgpubsub::watch::watches(&client).await? {
            println!("{table} -> {channel}");
        }
        return Ok(());
    };
    if wal {
        let channel = pgpubsub::watch::watch_wal(&client, table, channel)
            .await
            .with_context(|| format!("watching {table} through the WAL"))?;
        println!("watching {table} through the WAL: its changes are events on channel {channel} once `pgpubsub capture` runs");
        return Ok(());
    }
    let channel = pgpubsub::watch::watch_with(&client, table, channel, inline)
        .await
        .with_context(|| format!("watching {table}"))?;
    println!("watching {table}: its changes are events on channel {channel}");
    if inline {
        println!("inline: each event is also in its NOTIFY payload, readable by every role that can LISTEN");
    }
    Ok(())
}

/// Stops watching a table.
pub async fn unwatch(config: &Config, table: &str) -> anyhow::Result<()> {
    let client = super::connect(config).await?;
    let was = pgpubsub::unwatch(&client, table).await.with_context(|| format!("unwatching {table}"))?;
    if was {
        println!("stopped watching {table}");
    } else {
        println!("{table} was not watched");
    }
    // The last table watched through the WAL: say what is left of capture.
    let wal_watches: i64 =
        client.query_one("SELECT count(*) FROM pubsub.wal_watches", &[]).await.map(|r| r.get(0)).unwrap_or(1);
    if wal_watches == 0 {
        for slot in pgpubsub::capture::slots(&client).await.unwrap_or_default() {
            println!(
                "no table is watched through the WAL now; replication slot {} is left{} (drop it with \
                 SELECT pg_drop_replication_slot('{}') once no capturer runs, or keep it for the next watch)",
                slot.name,
                if slot.active { ", in use by a running capturer" } else { "" },
                slot.name
            );
        }
    }
    Ok(())
}
