//! Reading the event log: catch-up after a gap, references, fences (the
//! heartbeat that also moves cursors), durable cursors and retention.
//!
//! One statement connection per listener, shared by its reading task and its
//! subscriber, opened on first use and reopened after a failure.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::{Client, Config};

use crate::cursor::Cursor;
use crate::error::{Error, Result};

/// A statement connection for reading the log: opened on first use,
/// reopened after a failure, every statement bounded by a timeout.
#[derive(Debug)]
pub struct LogConn {
    config: Config,
    client: Mutex<Option<Arc<Client>>>,
    /// Longest any one statement may take before the connection is presumed
    /// dead (a silently cut network never answers).
    timeout: Duration,
}

/// One row read back from the log.
#[derive(Debug)]
#[non_exhaustive]
pub struct LogRow {
    /// Its place in catch-up order.
    pub cursor: Cursor,
    /// Its channel.
    pub channel: String,
    /// `None` when the body is over the size limit.
    pub body: Option<String>,
    /// Rows in the page before the byte limit cut it: more than returned,
    /// or as many as asked for, means there is more to read.
    pub page_rows: i64,
}

/// What a fence statement reports.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct FenceInfo {
    /// Oldest transaction that may still be running.
    pub xmin: u64,
    /// `pg_notification_queue_usage()`, 0 to 1.
    pub queue_usage: f64,
}

fn u64_of(text: &str) -> u64 {
    text.parse().unwrap_or(0)
}

impl LogConn {
    /// A connection to `config` whose statements give up after `timeout`.
    pub fn new(config: Config, timeout: Duration) -> Self {
        LogConn { config, client: Mutex::new(None), timeout }
    }

    /// The connection itself, for statements of the caller's own (it is
    /// opened if need be; after a failure call [`LogConn::reset`]).
    ///
    /// # Errors
    /// When the database cannot be reached in time.
    pub async fn client(&self) -> Result<Arc<Client>> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let connect = crate::db::connect(&self.config);
        let client = match tokio::time::timeout(self.timeout, connect).await {
            Ok(c) => Arc::new(c?),
            Err(_) => return Err(Error::ConnectionLost("connecting the log connection timed out".into())),
        };
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Forgets the connection so the next call opens a new one.
    pub async fn reset(&self) {
        self.client.lock().await.take();
    }

    /// Runs `f` on the connection within the statement timeout; on failure
    /// the connection is dropped so the next call starts afresh.
    async fn run<T, F, Fut>(&self, context: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.as_db_error().is_none() {
                    self.reset().await;
                }
                Err(Error::db(context, e))
            }
            Err(_) => {
                self.reset().await;
                Err(Error::ConnectionLost(format!("{context}: no answer within {:?}", self.timeout)))
            }
        }
    }

    /// The oldest transaction that may still be running (nothing older can
    /// commit from now on).
    pub async fn xmin(&self) -> Result<u64> {
        self.run("reading the transaction horizon", |c| async move {
            let row = c.query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[]).await?;
            Ok(u64_of(row.get(0)))
        })
        .await
    }

    /// Takes a snapshot, then notifies `token` on `channel`: when the
    /// notification comes back on the listening connection, every
    /// notification of a transaction older than the returned xmin has
    /// arrived before it (the queue is in commit order, and those committed
    /// before this snapshot was taken).
    pub async fn fence(&self, channel: &str, token: &str) -> Result<FenceInfo> {
        let (channel, token) = (channel.to_string(), token.to_string());
        self.run("sending a heartbeat", |c| async move {
            let row = c
                .query_one(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, pg_notification_queue_usage(), \
                     pg_notify($1, $2)::text",
                    &[&channel, &token],
                )
                .await?;
            Ok(FenceInfo { xmin: u64_of(row.get(0)), queue_usage: row.get(1) })
        })
        .await
    }

    /// Reads one referenced event.
    pub async fn fetch(&self, channel: &str, seq: i64) -> Result<Option<String>> {
        let channel = channel.to_string();
        self.run("reading a referenced event", |c| async move {
            let row = c
                .query_opt("SELECT body FROM pubsub.events WHERE seq = $1 AND channel = $2", &[&seq, &channel])
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    /// Events on `channels` after `after`, in (txid, seq) order: at most
    /// `rows` of them and, past the first, at most `bytes` of bodies.
    /// Bodies over `max_event_bytes` come back as `None`.
    pub async fn catch_up(
        &self,
        channels: &[String],
        after: Cursor,
        rows: i64,
        bytes: i64,
        max_event_bytes: i64,
    ) -> Result<Vec<LogRow>> {
        let channels = channels.to_vec();
        self.run("catching up from the log", |c| async move {
            let found = c
                .query(
                    "SELECT txid, seq, channel, CASE WHEN len <= $6 THEN body END, page_rows
                     FROM (SELECT *, (sum(len) OVER (ORDER BY t, seq))::bigint - len AS before, count(*) OVER () AS page_rows
                           FROM (SELECT txid::text AS txid, txid AS t, seq, channel, body, octet_length(body)::bigint AS len
                                 FROM pubsub.events
                                 WHERE channel = ANY($1) AND (txid, seq) > ($2::text::xid8, $3)
                                 ORDER BY txid, seq LIMIT $4) page) sized
                     WHERE before < $5 OR before = 0
                     ORDER BY t, seq",
                    &[&channels, &after.txid.to_string(), &after.seq, &rows, &bytes, &max_event_bytes],
                )
                .await?;
            Ok(found
                .iter()
                .map(|r| LogRow {
                    cursor: Cursor { txid: u64_of(r.get(0)), seq: r.get(1) },
                    channel: r.get(2),
                    body: r.get(3),
                    page_rows: r.get(4),
                })
                .collect())
        })
        .await
    }

    /// The highest (txid, seq) retention has removed.
    pub async fn pruned(&self) -> Result<Cursor> {
        self.run("reading the retention mark", |c| async move {
            let row = c.query_one("SELECT pruned_txid::text, pruned_seq FROM pubsub.retention", &[]).await?;
            Ok(Cursor { txid: u64_of(row.get(0)), seq: row.get(1) })
        })
        .await
    }

    /// A named subscriber's stored cursor.
    pub async fn load_cursor(&self, name: &str) -> Result<Option<Cursor>> {
        let name = name.to_string();
        self.run("reading a stored cursor", |c| async move {
            let row = c.query_opt("SELECT txid::text, seq FROM pubsub.cursors WHERE name = $1", &[&name]).await?;
            Ok(row.map(|r| Cursor { txid: u64_of(r.get(0)), seq: r.get(1) }))
        })
        .await
    }

    /// Stores a named subscriber's cursor (never moving it backwards).
    pub async fn save_cursor(&self, name: &str, cursor: Cursor) -> Result<()> {
        let name = name.to_string();
        self.run("storing a cursor", |c| async move {
            c.execute(
                "INSERT INTO pubsub.cursors (name, txid, seq) VALUES ($1, $2::text::xid8, $3)
                 ON CONFLICT (name) DO UPDATE SET txid = EXCLUDED.txid, seq = EXCLUDED.seq, updated_at = clock_timestamp()
                 WHERE (pubsub.cursors.txid, pubsub.cursors.seq) < (EXCLUDED.txid, EXCLUDED.seq)",
                &[&name, &cursor.txid.to_string(), &cursor.seq],
            )
            .await?;
            Ok(())
        })
        .await
    }
}
