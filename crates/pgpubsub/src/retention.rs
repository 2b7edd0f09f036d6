//! Keeping the event log bounded: prune by age and/or count.
//!
//! Pruning records the highest (txid, seq) it removed; a subscriber whose
//! cursor is below that mark is told [`Error::ResyncNeeded`] instead of
//! silently missing the pruned events.
//!
//! [`Error::ResyncNeeded`]: crate::Error::ResyncNeeded

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// What to keep. With neither bound set nothing is pruned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Delete events older than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many of the newest events.
    pub max_count: Option<i64>,
}

impl Retention {
    /// A policy from its two bounds.
    pub fn new(max_age: Option<Duration>, max_count: Option<i64>) -> Self {
        Retention { max_age, max_count }
    }

    /// Whether it prunes anything at all.
    pub fn is_set(&self) -> bool {
        self.max_age.is_some() || self.max_count.is_some()
    }
}

/// Deletes what the policy does not keep; returns how many events went.
///
/// # Errors
/// [`Error::NotMigrated`] without the schema; [`Error::Db`] otherwise.
pub async fn prune(client: &Client, policy: Retention) -> Result<i64> {
    if !policy.is_set() {
        return Ok(0);
    }
    let secs = policy.max_age.map(|d| d.as_secs_f64());
    let row = client
        .query_one("SELECT pubsub.prune(make_interval(secs => $1), $2)", &[&secs, &policy.max_count])
        .await
        .map_err(|e| Error::db("pruning the log", e))?;
    Ok(row.get(0))
}
