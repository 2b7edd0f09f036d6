//! The wake lock: a listener that finds nothing to read holds it, and while
//! someone does, writers send a wake-up on [`WAKE_CHANNEL`]; while nobody
//! does, they send nothing (so a busy system sends no NOTIFY at all).

use super::LogConn;
use crate::error::Result;

/// What an attempt to wait for a wake-up found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitLock {
    /// This connection holds the wake lock: writers now send wake-ups.
    Mine,
    /// Another listener holds it: writers send wake-ups already.
    Peer,
    /// Writers are in flight (they hold it shared): try again shortly.
    Busy,
}

/// The advisory lock a waiting listener holds and writers test
/// (`pg_try_advisory_xact_lock_shared`): 'pgpswake' as a big-endian bigint,
/// the same constant as in migration 20261130000100.
pub(crate) const WAKE_KEY: i64 = 8_099_566_096_075_549_541;

/// The channel wake-ups arrive on; the payload names the event's channel.
pub(crate) const WAKE_CHANNEL: &str = "pubsub_wake";

impl LogConn {
    /// Tries to become the waiting listener: takes the wake lock if no
    /// writer holds it, or finds that another listener holds it.
    pub(crate) async fn try_wait(&self) -> Result<WaitLock> {
        self.run_pg("taking the wake lock", |c| async move {
            let row = c
                .query_one(
                    "SELECT pg_try_advisory_lock($1),
                            EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock'
                                    AND granted AND objsubid = 1 AND pid <> pg_backend_pid()
                                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                                    AND classid::bigint = ($1 >> 32) AND objid::bigint = ($1 & 4294967295))",
                    &[&WAKE_KEY],
                )
                .await?;
            Ok(match (row.get(0), row.get(1)) {
                (true, _) => WaitLock::Mine,
                (false, true) => WaitLock::Peer,
                (false, false) => WaitLock::Busy,
            })
        })
        .await
    }

    /// Releases the wake lock: writers stop sending wake-ups.
    pub(crate) async fn stop_waiting(&self) -> Result<()> {
        self.run_pg("releasing the wake lock", |c| async move {
            c.execute("SELECT pg_advisory_unlock($1)", &[&WAKE_KEY]).await?;
            Ok(())
        })
        .await
    }
}
