//! `pgpubsub migrate [up|down|status] [--example]`.

use anyhow::Context;
use clap::Args;
use pgpubsub::db::Config;

/// Options of `migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// up (default), down (revert the last step) or status.
    #[arg(value_enum, default_value = "up")]
    pub action: MigrateAction,
    /// Also apply the seed's `job` example (tables job and notification).
    #[arg(long)]
    pub example: bool,
}

/// What `migrate` does.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the most recent one.
    Down,
    /// List migrations and watched tables.
    Status,
}

/// The migrations that made capture from the WAL: reverting one leaves the
/// capturers' replication slots without a use.
const CAPTURE_STEPS: [&str; 2] = ["20261207000100", "20261130000200"];

/// Before the capture step is reverted: drops the capturers' idle slots
/// (a slot nobody reads keeps WAL forever), and refuses while a capturer
/// still streams one.
async fn drop_slots_before_down(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let last = pgpubsub::migrate::status(client)
        .await
        .context("reading migration status")?
        .into_iter()
        .filter(|s| s.applied)
        .map(|s| s.migration.version)
        .max();
    if !last.is_some_and(|v| CAPTURE_STEPS.contains(&v)) {
        return Ok(());
    }
    let (dropped, left) = pgpubsub::capture::drop_idle(client).await.context("dropping the capturers' slots")?;
    for slot in dropped {
        eprintln!("dropped replication slot {slot}");
    }
    if !left.is_empty() {
        anyhow::bail!(
            "replication slot(s) {} are in use by a running `pgpubsub capture`: stop it first (its slot would keep WAL forever)",
            left.join(", ")
        );
    }
    Ok(())
}

/// `1.5 MiB` and the like.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Applies, reverts or lists migrations; prints what it did on stdout.
pub async fn run(config: &Config, args: &MigrateArgs) -> anyhow::Result<()> {
    let mut client = super::connect(config).await?;
    match args.action {
        MigrateAction::Up => {
            let applied = pgpubsub::migrate::up(&mut client, args.example).await.context("migrating up")?;
            if applied.is_empty() {
                println!("up to date: nothing to apply");
            }
            for m in applied {
                println!("applied {} {}", m.version, m.name);
            }
        }
        MigrateAction::Down => {
            drop_slots_before_down(&client).await?;
            match pgpubsub::migrate::down(&mut client).await.context("migrating down")? {
                Some(m) => println!("reverted {} {}", m.version, m.name),
                None => println!("nothing to revert"),
            }
        }
        MigrateAction::Status => {
            for s in pgpubsub::migrate::status(&client).await.context("reading migration status")? {
                let state = if s.applied { "applied" } else { "pending" };
                let example = if s.migration.example { " (example)" } else { "" };
                println!("{state:8} {} {}{example}", s.migration.version, s.migration.name);
            }
            if let Ok(watches) = pgpubsub::watch::watches(&client).await {
                for (table, channel) in watches {
                    println!("watched  {table} -> {channel}");
                }
            }
            for slot in pgpubsub::capture::slots(&client).await.unwrap_or_default() {
                println!(
                    "slot     {} ({}, keeps {} of WAL, wal_status {}{})",
                    slot.name,
                    if slot.active { "active" } else { "idle: no capturer streams it" },
                    bytes(slot.retained_bytes),
                    slot.wal_status,
                    slot.safe_wal_bytes.map_or(String::new(), |b| format!(
                        ", {} more before the server invalidates it",
                        bytes(b.max(0) as u64)
                    ))
                );
            }
        }
    }
    Ok(())
}
