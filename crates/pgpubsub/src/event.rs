//! Events: what a subscriber receives, decoded from the JSON text that
//! arrived (whole, reassembled from chunks, or fetched from the log).
//!
//! Four kinds arrive on a channel:
//! - [`Body::Change`]: a row change, captured by `pubsub.watch`'s trigger or
//!   from the WAL (`pubsub.watch_wal` and the capturer);
//! - [`Body::Message`]: a message sent with `pubsub.publish` (or through
//!   `pubsub.wal_messages`);
//! - [`Body::Resync`]: a gap in capture from the WAL (the server dropped
//!   changes the capturer had not read): reload what the channel shows;
//! - [`Body::Notify`]: a foreign notification, anything someone sent with
//!   `pg_notify` (for instance the seed's `job_channel`), passed on as it
//!   is. Not from the log: `seq` is `None`, it is delivered live only, and
//!   any role that can NOTIFY can send one.
//!
//! Row values are kept as raw JSON text and parsed only when asked
//! ([`Change::new_as`] and friends), so decoding costs one scan of the text.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;

/// One event, as delivered.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event {
    /// The channel it arrived on.
    pub channel: String,
    /// Its sequence in `pubsub.events`; `None` for foreign notifications,
    /// which are not logged.
    pub seq: Option<i64>,
    /// The transaction that wrote it to the log (`xid8`); with `seq`, its
    /// place there. For an event a trigger or `publish` logged, also the
    /// transaction that made it; for one captured from the WAL, the
    /// capturer's (see `source_txid`). `None` for foreign notifications.
    pub txid: Option<u64>,
    /// For an event captured from the WAL: the transaction that made the
    /// change (`xid8`), for relating it to a snapshot of the table.
    pub source_txid: Option<u64>,
    /// For an event captured from the WAL ([`crate::capture`]): its source
    /// transaction's commit LSN and its index in it; `None` otherwise.
    pub wal: Option<WalPosition>,
    /// When it happened, ISO 8601: the database clock at the write for a
    /// logged event, the commit time for one captured from the WAL; `None`
    /// for foreign notifications.
    pub time: Option<String>,
    /// What it carries.
    pub body: Body,
    /// The event as one line of JSON: the exact text that was sent for our
    /// events, an envelope `{"seq":null,"kind":"notify",...}` for foreign ones.
    json: String,
}

/// An event's place in the WAL: the commit LSN of its transaction and its
/// index within it. Ordered as the events were committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalPosition {
    /// The commit LSN, the same for every event of one transaction.
    pub lsn: u64,
    /// The event's place in its transaction, from 0.
    pub index: u32,
}

impl WalPosition {
    /// The LSN in PostgreSQL's `X/Y` form.
    pub fn lsn_text(&self) -> String {
        pgwire_replication::Lsn(self.lsn).to_string()
    }

    /// Parses PostgreSQL's `X/Y` form. Stricter than `Lsn::parse`, which
    /// lets a part wider than 32 bits overflow into another LSN: this reads
    /// text from outside (a NATS message).
    pub fn parse_lsn(text: &str) -> Option<u64> {
        let (hi, lo) = text.split_once('/')?;
        let hex = |s: &str| (!s.is_empty() && s.len() <= 8).then(|| u32::from_str_radix(s, 16).ok()).flatten();
        Some((u64::from(hex(hi)?) << 32) | u64::from(hex(lo)?))
    }
}

/// `X/Y:index`.
impl std::fmt::Display for WalPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.lsn_text(), self.index)
    }
}

/// What an event carries.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Body {
    /// A row change on a watched table.
    Change(Change),
    /// A published message.
    Message(Message),
    /// A foreign JSON notification.
    Notify(Box<RawValue>),
    /// A gap in capture from the WAL on this channel: changes committed
    /// while the capturer's slot was invalid were never captured. What a
    /// subscriber holds of the channel's tables should be read again.
    Resync(Resync),
}

/// A gap in capture from the WAL (see [`Body::Resync`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Resync {
    /// Why, as the capturer put it.
    pub reason: String,
}

/// The operation of a row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
#[non_exhaustive]
pub enum Op {
    /// A row was inserted: `new` is set.
    Insert,
    /// A row was updated: `new` and `old` are set.
    Update,
    /// A row was deleted: `old` is set.
    Delete,
    /// The table was truncated: no row, no key.
    Truncate,
}

impl Op {
    /// The SQL name: `INSERT`, `UPDATE`, `DELETE` or `TRUNCATE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
        }
    }
}

/// A row change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Change {
    /// What happened.
    pub op: Op,
    /// Schema of the table.
    pub schema: String,
    /// Name of the table.
    pub table: String,
    /// Primary-key columns and values, as a JSON object; `None` for a table
    /// without a primary key, and for TRUNCATE.
    pub key: Option<Box<RawValue>>,
    /// The row after the change (INSERT, UPDATE), as a JSON object.
    pub new: Option<Box<RawValue>>,
    /// The row before the change (UPDATE, DELETE), as a JSON object.
    pub old: Option<Box<RawValue>>,
    /// Under row-level authorization ([`crate::views`]): the row entered
    /// or left what this subscriber may see. `None`: a change within it.
    pub view: Option<View>,
}

/// How an UPDATE moved a row for a subscriber under row-level
/// authorization ([`crate::views`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum View {
    /// The row became visible: `new` is the whole row (as far as the
    /// subscriber may read it), `old` is absent.
    Enter,
    /// The row is no longer visible: only `key` is set.
    Leave,
}

impl Change {
    /// The new row deserialized into `T`; `Ok(None)` when there is none.
    ///
    /// # Errors
    /// When the row does not fit `T`.
    pub fn new_as<T: DeserializeOwned>(&self) -> serde_json::Result<Option<T>> {
        self.new.as_deref().map(|r| serde_json::from_str(r.get())).transpose()
    }

    /// The old row deserialized into `T`; `Ok(None)` when there is none.
    ///
    /// # Errors
    /// When the row does not fit `T`.
    pub fn old_as<T: DeserializeOwned>(&self) -> serde_json::Result<Option<T>> {
        self.old.as_deref().map(|r| serde_json::from_str(r.get())).transpose()
    }
}

/// A published message.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Message {
    /// The payload, byte for byte as published.
    pub payload: String,
}

impl Message {
    /// The payload parsed as JSON into `T`.
    ///
    /// # Errors
    /// When the payload is not JSON of that shape.
    pub fn json<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(&self.payload)
    }
}

/// Why a payload could not be turned into an event.
#[derive(Debug, thiserror::Error)]
#[error("not a JSON event: {0}")]
pub struct DecodeError(#[from] serde_json::Error);

/// The fields of our envelope; anything may be missing in a foreign payload.
#[derive(Deserialize)]
struct Envelope<'a> {
    seq: Option<i64>,
    #[serde(borrow)]
    lsn: Option<&'a str>,
    index: Option<u32>,
    txid: Option<u64>,
    source_txid: Option<u64>,
    #[serde(borrow)]
    kind: Option<&'a str>,
    #[serde(borrow)]
    channel: Option<&'a str>,
    time: Option<String>,
    op: Option<Op>,
    schema: Option<String>,
    table: Option<String>,
    key: Option<Box<RawValue>>,
    new: Option<Box<RawValue>>,
    old: Option<Box<RawValue>>,
    view: Option<View>,
    payload: Option<String>,
    reason: Option<String>,
}

impl Event {
    /// Decodes the text of one event received on `channel`.
    ///
    /// Our envelope is recognised by `seq`, `kind` and a `channel` equal to
    /// the one it arrived on; any other JSON is a [`Body::Notify`].
    ///
    /// # Errors
    /// When the text is not JSON at all.
    pub fn decode(channel: &str, text: String) -> Result<Event, DecodeError> {
        if let Some(Ours { seq, wal, txid, source_txid, time, body }) = ours(channel, &text) {
            let json = one_line(text);
            return Ok(Event { channel: channel.to_string(), seq, txid, source_txid, wal, time, body, json });
        }
        let raw: Box<RawValue> = serde_json::from_str(&text)?;
        Ok(Event::notify(channel, raw))
    }

    /// A message logged with its payload apart: `envelope` is the event's
    /// JSON without the payload member, `json` the whole. `None` unless the
    /// envelope is one of our messages for `channel`.
    pub(crate) fn message_apart(channel: &str, envelope: &str, payload: String, json: String) -> Option<Event> {
        let env = serde_json::from_str::<Envelope<'_>>(envelope).ok()?;
        if env.kind != Some("message") || env.channel != Some(channel) || env.payload.is_some() {
            return None;
        }
        let body = Body::Message(Message { payload });
        Some(Event {
            channel: channel.to_string(),
            seq: Some(env.seq?),
            txid: env.txid,
            source_txid: env.source_txid,
            wal: wal_position(env.lsn, env.index),
            time: env.time,
            body,
            json,
        })
    }

    /// A foreign notification's payload as an event of kind `notify`: JSON
    /// is passed on as it is, any other text as a JSON string. Never taken
    /// for one of our events, whatever it looks like: ours come from the log.
    pub(crate) fn foreign(channel: &str, text: String) -> Event {
        let raw = match serde_json::from_str::<Box<RawValue>>(&text) {
            Ok(raw) => raw,
            Err(_) => serde_json::value::to_raw_value(&text).unwrap_or_else(|_| Box::<RawValue>::default()),
        };
        Event::notify(channel, raw)
    }

    /// Whether `text` is shaped like one of our events on `channel`.
    pub(crate) fn is_ours(channel: &str, text: &str) -> bool {
        text.starts_with('{') && ours(channel, text).is_some()
    }

    fn notify(channel: &str, raw: Box<RawValue>) -> Event {
        #[derive(serde::Serialize)]
        struct Wrapped<'a> {
            seq: Option<i64>,
            kind: &'static str,
            channel: &'a str,
            payload: &'a RawValue,
        }
        let raw = compact(raw);
        let json =
            serde_json::to_string(&Wrapped { seq: None, kind: "notify", channel, payload: &raw }).unwrap_or_default();
        Event {
            channel: channel.to_string(),
            seq: None,
            txid: None,
            source_txid: None,
            wal: None,
            time: None,
            body: Body::Notify(raw),
            json,
        }
    }

    /// The event as one line of JSON (no newline in it), for logs and pipes.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The kind: `change`, `message`, `resync` or `notify`.
    pub fn kind(&self) -> &'static str {
        match self.body {
            Body::Change(_) => "change",
            Body::Message(_) => "message",
            Body::Resync(_) => "resync",
            Body::Notify(_) => "notify",
        }
    }

    /// The row change, if this is one.
    pub fn change(&self) -> Option<&Change> {
        match &self.body {
            Body::Change(c) => Some(c),
            _ => None,
        }
    }

    /// This row change as a subscriber under row-level authorization
    /// sees it ([`crate::views`]): `change`'s rows and view, in the same
    /// envelope (seq, txid, place, channel, time). `None` unless this is a
    /// row change.
    pub(crate) fn seen_as(&self, change: Change) -> Option<Event> {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            seq: Option<i64>,
            txid: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            source_txid: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            lsn: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            index: Option<u32>,
            kind: &'static str,
            channel: &'a str,
            time: Option<&'a str>,
            op: Op,
            #[serde(skip_serializing_if = "Option::is_none")]
            view: Option<View>,
            schema: &'a str,
            table: &'a str,
            key: Option<&'a RawValue>,
            new: Option<&'a RawValue>,
            old: Option<&'a RawValue>,
        }
        self.change()?;
        let json = serde_json::to_string(&Out {
            seq: self.seq,
            txid: self.txid,
            source_txid: self.source_txid,
            lsn: self.wal.map(|w| w.lsn_text()),
            index: self.wal.map(|w| w.index),
            kind: "change",
            channel: &self.channel,
            time: self.time.as_deref(),
            op: change.op,
            view: change.view,
            schema: &change.schema,
            table: &change.table,
            key: change.key.as_deref(),
            new: change.new.as_deref(),
            old: change.old.as_deref(),
        })
        .ok()?;
        Some(Event { body: Body::Change(change), json, ..self.clone() })
    }

    /// The message, if this is one.
    pub fn message(&self) -> Option<&Message> {
        match &self.body {
            Body::Message(m) => Some(m),
            _ => None,
        }
    }
}

/// What our envelope says.
struct Ours {
    seq: Option<i64>,
    wal: Option<WalPosition>,
    txid: Option<u64>,
    source_txid: Option<u64>,
    time: Option<String>,
    body: Body,
}

/// Our envelope's place (a `seq` in the log, or an `lsn` and `index` in
/// the WAL), time and body, if `text` is one of our events for `channel`.
fn ours(channel: &str, text: &str) -> Option<Ours> {
    let env = serde_json::from_str::<Envelope<'_>>(text).ok()?;
    if env.kind.is_none() || env.channel != Some(channel) {
        return None;
    }
    let body = match (env.kind?, env.op, env.payload) {
        ("change", Some(op), _) => Body::Change(Change {
            op,
            schema: env.schema.unwrap_or_default(),
            table: env.table.unwrap_or_default(),
            key: non_null(env.key),
            new: non_null(env.new),
            old: non_null(env.old),
            view: env.view,
        }),
        ("message", _, Some(payload)) => Body::Message(Message { payload }),
        ("resync", _, _) => Body::Resync(Resync { reason: env.reason.unwrap_or_default() }),
        _ => return None,
    };
    let wal = wal_position(env.lsn, env.index);
    // Ours has a place: a seq in the log (and, captured from the WAL, an
    // lsn and index there too), or, as the WAL readers of 0.1 sent it, only
    // the latter.
    if env.seq.is_none() && wal.is_none() {
        return None;
    }
    Some(Ours { seq: env.seq, wal, txid: env.txid, source_txid: env.source_txid, time: env.time, body })
}

/// `lsn` and `index`, when both are there and the LSN is well formed.
fn wal_position(lsn: Option<&str>, index: Option<u32>) -> Option<WalPosition> {
    Some(WalPosition { lsn: WalPosition::parse_lsn(lsn?)?, index: index? })
}

fn non_null(v: Option<Box<RawValue>>) -> Option<Box<RawValue>> {
    v.filter(|r| r.get() != "null")
}

/// JSON text may contain newlines between tokens (never inside strings); our
/// own events never do, so this only costs for foreign pretty-printed JSON.
fn one_line(text: String) -> String {
    if !text.contains('\n') {
        return text;
    }
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => v.to_string(),
        Err(_) => text.replace(['\n', '\r'], " "),
    }
}

fn compact(raw: Box<RawValue>) -> Box<RawValue> {
    if !raw.get().contains('\n') {
        return raw;
    }
    let text = one_line(raw.get().to_string());
    RawValue::from_string(text).unwrap_or(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_change() {
        let text = r#"{"seq" : 7, "kind" : "change", "channel" : "t", "time" : "2026-01-01T00:00:00+00:00", "op" : "UPDATE", "schema" : "public", "table" : "t", "key" : {"id": 1}, "new" : {"id": 1, "name": "b"}, "old" : {"id": 1, "name": "a"}}"#;
        let e = Event::decode("t", text.to_string()).unwrap();
        assert_eq!((e.seq, e.kind(), e.json()), (Some(7), "change", text));
        let c = e.change().unwrap();
        assert_eq!((c.op, c.table.as_str()), (Op::Update, "t"));
        #[derive(Deserialize, PartialEq, Debug)]
        struct Row {
            id: i64,
            name: String,
        }
        assert_eq!(c.new_as::<Row>().unwrap(), Some(Row { id: 1, name: "b".into() }));
        assert_eq!(c.old_as::<Row>().unwrap().unwrap().name, "a");
    }

    #[test]
    fn delete_has_no_new() {
        let text = r#"{"seq":1,"kind":"change","channel":"t","op":"DELETE","key":null,"new":null,"old":{"id":1}}"#;
        let c = Event::decode("t", text.into()).unwrap();
        let c = c.change().unwrap();
        assert!(c.new.is_none() && c.key.is_none() && c.old.is_some());
    }

    #[test]
    fn message_payload_is_exact() {
        let text = r#"{"seq":3,"kind":"message","channel":"m","payload":"a\"b\nc\u00e9"}"#;
        let e = Event::decode("m", text.into()).unwrap();
        assert_eq!(e.message().unwrap().payload, "a\"b\nc\u{e9}");
        assert!(!e.json().contains('\n'));
    }

    #[test]
    fn foreign_json_is_notify_on_one_line() {
        let e = Event::decode("job_channel", "{\n \"job_id\": 1,\n \"status\": \"new\"\n}".into()).unwrap();
        assert_eq!(e.kind(), "notify");
        assert_eq!(e.seq, None);
        let v: serde_json::Value = serde_json::from_str(e.json()).unwrap();
        assert_eq!(v["payload"]["job_id"], 1);
        assert!(!e.json().contains('\n'));
        // An envelope for another channel is not ours: passed on untouched.
        let e = Event::decode("x", r#"{"seq":1,"kind":"message","channel":"y","payload":"p"}"#.into()).unwrap();
        assert_eq!(e.kind(), "notify");
        for scalar in ["42", "\"s\"", "[1,2]", "null"] {
            assert_eq!(Event::decode("x", scalar.into()).unwrap().kind(), "notify");
        }
    }

    #[test]
    fn decodes_an_event_captured_from_the_wal() {
        let text = r#"{"lsn":"16/B374D848","index":2,"txid":7,"kind":"change","channel":"t","time":"2026-01-01T00:00:00Z","op":"INSERT","schema":"public","table":"t","key":{"id":1},"new":{"id":1},"old":null}"#;
        let e = Event::decode("t", text.into()).unwrap();
        assert_eq!((e.seq, e.wal, e.kind()), (None, Some(WalPosition { lsn: 0x16_B374_D848, index: 2 }), "change"));
        assert_eq!(e.wal.unwrap().to_string(), "16/B374D848:2");
        assert_eq!(WalPosition { lsn: 0x16_B374_D848, index: 0 }.lsn_text(), "16/B374D848");
        for bad in ["1", "16", "/1", "x/1", "123456789/1"] {
            assert_eq!(WalPosition::parse_lsn(bad), None, "{bad}");
        }
        // Logged by the capturer: a seq, the source transaction, and its place in the WAL.
        let text = r#"{"seq":9,"txid":4294967309,"source_txid":4294967302,"lsn":"0/1A","index":0,"kind":"message","channel":"t","time":"2026-01-01T00:00:00Z","payload":"p"}"#;
        let e = Event::decode("t", text.into()).unwrap();
        assert_eq!((e.seq, e.txid, e.source_txid), (Some(9), Some(4_294_967_309), Some(4_294_967_302)));
        assert_eq!((e.wal.map(|w| w.lsn), e.kind()), (Some(0x1A), "message"));
        let text =
            r#"{"seq":10,"txid":5,"kind":"resync","channel":"t","time":"2026-01-01T00:00:00Z","reason":"slot lost"}"#;
        let e = Event::decode("t", text.into()).unwrap();
        let Body::Resync(r) = &e.body else { panic!("{:?}", e.body) };
        assert_eq!((e.kind(), r.reason.as_str(), e.wal), ("resync", "slot lost", None));
        // Without an index (or with a bad lsn) it is not ours.
        let e = Event::decode("t", r#"{"lsn":"0/1","kind":"message","channel":"t","payload":"p"}"#.into()).unwrap();
        assert_eq!(e.kind(), "notify");
    }

    #[test]
    fn non_json_is_an_error() {
        for bad in ["hello", "", "{", "{\"seq\":1", "\u{0}"] {
            assert!(Event::decode("x", bad.into()).is_err(), "{bad:?}");
        }
    }
}
