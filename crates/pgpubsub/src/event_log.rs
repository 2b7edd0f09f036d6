//! The event log, read back: pages of events after a position (see
//! `tail.rs`), the wake lock, heartbeats, durable cursors, and how a stored
//! event becomes the JSON delivered.
//!
//! One statement connection per reader, opened on first use and reopened
//! after a failure, every statement bounded by a timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::cursor::Cursor;
use crate::db::Config;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::json_string;

/// A statement connection for reading the log: opened on first use,
/// reopened after a failure, every statement bounded by a timeout.
#[derive(Debug)]
pub struct LogConn {
    config: Config,
    client: Mutex<Option<Arc<Client>>>,
    /// Longest any one statement may take before the connection is presumed
    /// dead (a silently cut network never answers).
    timeout: Duration,
    /// Connections opened so far (see [`LogConn::generation`]).
    generation: AtomicU64,
}

/// One event as the log stores it. A large published message keeps its
/// payload apart and unescaped (escaping in PostgreSQL costs more than the
/// rest of publishing a megabyte); its JSON is rendered here, byte for byte
/// what `pubsub.event_json` renders in SQL (docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    body: String,
    payload: Option<String>,
}

/// Why a logged event could not be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreadable {
    /// Its JSON is over the size limit (the bytes it would take).
    TooLarge(u64),
    /// It is not one of our events: not JSON, or a payload apart whose body
    /// is not a message envelope to put it in (only a hand-written row).
    NotAnEvent,
}

/// The member a message logged apart gets back.
const PAYLOAD_KEY: &str = r#","payload":"#;

impl Logged {
    /// An event stored as `body`, with its message `payload` apart if set.
    pub fn new(body: String, payload: Option<String>) -> Self {
        Logged { body, payload }
    }

    /// Bytes stored, body and payload: what a reference `~r:<seq>:<bytes>`
    /// names.
    pub fn stored_len(&self) -> u64 {
        (self.body.len() + self.payload.as_ref().map_or(0, String::len)) as u64
    }

    /// Bytes of the JSON text it renders to, counted without rendering it.
    pub fn json_len(&self) -> u64 {
        let Some(payload) = &self.payload else { return self.body.len() as u64 };
        (self.body.len() + PAYLOAD_KEY.len() + json_string::len(payload.as_bytes())) as u64
    }

    /// The envelope `body` with `payload` put back as its last member.
    fn render(body: &str, payload: &str) -> Result<String, Unreadable> {
        let head = match body.strip_suffix('}') {
            Some(head) if head.starts_with('{') && head.len() > 1 => head,
            _ => return Err(Unreadable::NotAnEvent),
        };
        // Room for the payload with a few escapes; more only if it has many.
        let mut out = String::with_capacity(head.len() + PAYLOAD_KEY.len() + payload.len() + payload.len() / 64 + 3);
        out.push_str(head);
        out.push_str(PAYLOAD_KEY);
        json_string::write(&mut out, payload);
        out.push('}');
        Ok(out)
    }

    /// The JSON text as delivered.
    ///
    /// # Errors
    /// [`Unreadable::NotAnEvent`] when the payload is apart and the body is
    /// not a non-empty JSON object to put it in.
    pub fn into_json(self) -> Result<String, Unreadable> {
        match &self.payload {
            None => Ok(self.body),
            Some(payload) => Logged::render(&self.body, payload),
        }
    }

    /// The event that arrived on `channel`, if its JSON fits in `max_bytes`.
    /// A payload apart is moved into the event, not parsed back out of the
    /// JSON rendered for it.
    ///
    /// # Errors
    /// [`Unreadable::TooLarge`] past the limit (nothing is rendered);
    /// [`Unreadable::NotAnEvent`] when it is not one of our events.
    pub fn into_event(self, channel: &str, max_bytes: u64) -> Result<Event, Unreadable> {
        // Escaping at most sixfolds a byte: count only when that could matter.
        if self.stored_len().saturating_mul(6) + 16 > max_bytes {
            let len = self.json_len();
            if len > max_bytes {
                return Err(Unreadable::TooLarge(len));
            }
        }
        match self.payload {
            None => Event::decode(channel, self.body).map_err(|_| Unreadable::NotAnEvent),
            Some(payload) => {
                let json = Logged::render(&self.body, &payload)?;
                Event::message_apart(channel, &self.body, payload, json).ok_or(Unreadable::NotAnEvent)
            }
        }
    }
}

/// One row read back from the log.
#[derive(Debug)]
pub(crate) struct LogRow {
    /// Its place in the log.
    pub cursor: Cursor,
    /// Its channel.
    pub channel: String,
    /// The event, unless over the size limit or not one of ours.
    pub event: Result<Event, Unreadable>,
}

/// What one read of the log returns: rows and the snapshot they were read
/// with, so the reader knows which transactions may still add rows below.
#[derive(Debug)]
pub(crate) struct Poll {
    /// The rows, in (txid, seq) order.
    pub rows: Vec<LogRow>,
    /// More rows matched than the page could hold.
    pub more: bool,
    /// Transactions in progress when the rows were read (`pg_snapshot_xip`).
    pub in_progress: Vec<u64>,
    /// The highest (txid, seq) retention has removed.
    pub pruned: Cursor,
}

/// What a fence statement reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FenceInfo {
    /// `pg_notification_queue_usage()`, 0 to 1.
    pub queue_usage: f64,
}

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
        LogConn { config, client: Mutex::new(None), timeout, generation: AtomicU64::new(0) }
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
        // A page read is a few index scans: JIT compiling it would cost more
        // (35 ms measured on a 200k-event log) than running it.
        if let Err(e) = client.batch_execute("SET jit = off").await {
            return Err(Error::db("setting up the log connection", e));
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        *slot = Some(client.clone());
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

    /// The transactions in progress now, and the first txid not yet given
    /// out: where "from now" starts.
    pub(crate) async fn now(&self) -> Result<(u64, Vec<u64>)> {
        self.run("reading the transaction horizon", |c| async move {
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
        self.run("sending a heartbeat", |c| async move {
            let row = c
                .query_one("SELECT pg_notification_queue_usage(), pg_notify($1, $2)::text", &[&channel, &token])
                .await?;
            Ok(FenceInfo { queue_usage: row.get(0) })
        })
        .await
    }

    /// Reads the events on `channels` (all when `None`) that follow `after`
    /// in (txid, seq) order, and those of the `open` transactions (txid, and
    /// the last seq already read of it): at most `rows` of them and, past
    /// the first, at most `bytes` stored. Events over `max_event_bytes` come
    /// back as [`Unreadable::TooLarge`]. The rows are what one snapshot
    /// shows, and the snapshot's in-progress list comes with them.
    ///
    /// Row-level security applies: a role sees a row change only if it may
    /// SELECT the table it came from.
    ///
    /// Each open transaction is read through its own range of the
    /// (txid, seq) index (a row comparison on both ends: PostgreSQL's
    /// estimate for `txid = …` is poor, and a join on it scanned the whole
    /// log).
    pub(crate) async fn poll(
        &self,
        channels: Option<&[String]>,
        after: Cursor,
        open: &[(u64, i64)],
        rows: i64,
        bytes: i64,
        max_event_bytes: i64,
    ) -> Result<Poll> {
        let channels = channels.map(<[String]>::to_vec);
        let open_txids: Vec<String> = open.iter().map(|(t, _)| t.to_string()).collect();
        let open_seqs: Vec<i64> = open.iter().map(|(_, s)| *s).collect();
        self.run("reading the log", |c| async move {
            let found = c
                .query(
                    "SELECT s.snap, s.pruned_txid, s.pruned_seq, p.txid::text, p.seq, p.channel,
                            CASE WHEN p.len <= $8 THEN p.body END, CASE WHEN p.len <= $8 THEN p.payload END,
                            p.len, p.page_rows
                     FROM (SELECT pg_current_snapshot()::text AS snap, r.pruned_txid::text, r.pruned_seq
                           FROM pubsub.retention r) s
                     LEFT JOIN LATERAL (
                         SELECT * FROM (
                             SELECT *, (sum(len) OVER (ORDER BY txid, seq))::bigint - len AS before,
                                    count(*) OVER () AS page_rows
                             FROM ((SELECT e.txid, e.seq, e.channel, e.body, e.payload, e.len
                                    FROM unnest($4::text[]::xid8[], $5::int8[]) o(t, s)
                                    CROSS JOIN LATERAL (
                                        SELECT x.txid, x.seq, x.channel, x.body, x.payload,
                                               (octet_length(x.body) + coalesce(octet_length(x.payload), 0))::bigint AS len
                                        FROM pubsub.events x
                                        WHERE (x.txid, x.seq) > (o.t, o.s)
                                          AND (x.txid, x.seq) <= (o.t, 9223372036854775807::bigint)
                                          AND ($1::text[] IS NULL OR x.channel = ANY($1))
                                        ORDER BY x.txid, x.seq LIMIT $6) e)
                                   UNION ALL
                                   (SELECT e.txid, e.seq, e.channel, e.body, e.payload,
                                           (octet_length(e.body) + coalesce(octet_length(e.payload), 0))::bigint
                                    FROM pubsub.events e
                                    WHERE (e.txid, e.seq) > ($2::text::xid8, $3) AND ($1::text[] IS NULL OR e.channel = ANY($1))
                                    ORDER BY e.txid, e.seq LIMIT $6)
                                   ORDER BY txid, seq LIMIT $6) page) sized
                         WHERE before < $7 OR before = 0) p ON true
                     ORDER BY p.txid, p.seq",
                    &[
                        &channels,
                        &after.txid.to_string(),
                        &after.seq,
                        &open_txids,
                        &open_seqs,
                        &rows,
                        &bytes,
                        &max_event_bytes,
                    ],
                )
                .await?;
            let Some(first) = found.first() else {
                // No retention row: not a schema of ours.
                return Ok(None);
            };
            let snap: &str = first.get(0);
            let pruned = Cursor { txid: u64_of(first.get(1)), seq: first.get(2) };
            let page_rows: Option<i64> = first.get(9);
            let rows_out: Vec<LogRow> = found
                .iter()
                .filter_map(|r| {
                    let txid: &str = r.get::<_, Option<&str>>(3)?;
                    let channel: String = r.get(5);
                    let event = match r.get::<_, Option<String>>(6) {
                        Some(body) => Logged::new(body, r.get(7)).into_event(&channel, max_event_bytes as u64),
                        None => Err(Unreadable::TooLarge(r.get::<_, i64>(8) as u64)),
                    };
                    Some(LogRow { cursor: Cursor { txid: u64_of(txid), seq: r.get(4) }, channel, event })
                })
                .collect();
            let more = page_rows.is_some_and(|n| n >= rows || (rows_out.len() as i64) < n);
            Ok(Some(Poll { rows: rows_out, more, in_progress: in_progress(snap), pruned }))
        })
        .await?
        .ok_or(Error::NotMigrated)
    }

    /// Tries to become the waiting listener: takes the wake lock if no
    /// writer holds it, or finds that another listener holds it.
    pub(crate) async fn try_wait(&self) -> Result<WaitLock> {
        self.run("taking the wake lock", |c| async move {
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
        self.run("releasing the wake lock", |c| async move {
            c.execute("SELECT pg_advisory_unlock($1)", &[&WAKE_KEY]).await?;
            Ok(())
        })
        .await
    }

    /// A named subscriber's stored cursor.
    pub(crate) async fn load_cursor(&self, name: &str) -> Result<Option<Cursor>> {
        let name = name.to_string();
        self.run("reading a stored cursor", |c| async move {
            let row = c.query_opt("SELECT txid::text, seq FROM pubsub.cursors WHERE name = $1", &[&name]).await?;
            Ok(row.map(|r| Cursor { txid: u64_of(r.get(0)), seq: r.get(1) }))
        })
        .await
    }

    /// Stores a named subscriber's cursor (never moving it backwards).
    pub(crate) async fn save_cursor(&self, name: &str, cursor: Cursor) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::{Logged, Unreadable};
    use crate::json_string;

    const HEAD: &str = r#"{"seq":7,"txid":9,"kind":"message","channel":"c","time":"2026-11-21T00:00:00Z"}"#;

    #[test]
    fn a_body_without_a_payload_is_the_json() {
        let logged = Logged::new("[1]".into(), None);
        assert_eq!((logged.stored_len(), logged.json_len()), (3, 3));
        assert_eq!(logged.into_json().unwrap(), "[1]");
    }

    #[test]
    fn strings_escape_as_serde_json_and_postgres_do() {
        let every: String = (1u8..0x80).map(char::from).chain("é€😀\u{2028}".chars()).collect();
        // Specials at every offset within and across eight-byte words.
        for s in ["", "plain", "q\"b\\s/", "\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}", "12345678\"", "1234567\u{0}x", &every] {
            let mut out = String::new();
            json_string::write(&mut out, s);
            let want = serde_json::to_string(s).unwrap();
            assert_eq!(out, want, "{s:?}");
            assert_eq!(json_string::len(s.as_bytes()), want.len(), "{s:?}");
        }
        // PostgreSQL's own escapes, spelled out.
        let mut out = String::new();
        json_string::write(&mut out, "\u{1}\u{8}\"\\\u{1f}");
        assert_eq!(out, r#""\u0001\b\"\\\u001f""#);
    }

    #[test]
    fn a_payload_apart_renders_as_the_last_member_and_moves_into_the_event() {
        let payload = "q\"\n😀";
        let logged = Logged::new(HEAD.into(), Some(payload.into()));
        assert_eq!(logged.stored_len() as usize, HEAD.len() + payload.len());
        let want = format!("{},\"payload\":{}}}", &HEAD[..HEAD.len() - 1], serde_json::to_string(payload).unwrap());
        assert_eq!(logged.json_len() as usize, want.len());
        assert_eq!(logged.clone().into_json().unwrap(), want);
        let e = logged.into_event("c", u64::MAX).unwrap();
        assert_eq!((e.json(), e.seq, e.txid), (want.as_str(), Some(7), Some(9)));
        assert_eq!(e.message().unwrap().payload, payload);
    }

    #[test]
    fn no_envelope_is_not_an_event_and_the_limit_is_on_the_json() {
        for body in ["", "}", "{}", "[]", "x}", "{\"a\":1} "] {
            let logged = Logged::new(body.into(), Some("p".into()));
            assert_eq!(logged.clone().into_json().err(), Some(Unreadable::NotAnEvent), "{body:?}");
            assert_eq!(logged.into_event("c", u64::MAX).err(), Some(Unreadable::NotAnEvent), "{body:?}");
        }
        // An envelope for another channel, or of another kind, is not ours.
        for body in [HEAD.replace("\"c\"", "\"d\""), HEAD.replace("message", "change")] {
            assert_eq!(
                Logged::new(body, Some("p".into())).into_event("c", u64::MAX).err(),
                Some(Unreadable::NotAnEvent)
            );
        }
        let logged = Logged::new(HEAD.into(), Some("\u{1}".repeat(10)));
        let len = logged.json_len();
        assert_eq!(len as usize, HEAD.len() + 11 + 2 + 60);
        assert_eq!(logged.clone().into_event("c", len - 1).err(), Some(Unreadable::TooLarge(len)));
        assert_eq!(logged.into_event("c", len).map(|e| e.json().len() as u64).ok(), Some(len));
    }
}
