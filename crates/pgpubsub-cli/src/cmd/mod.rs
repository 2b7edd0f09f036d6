//! One subcommand per file.

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

/// A connection for statements, with the target named in the error.
pub async fn connect(config: &Config) -> anyhow::Result<Client> {
    pgpubsub::db::connect(config).await.with_context(|| format!("connecting to {}", pgpubsub::db::describe(config)))
}
