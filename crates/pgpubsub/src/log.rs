//! Reading the event log: catch-up after a gap, references, fences (the
//! heartbeat that also moves cursors), durable cursors and retention.
//!
//! One statement connection per listener, shared by its reading task and its
//! subscriber, opened on first use and reopened after a failure.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::cursor::Cursor;
use crate::db::Config;
use crate::error::{Error, Result};
use crate::event::Event;

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

/// A string as a JSON string literal, escaped exactly as PostgreSQL's
/// `to_json(text)` and serde_json escape it: `"` `\\` and the short forms
/// `\b \f \n \r \t`, other control characters as `\u00xx` (lowercase hex),
/// nothing else. Runs with nothing to escape are skipped eight bytes at a
/// time and copied whole.
pub mod json_string {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;

    /// Bytes each byte takes once escaped.
    const WIDTH: [u8; 256] = {
        let mut t = [1u8; 256];
        let mut b = 0;
        while b < 0x20 {
            t[b] = 6;
            b += 1;
        }
        t[0x08] = 2;
        t[0x0c] = 2;
        t[b'\n' as usize] = 2;
        t[b'\r' as usize] = 2;
        t[b'\t' as usize] = 2;
        t[b'"' as usize] = 2;
        t[b'\\' as usize] = 2;
        t
    };

    /// Whether any of the eight bytes in `w` needs escaping (exact: the
    /// classic "has a zero byte" and "has a byte below n" tests).
    fn any_special(w: u64) -> bool {
        let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
        let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
        (below_space | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))) != 0
    }

    /// The offset of the first byte at or after `i` that needs escaping, or
    /// the length.
    fn next_special(s: &[u8], mut i: usize) -> usize {
        while let Some(word) = s.get(i..i + 8) {
            if any_special(u64::from_le_bytes(word.try_into().unwrap_or([0; 8]))) {
                break;
            }
            i += 8;
        }
        while i < s.len() && WIDTH[usize::from(s[i])] == 1 {
            i += 1;
        }
        i
    }

    /// Length of `s` as a JSON string literal, quotes included.
    pub fn len(s: &[u8]) -> usize {
        let mut n = s.len() + 2;
        let mut i = next_special(s, 0);
        while i < s.len() {
            n += usize::from(WIDTH[usize::from(s[i])]) - 1;
            i = next_special(s, i + 1);
        }
        n
    }

    /// Appends `s` as a JSON string literal, quotes included.
    pub fn write(out: &mut String, s: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = s.as_bytes();
        out.push('"');
        let mut from = 0;
        let mut i = next_special(bytes, 0);
        // Every byte escaped is ASCII, so each run between two is whole
        // characters.
        while i < bytes.len() {
            out.push_str(&s[from..i]);
            let b = bytes[i];
            match b {
                b'"' => out.push_str("\\\""),
                b'\\' => out.push_str("\\\\"),
                0x08 => out.push_str("\\b"),
                0x0c => out.push_str("\\f"),
                b'\n' => out.push_str("\\n"),
                b'\r' => out.push_str("\\r"),
                b'\t' => out.push_str("\\t"),
                _ => {
                    out.push_str("\\u00");
                    out.push(char::from(HEX[usize::from(b >> 4)]));
                    out.push(char::from(HEX[usize::from(b & 15)]));
                }
            }
            from = i + 1;
            i = next_special(bytes, from);
        }
        out.push_str(&s[from..]);
        out.push('"');
    }
}

/// One row read back from the log.
#[derive(Debug)]
#[non_exhaustive]
pub struct LogRow {
    /// Its place in catch-up order.
    pub cursor: Cursor,
    /// Its channel.
    pub channel: String,
    /// The event, unless over the size limit or not one of ours.
    pub event: Result<Event, Unreadable>,
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

    /// Reads one referenced event as stored.
    pub async fn fetch(&self, channel: &str, seq: i64) -> Result<Option<Logged>> {
        let channel = channel.to_string();
        self.run("reading a referenced event", |c| async move {
            let row = c
                .query_opt("SELECT body, payload FROM pubsub.events WHERE seq = $1 AND channel = $2", &[&seq, &channel])
                .await?;
            Ok(row.map(|r| Logged::new(r.get(0), r.get(1))))
        })
        .await
    }

    /// Events on `channels` after `after`, in (txid, seq) order: at most
    /// `rows` of them and, past the first, at most `bytes` stored.
    /// Events over `max_event_bytes` come back as [`Unreadable::TooLarge`].
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
                    "SELECT txid, seq, channel, CASE WHEN len <= $6 THEN body END, CASE WHEN len <= $6 THEN payload END,
                            len, page_rows
                     FROM (SELECT *, (sum(len) OVER (ORDER BY t, seq))::bigint - len AS before, count(*) OVER () AS page_rows
                           FROM (SELECT txid::text AS txid, txid AS t, seq, channel, body, payload,
                                        (octet_length(body) + coalesce(octet_length(payload), 0))::bigint AS len
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
                .map(|r| {
                    let channel: String = r.get(2);
                    let event = match r.get::<_, Option<String>>(3) {
                        Some(body) => Logged::new(body, r.get(4)).into_event(&channel, max_event_bytes as u64),
                        None => Err(Unreadable::TooLarge(r.get::<_, i64>(5) as u64)),
                    };
                    LogRow { cursor: Cursor { txid: u64_of(r.get(0)), seq: r.get(1) }, channel, event, page_rows: r.get(6) }
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

#[cfg(test)]
mod tests {
    use super::{json_string, Logged, Unreadable};

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
