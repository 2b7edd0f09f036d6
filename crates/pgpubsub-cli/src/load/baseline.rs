//! The baseline receiver (`pgpubsub load-baseline`, hidden): a bare
//! tokio-postgres LISTEN loop that parses each payload as JSON and counts,
//! nothing else. It runs as its own process beside `pgpubsub listen`, on the
//! same notifications, so the report can put pgpubsub's rate, latency, CPU
//! and memory next to what the database delivers to a minimal client.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use pgpubsub::db::Config;
use tokio_postgres::AsyncMessage;

use super::probe::{now_us, Probe};

/// Options of the baseline receiver.
#[derive(Debug, clap::Args)]
pub struct BaselineArgs {
    /// Channels to LISTEN on (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub channel: Vec<String>,
    /// Stop after this many notifications.
    #[arg(long)]
    pub expect: u64,
    /// Stop after this long without a notification.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub idle: Duration,
}

/// Receives, then prints one JSON summary line on stdout.
pub async fn run(config: &Config, args: &BaselineArgs) -> anyhow::Result<()> {
    let (client, mut connection) = pgpubsub::db::open(config).await.context("baseline: connecting")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });
    let sql: String = args.channel.iter().map(|c| format!("LISTEN {};", pgpubsub::channel::quote_ident(c))).collect();
    client.batch_execute(&sql).await.context("baseline: LISTEN")?;
    println!("{{\"ready\":true}}");

    let mut probe = Probe::new();
    let mut bytes = 0u64;
    let start = Instant::now();
    while probe.received < args.expect {
        let Ok(Some(n)) = tokio::time::timeout(args.idle, rx.recv()).await else { break };
        bytes += n.payload().len() as u64;
        // The baseline's one piece of work per event: parse the JSON.
        match serde_json::from_str::<serde_json::Value>(n.payload()) {
            Ok(v) => probe.record_value(&v, now_us()),
            Err(_) => probe.record_unparsed(now_us()),
        }
    }
    let mut summary = probe.summary();
    summary["bytes"] = bytes.into();
    summary["elapsed_ms"] = (start.elapsed().as_millis() as u64).into();
    println!("{summary}");
    Ok(())
}
