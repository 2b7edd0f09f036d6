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
        MigrateAction::Down => match pgpubsub::migrate::down(&mut client).await.context("migrating down")? {
            Some(m) => println!("reverted {} {}", m.version, m.name),
            None => println!("nothing to revert"),
        },
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
        }
    }
    Ok(())
}
