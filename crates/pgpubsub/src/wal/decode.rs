//! From pgoutput messages to captured events: which channel a table's
//! changes go to (as the WAL had it when they committed), and each event's
//! JSON. No privilege is asked here: captured events go to the log, where
//! row-level security decides who reads them (`source` is their table).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::pgoutput::{self, Msg, Relation, Value};
use super::types::Types;
use crate::event::{Op, WalPosition};
use crate::event_log::json_string;

/// A message larger than this keeps its payload apart in the log, as
/// `pubsub.publish` does past `pubsub.ref_threshold` (its default).
pub(crate) const PAYLOAD_APART: usize = 262_144;

/// The transaction being read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Txn {
    pub(crate) lsn: u64,
    pub(crate) xid: u32,
    /// Commit time, microseconds since 2000-01-01 (PostgreSQL's epoch).
    pub(crate) time_us: i64,
    /// The index of its next row change. Every row change counts, captured
    /// or not, so an event's (lsn, index) is the same every time the
    /// transaction is read.
    pub(crate) next_index: u32,
}

/// One event read from the WAL, ready to append to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Captured {
    /// Its place: commit LSN and index in the transaction.
    pub(crate) at: WalPosition,
    /// Its transaction's xid (32 bits: the log makes it an xid8).
    pub(crate) xid: u32,
    pub(crate) channel: String,
    /// Its table (pg_class oid); `None` for a message.
    pub(crate) source: Option<u32>,
    /// Its JSON after `{"seq":N,"txid":X,"source_txid":Y`, which only the log knows.
    pub(crate) body: String,
    /// A large message's payload, kept apart.
    pub(crate) payload: Option<String>,
}

impl Captured {
    /// Bytes it takes in a batch.
    pub(crate) fn len(&self) -> usize {
        self.body.len() + self.payload.as_ref().map_or(0, String::len) + self.channel.len() + 32
    }
}

/// The channel of each WAL-watched table, and the place in the WAL it is as
/// of: the last change of pubsub.wal_watches applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ChannelMap {
    pub(crate) channels: HashMap<u32, String>,
    pub(crate) at: Option<WalPosition>,
}

impl ChannelMap {
    /// As JSON (`{"<oid>": "<channel>"}`), the form `pubsub.capture_state` keeps.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        self.channels.iter().map(|(oid, ch)| (oid.to_string(), serde_json::Value::from(ch.as_str()))).collect()
    }

    /// From the form `pubsub.capture_state` keeps; entries that are not an
    /// oid and a string are dropped.
    pub(crate) fn from_json(json: &serde_json::Value, at: Option<WalPosition>) -> Self {
        let channels = json
            .as_object()
            .map(|o| o.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        ChannelMap { channels, at }
    }
}

/// What a capturer knows of the stream: its relations and the channel map.
pub(crate) struct Decoder {
    relations: HashMap<u32, Relation>,
    /// The shapes of column types that are not plain scalars: learnt by
    /// the capturer before a relation's first change is decoded.
    pub(crate) types: Types,
    map: ChannelMap,
    /// The map changed since [`Decoder::take_map_change`] was last called.
    map_dirty: bool,
}

/// `true` when `rel` is pgpubsub's table `name`.
fn ours(rel: &Relation, name: &str) -> bool {
    rel.schema == "pubsub" && rel.name == name
}

impl Decoder {
    pub(crate) fn new(map: ChannelMap) -> Self {
        Decoder { relations: HashMap::new(), types: Types::default(), map, map_dirty: false }
    }

    /// Whether the channel map changed since it was last taken.
    pub(crate) fn map_dirty(&self) -> bool {
        self.map_dirty
    }

    /// The channel map, if it changed since the last call.
    pub(crate) fn take_map_change(&mut self) -> Option<ChannelMap> {
        std::mem::take(&mut self.map_dirty).then(|| self.map.clone())
    }

    /// Reads one pgoutput message of `txn`; the events it makes go to `out`,
    /// numbered from `txn.next_index`. Returns how many row changes it held
    /// (what `next_index` moves by), captured or not.
    pub(crate) fn message(&mut self, malformed: &AtomicU64, txn: &Txn, data: &[u8], out: &mut Vec<Captured>) -> u32 {
        let msg = match pgoutput::parse(data) {
            Ok(m) => m,
            Err(e) => {
                malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, lsn = %pgwire_replication::Lsn(txn.lsn), "skipping a WAL message");
                return 0;
            }
        };
        let (rel, op, new, old, old_full) = match msg {
            Msg::Relation(r) => {
                self.relations.insert(r.id, r);
                return 0;
            }
            Msg::Insert { rel, new } => (rel, Op::Insert, Some(new), None, false),
            Msg::Update { rel, old, new } => {
                let full = old.as_ref().is_some_and(|o| o.full);
                (rel, Op::Update, Some(new), old.map(|o| o.values), full)
            }
            Msg::Delete { rel, old } => (rel, Op::Delete, None, Some(old.values), old.full),
            Msg::Truncate { rels } => {
                let n = rels.len() as u32;
                for (i, rel) in rels.into_iter().enumerate() {
                    let at = WalPosition { lsn: txn.lsn, index: txn.next_index + i as u32 };
                    self.change(txn, at, rel, Op::Truncate, None, None, false, out);
                }
                return n;
            }
            Msg::Other => return 0,
        };
        let at = WalPosition { lsn: txn.lsn, index: txn.next_index };
        let Some(relation) = self.relations.get(&rel) else {
            malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(rel, "a WAL change of a table the stream did not describe: skipped");
            return 1;
        };
        if ours(relation, "wal_watches") {
            // Read again after a restart: applied once, by its place.
            if self.map.at.is_some_and(|m| at <= m) {
                return 1;
            }
            self.watch_changed(relation.clone(), new.as_deref(), old.as_deref());
            self.map.at = Some(at);
            self.map_dirty = true;
            return 1;
        }
        if ours(relation, "wal_messages") {
            let Some(new) = new else { return 1 };
            let (Some(channel), Some(payload)) =
                (pgoutput::text(relation, &new, "channel"), pgoutput::text(relation, &new, "payload"))
            else {
                malformed.fetch_add(1, Ordering::Relaxed);
                return 1;
            };
            out.push(message(txn, at, channel, payload));
            return 1;
        }
        if [new.as_deref(), old.as_deref()].into_iter().flatten().any(pgoutput::invalid_utf8) {
            malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(rel, lsn = %pgwire_replication::Lsn(txn.lsn),
                "a value that is not UTF-8 (a SQL_ASCII database?): captured with U+FFFD in place of its bad bytes");
        }
        self.change(txn, at, rel, op, new.as_deref(), old.as_deref(), old_full, out);
        1
    }

    /// A row of pubsub.wal_watches changed: a table was watched, its
    /// channel changed, or it was unwatched.
    fn watch_changed(&mut self, rel: Relation, new: Option<&[Value<'_>]>, old: Option<&[Value<'_>]>) {
        let source =
            |row: Option<&[Value<'_>]>| row.and_then(|r| pgoutput::text(&rel, r, "source")?.parse::<u32>().ok());
        let channels = &mut self.map.channels;
        if let Some(before) = source(old) {
            channels.remove(&before);
        }
        match (source(new), new.and_then(|r| pgoutput::text(&rel, r, "channel"))) {
            (Some(oid), Some(channel)) => {
                channels.insert(oid, channel.to_string());
            }
            // A delete carries the key only: source.
            _ if new.is_none() => {
                if let Some(oid) = source(old) {
                    channels.remove(&oid);
                }
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn change(
        &self,
        txn: &Txn,
        at: WalPosition,
        rel: u32,
        op: Op,
        new: Option<&[Value<'_>]>,
        old: Option<&[Value<'_>]>,
        old_full: bool,
        out: &mut Vec<Captured>,
    ) {
        let Some(channel) = self.map.channels.get(&rel) else { return };
        let Some(relation) = self.relations.get(&rel) else { return };
        let render = |row: Option<&[Value<'_>]>, fallback, keys| {
            row.and_then(|r| pgoutput::row_json(relation, &self.types, r, fallback, keys))
        };
        // Unchanged TOASTed values come from a whole old row only; a
        // key-only old row is rendered as just its key columns.
        let new_json = render(new, old.filter(|_| old_full), false);
        let old_json = render(old, None, !old_full);
        let has_key = relation.columns.iter().any(|c| c.key);
        let key = if has_key && op != Op::Truncate { render(new.or(old), None, true) } else { None };
        let mut body = head(txn, at, "change", channel);
        body.push_str(",\"op\":\"");
        body.push_str(op.as_str());
        body.push_str("\",\"schema\":");
        json_string::write(&mut body, &relation.schema);
        body.push_str(",\"table\":");
        json_string::write(&mut body, &relation.name);
        for (name, value) in [("key", key), ("new", new_json), ("old", old_json)] {
            body.push_str(",\"");
            body.push_str(name);
            body.push_str("\":");
            body.push_str(value.as_deref().unwrap_or("null"));
        }
        body.push('}');
        out.push(Captured { at, xid: txn.xid, channel: channel.clone(), source: Some(rel), body, payload: None });
    }
}

/// A message of pubsub.wal_messages as an event; a large payload is kept
/// apart, as the log keeps those of `pubsub.publish`.
fn message(txn: &Txn, at: WalPosition, channel: &str, payload: &str) -> Captured {
    let mut body = head(txn, at, "message", channel);
    let apart = payload.len() > PAYLOAD_APART;
    if !apart {
        body.push_str(",\"payload\":");
        json_string::write(&mut body, payload);
    }
    body.push('}');
    Captured {
        at,
        xid: txn.xid,
        channel: channel.to_string(),
        source: None,
        body,
        payload: apart.then(|| payload.to_string()),
    }
}

/// The envelope after `{"seq":N,"txid":X,"source_txid":Y`: `lsn`, `index`, `kind`,
/// `channel`, `time` (the commit time).
fn head(txn: &Txn, at: WalPosition, kind: &str, channel: &str) -> String {
    let mut s = String::with_capacity(256);
    s.push_str(",\"lsn\":\"");
    s.push_str(&at.lsn_text());
    s.push_str("\",\"index\":");
    s.push_str(&at.index.to_string());
    s.push_str(",\"kind\":\"");
    s.push_str(kind);
    s.push_str("\",\"channel\":");
    json_string::write(&mut s, channel);
    s.push_str(",\"time\":\"");
    s.push_str(&commit_time(txn.time_us));
    s.push('"');
    s
}

/// PostgreSQL's epoch (2000-01-01) in Unix seconds: commit times count from it.
pub(crate) const PG_EPOCH: u64 = 946_684_800;

/// The latest time RFC 3339 can write (9999-12-31T23:59:59Z), in Unix seconds.
const LAST_SECOND: u64 = 253_402_300_799;

/// A commit time (µs since 2000-01-01) in RFC 3339, UTC; held to
/// 1970..9999, which is all RFC 3339 (and humantime) can write.
fn commit_time(us: i64) -> String {
    let unix_us = i128::from(PG_EPOCH) * 1_000_000 + i128::from(us);
    let unix_us = unix_us.clamp(0, i128::from(LAST_SECOND) * 1_000_000) as u64;
    let t = std::time::UNIX_EPOCH + Duration::from_micros(unix_us);
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_times_are_rfc3339() {
        assert_eq!(commit_time(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(commit_time(1_500_000), "2000-01-01T00:00:01.500000Z");
        assert_eq!(commit_time(i64::MIN), "1970-01-01T00:00:00.000000Z");
        assert_eq!(commit_time(i64::MAX), "9999-12-31T23:59:59.000000Z");
    }

    #[test]
    fn messages_render_as_the_log_keeps_them() {
        let txn = Txn { lsn: 0x1_0000_0010, xid: 7, time_us: 0, next_index: 0 };
        let at = WalPosition { lsn: txn.lsn, index: 2 };
        let small = message(&txn, at, "news", "a \"q\"");
        assert_eq!(
            small.body,
            r#","lsn":"1/10","index":2,"kind":"message","channel":"news","time":"2000-01-01T00:00:00.000000Z","payload":"a \"q\""}"#
        );
        assert_eq!((small.payload, small.source), (None, None));
        let big = message(&txn, at, "news", &"x".repeat(PAYLOAD_APART + 1));
        assert!(big.body.ends_with("Z\"}") && big.payload.as_ref().map(String::len) == Some(PAYLOAD_APART + 1));
    }

    #[test]
    fn the_channel_map_round_trips_through_its_stored_form() {
        let at = Some(WalPosition { lsn: 5, index: 1 });
        let map = ChannelMap { channels: [(16384, "orders".to_string())].into(), at };
        assert_eq!(ChannelMap::from_json(&map.to_json(), at), map);
        let junk = serde_json::json!({"x": "a", "1": 2, "3": "ok"});
        assert_eq!(ChannelMap::from_json(&junk, None).channels, [(3, "ok".to_string())].into());
    }
}
