//! The event log, read back through one statement connection per reader
//! ([`LogConn`]), opened on first use and reopened after a failure, every
//! statement bounded by a timeout. Here: the connection, the transaction
//! horizon and heartbeats; `page.rs`, one read of the log (see `tail.rs`);
//! `wake.rs`, the wake lock; `cursors.rs`, durable cursors; `logged.rs` (with
//! `json_string.rs`), how a stored event becomes the JSON delivered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::{Client, Statement};

use crate::db::Config;
use crate::error::{Error, Result};

mod cursors;
pub mod json_string;
mod logged;
mod page;
mod wake;

pub use logged::{Logged, Unreadable};
pub(crate) use wake::{WaitLock, CAPTURE_WAKE, WAKE_CHANNEL};

/// A statement connection for reading the log: opened on first use,
/// reopened after a failure, every statement bounded by a timeout.
#[derive(Debug)]
pub struct LogConn {
    config: Config,
    client: Mutex<Option<Open>>,
    /// Longest any one statement may take before the connection is presumed
    /// dead (a silently cut network never answers).
    timeout: Duration,
    /// Connections opened so far (see [`LogConn::generation`]).
    generation: AtomicU64,
    /// Plan prepared statements once, for any parameters (see
    /// [`LogConn::for_reading`]).
    generic_plans: bool,
}

/// The open connection, and the statements prepared on it (see
/// [`LogConn::prepared`]): a reader's hot statements are parsed and sent for
/// description once, not on every call. Kept together, so a new connection
/// starts with none.
#[derive(Debug)]
struct Open {
    client: Arc<Client>,
    statements: std::collections::HashMap<&'static str, Statement>,
}

/// An error a statement run by [`LogConn::run`] can fail with: the
/// driver's (given the context here) or the library's own.
pub trait StatementError {
    /// As the library's error, saying what was being done.
    fn into_error(self, context: &'static str) -> Error;
}

impl StatementError for tokio_postgres::Error {
    fn into_error(self, context: &'static str) -> Error {
        Error::db(context, self)
    }
}

impl StatementError for Error {
    fn into_error(self, _context: &'static str) -> Error {
        self
    }
}

/// What a fence statement reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FenceInfo {
    /// `pg_notification_queue_usage()`, 0 to 1.
    pub queue_usage: f64,
}

fn u64_of(text: &str) -> u64 {
    text.parse().unwrap_or(0)
}

/// `xmin:xmax:xip,xip,...` (pg_snapshot's text form) → the in-progress list.
fn in_progress(snapshot: &str) -> Vec<u64> {
    snapshot.splitn(3, ':').nth(2).unwrap_or("").split(',').filter(|s| !s.is_empty()).map(u64_of).collect()
}

impl LogConn {
    /// A connection to `config` whose statements give up after `timeout`.
    pub fn new(config: Config, timeout: Duration) -> Self {
        LogConn { config, client: Mutex::new(None), timeout, generation: AtomicU64::new(0), generic_plans: false }
    }

    /// A connection that reads the log page after page (a listener's): its
    /// prepared statements are planned once for any parameters. PostgreSQL
    /// otherwise plans a read of the log anew each time (its first plans,
    /// on a small log, look cheaper than the generic one), which cost as
    /// much as running it; the generic plan walks the (txid, seq) index
    /// whatever the position.
    ///
    /// A plan made once must hold while the log grows: planned when the log
    /// was empty (pruned, then truncated by VACUUM), the cheapest plan was a
    /// scan of the whole table, kept until an ANALYZE, each read costing
    /// more than the last. So this connection plans no sequential or bitmap
    /// scan where an index serves: a page read walks the index in order and
    /// stops at the page's end. The one statement of the application's it
    /// runs, deciding what a role may see under the tables' policies,
    /// plans with the usual settings (`pubsub.row_views_classes` sets them
    /// for itself). Not for other connections that run the application's
    /// own queries (a shape's filter may want its values).
    pub fn for_reading(mut self) -> Self {
        self.generic_plans = true;
        self
    }

    /// The connection itself, for statements of the caller's own (it is
    /// opened if need be; after a failure call [`LogConn::reset`]).
    ///
    /// # Errors
    /// When the database cannot be reached in time.
    pub async fn client(&self) -> Result<Arc<Client>> {
        let mut slot = self.client.lock().await;
        if let Some(open) = slot.as_ref().filter(|o| !o.client.is_closed()) {
            return Ok(open.client.clone());
        }
        let connect = crate::db::connect(&self.config);
        let client = match tokio::time::timeout(self.timeout, connect).await {
            Ok(c) => Arc::new(c?),
            Err(_) => return Err(Error::ConnectionLost("connecting the log connection timed out".into())),
        };
        // A page read is a few index scans: JIT compiling it would cost more
        // (35 ms measured on a 200k-event log) than running it.
        let setup = if self.generic_plans {
            "SET jit = off; SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET enable_bitmapscan = off"
        } else {
            "SET jit = off"
        };
        if let Err(e) = client.batch_execute(setup).await {
            return Err(Error::db("setting up the log connection", e));
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        *slot = Some(Open { client: client.clone(), statements: std::collections::HashMap::new() });
        Ok(client)
    }

    /// Counts the connections opened so far: a session-level lock taken on
    /// one generation is gone in the next.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Forgets the connection so the next call opens a new one.
    pub async fn reset(&self) {
        self.client.lock().await.take();
    }

    /// `sql` prepared on `client` (the connection [`LogConn::run`] handed
    /// over). On a reading connection ([`LogConn::for_reading`]) once per
    /// connection, kept while `client` is the open one. Elsewhere (the
    /// gateway's pool) anew for each call: PostgreSQL switches a statement
    /// run again and again to a generic plan after five runs, and one made
    /// while the log looked empty scans the whole log, kept as it grows;
    /// only a reading connection plans no such scan.
    pub(crate) async fn prepared(
        &self,
        client: &Arc<Client>,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if !self.generic_plans {
            return client.prepare(sql).await;
        }
        let cached = self.current(client).await.and_then(|open| open.statements.get(sql).cloned());
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = client.prepare(sql).await?;
        if let Some(mut open) = self.current(client).await {
            open.statements.insert(sql, statement.clone());
        }
        Ok(statement)
    }

    /// The open connection, if it is `client` (a reset may have replaced it).
    async fn current(&self, client: &Arc<Client>) -> Option<tokio::sync::MappedMutexGuard<'_, Open>> {
        let slot = self.client.lock().await;
        tokio::sync::MutexGuard::try_map(slot, |s| s.as_mut().filter(|o| Arc::ptr_eq(&o.client, client))).ok()
    }

    /// Drops the prepared statements: after any failure (a statement a
    /// migration invalidated is prepared again on the next call).
    async fn forget_statements(&self) {
        if let Some(open) = self.client.lock().await.as_mut() {
            open.statements.clear();
        }
    }

    /// Runs `f` on the connection within the statement timeout; on failure
    /// the connection is dropped so the next call starts afresh (unless the
    /// error came from SQL: the connection itself is fine then). The one
    /// statement runner: the library's reads of the log, the gateway's
    /// writes and snapshots all go through it.
    ///
    /// # Errors
    /// What `f` failed with (a driver error as [`Error::Db`] with
    /// `context`), or [`Error::ConnectionLost`] when no answer came in time.
    pub async fn run<T, E, F, Fut>(&self, context: &'static str, f: F) -> Result<T>
    where
        E: StatementError,
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        self.run_within(context, self.timeout, f).await
    }

    /// [`LogConn::run`] for statements of the driver's: only names the
    /// error type, which a closure using `?` leaves open.
    pub(crate) async fn run_pg<T, F, Fut>(&self, context: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.run(context, f).await
    }

    /// [`LogConn::run`] with a timeout of its own (a large publish, say).
    ///
    /// # Errors
    /// As [`LogConn::run`].
    pub async fn run_within<T, E, F, Fut>(&self, context: &'static str, timeout: Duration, f: F) -> Result<T>
    where
        E: StatementError,
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let client = self.client().await?;
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let e = e.into_error(context);
                self.forget_statements().await;
                if e.sqlstate().is_none() {
                    self.reset().await;
                }
                Err(e)
            }
            Err(_) => {
                self.reset().await;
                Err(Error::ConnectionLost(format!("{context}: no answer within {timeout:?}")))
            }
        }
    }

    /// The transactions in progress now, and the first txid not yet given
    /// out: where "from now" starts.
    pub(crate) async fn now(&self) -> Result<(u64, Vec<u64>)> {
        self.run_pg("reading the transaction horizon", |c| async move {
            let row = c.query_one("SELECT pg_current_snapshot()::text", &[]).await?;
            let snap: &str = row.get(0);
            let xmax = snap.split(':').nth(1).map_or(0, u64_of);
            Ok((xmax, in_progress(snap)))
        })
        .await
    }

    /// Notifies `token` on `channel` (the heartbeat that proves the listening
    /// connection hears) and reads the notification queue's usage.
    pub(crate) async fn fence(&self, channel: &str, token: &str) -> Result<FenceInfo> {
        let (channel, token) = (channel.to_string(), token.to_string());
        self.run_pg("sending a heartbeat", |c| async move {
            let row = c
                .query_one("SELECT pg_notification_queue_usage(), pg_notify($1, $2)::text", &[&channel, &token])
                .await?;
            Ok(FenceInfo { queue_usage: row.get(0) })
        })
        .await
    }
}
