//! One subcommand per file, with its flags; here, what they share.

pub mod capture;
pub mod demo;
pub mod listen;
pub mod migrate;
pub mod prune;
pub mod publish;
pub mod watch;

use anyhow::Context;
use pgpubsub::db::Config;
use tokio_postgres::Client;

/// A duration flag: `7d`, `12h`, `30m`, `90s`.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 7d, 12h, 30m, 90s)"))
}

/// A connection for statements, with the target named in the error.
pub async fn connect(config: &Config) -> anyhow::Result<Client> {
    pgpubsub::db::connect(config).await.with_context(|| format!("connecting to {}", pgpubsub::db::describe(config)))
}
