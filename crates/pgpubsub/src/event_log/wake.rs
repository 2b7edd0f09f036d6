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

/// How the capturer's wake-ups begin (`capture:<channel>`; no channel name
/// has a colon): it sends one after every append, lock or not, so a
/// listener it woke may keep the lock (see `Listener::read`).
pub(crate) const CAPTURE_WAKE: &str = "capture:";

/// Takes the wake lock, or finds who holds it (see [`LogConn::try_wait`]):
/// failing the exclusive lock, a shared one succeeds only if no listener
/// holds it (writers hold it shared), and is given back at once. Two
/// advisory lock calls: no scan of `pg_locks`, which locks every partition
/// of the lock table and costs as much as a read of the log.
const TRY_WAIT: &str = "SELECT CASE WHEN pg_try_advisory_lock($1) THEN 'mine'
                             WHEN pg_try_advisory_lock_shared($1)
                                 THEN CASE WHEN pg_advisory_unlock_shared($1) THEN 'busy' ELSE 'busy' END
                             ELSE 'peer' END";

/// Gives the wake lock back.
const STOP_WAITING: &str = "SELECT pg_advisory_unlock($1)";

impl LogConn {
    /// Tries to become the waiting listener: takes the wake lock if no
    /// writer holds it, or finds that another listener holds it.
    pub(crate) async fn try_wait(&self) -> Result<WaitLock> {
        self.run_pg("taking the wake lock", |c| async move {
            let statement = self.prepared(&c, TRY_WAIT).await?;
            let row = c.query_one(&statement, &[&WAKE_KEY]).await?;
            Ok(match row.get::<_, &str>(0) {
                "mine" => WaitLock::Mine,
                "busy" => WaitLock::Busy,
                _ => WaitLock::Peer,
            })
        })
        .await
    }

    /// Releases the wake lock: writers stop sending wake-ups.
    pub(crate) async fn stop_waiting(&self) -> Result<()> {
        self.run_pg("releasing the wake lock", |c| async move {
            let statement = self.prepared(&c, STOP_WAITING).await?;
            c.execute(&statement, &[&WAKE_KEY]).await?;
            Ok(())
        })
        .await
    }
}
