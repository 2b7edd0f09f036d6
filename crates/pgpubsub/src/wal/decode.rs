//! From pgoutput messages to events: which channel a table's changes go
//! to, whether this reader may see them, and the event's JSON.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::pgoutput::{self, Msg, Relation, Value};
use crate::event::{Body, Change, Event, Message, Op};
use crate::stats::Stats;

/// How long a privilege check is trusted before it is asked again: a
/// REVOKE takes effect within this.
const PRIVILEGE_TTL: Duration = Duration::from_secs(1);

/// The transaction being read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Txn {
    pub(super) lsn: u64,
    pub(super) xid: u32,
    /// Commit time, microseconds since 2000-01-01 (PostgreSQL's epoch).
    pub(super) time_us: i64,
    /// The index of its next row change. Every row change counts, whether
    /// this reader gets it or not, so an event's (lsn, index) is the same
    /// for every reader and every time the transaction is read.
    pub(super) next_index: u32,
}

/// What a reader knows of the stream: its relations, the channel of each
/// watched table, and what its role may read.
pub(super) struct Decoder {
    relations: HashMap<u32, Relation>,
    /// Watched table (pg_class oid) → channel, from pubsub.wal_watches:
    /// loaded at connect, then kept up to date from the stream itself.
    channels: HashMap<u32, String>,
    /// Relation → (may SELECT, when asked).
    allowed: HashMap<u32, (bool, Instant)>,
    /// Channels this reader wants; empty: all.
    wanted: Vec<String>,
}

/// `true` when `rel` is pgpubsub's table `name`.
fn ours(rel: &Relation, name: &str) -> bool {
    rel.schema == "pubsub" && rel.name == name
}

impl Decoder {
    pub(super) fn new(channels: HashMap<u32, String>, wanted: Vec<String>) -> Self {
        Decoder { relations: HashMap::new(), channels, allowed: HashMap::new(), wanted }
    }

    /// The watched tables' channels as the database has them now (after a
    /// reconnect: a temporary slot starts from the present).
    pub(super) fn set_channels(&mut self, channels: HashMap<u32, String>) {
        self.channels = channels;
        self.allowed.clear();
    }

    fn wants(&self, channel: &str) -> bool {
        self.wanted.is_empty() || self.wanted.iter().any(|c| c == channel)
    }

    /// Whether this reader's role may SELECT `rel` (asked of the server,
    /// remembered for [`PRIVILEGE_TTL`]).
    async fn may_read(&mut self, side: &Client, rel: u32) -> crate::Result<bool> {
        if let Some(&(ok, at)) = self.allowed.get(&rel) {
            if at.elapsed() < PRIVILEGE_TTL {
                return Ok(ok);
            }
        }
        // NULL for a table dropped since: nobody reads it.
        let ok: bool = side
            .query_one("SELECT coalesce(has_table_privilege($1::oid, 'SELECT'), false)", &[&rel])
            .await
            .map_err(|e| crate::Error::db("checking the reader's privileges", e))?
            .get(0);
        self.allowed.insert(rel, (ok, Instant::now()));
        Ok(ok)
    }

    /// Reads one pgoutput message of `txn`; the events it makes, if any,
    /// go to `out`, numbered from `txn.next_index`. Returns how many row
    /// changes it held (what `next_index` moves by), whoever gets them.
    /// Changes nothing but caches before its last await, so a call
    /// cancelled half-way can be made again.
    pub(super) async fn message(
        &mut self,
        side: &Client,
        stats: &Stats,
        txn: &Txn,
        data: &[u8],
        out: &mut Vec<Event>,
    ) -> crate::Result<u32> {
        let msg = match pgoutput::parse(data) {
            Ok(m) => m,
            Err(e) => {
                Stats::bump(&stats.malformed);
                tracing::warn!(error = %e, lsn = %pgwire_replication::Lsn(txn.lsn), "skipping a WAL message");
                return Ok(0);
            }
        };
        let (rel, op, new, old, old_full) = match msg {
            Msg::Relation(r) => {
                self.allowed.remove(&r.id);
                self.relations.insert(r.id, r);
                return Ok(0);
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
                    let index = txn.next_index + i as u32;
                    self.change(side, txn, index, rel, Op::Truncate, None, None, false, out).await?;
                }
                return Ok(n);
            }
            Msg::Other => return Ok(0),
        };
        let Some(relation) = self.relations.get(&rel) else {
            Stats::bump(&stats.malformed);
            tracing::warn!(rel, "a WAL change of a table the stream did not describe: skipped");
            return Ok(1);
        };
        if ours(relation, "wal_watches") {
            self.watch_changed(relation.clone(), new.as_deref(), old.as_deref());
            return Ok(1);
        }
        if ours(relation, "wal_messages") {
            let Some(new) = new else { return Ok(1) };
            let (Some(channel), Some(payload)) =
                (pgoutput::text(relation, &new, "channel"), pgoutput::text(relation, &new, "payload"))
            else {
                Stats::bump(&stats.malformed);
                return Ok(1);
            };
            if self.wants(channel) && self.may_read(side, rel).await? {
                let (channel, payload) = (channel.to_string(), payload.to_string());
                out.push(self.event(txn, txn.next_index, &channel, Body::Message(Message { payload })));
            }
            return Ok(1);
        }
        self.change(side, txn, txn.next_index, rel, op, new.as_deref(), old.as_deref(), old_full, out).await?;
        Ok(1)
    }

    /// A row of pubsub.wal_watches changed: a table was watched, its
    /// channel changed, or it was unwatched.
    fn watch_changed(&mut self, rel: Relation, new: Option<&[Value<'_>]>, old: Option<&[Value<'_>]>) {
        let source =
            |row: Option<&[Value<'_>]>| row.and_then(|r| pgoutput::text(&rel, r, "source")?.parse::<u32>().ok());
        if let Some(before) = source(old) {
            self.channels.remove(&before);
        }
        if let (Some(oid), Some(channel)) = (source(new), new.and_then(|r| pgoutput::text(&rel, r, "channel"))) {
            self.channels.insert(oid, channel.to_string());
        } else if new.is_none() {
            // A delete carries the key only: source.
            if let Some(oid) = source(old) {
                self.channels.remove(&oid);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn change(
        &mut self,
        side: &Client,
        txn: &Txn,
        index: u32,
        rel: u32,
        op: Op,
        new: Option<&[Value<'_>]>,
        old: Option<&[Value<'_>]>,
        old_full: bool,
        out: &mut Vec<Event>,
    ) -> crate::Result<()> {
        let Some(channel) = self.channels.get(&rel).cloned() else { return Ok(()) };
        if !self.wants(&channel) || !self.may_read(side, rel).await? {
            return Ok(());
        }
        let Some(relation) = self.relations.get(&rel) else { return Ok(()) };
        let render = |row: Option<&[Value<'_>]>, fallback, keys| {
            row.and_then(|r| pgoutput::row_json(relation, r, fallback, keys))
        };
        // Unchanged TOASTed values come from a whole old row only; a
        // key-only old row is rendered as just its key columns.
        let new_json = render(new, old.filter(|_| old_full), false);
        let old_json = render(old, None, !old_full);
        let has_key = relation.columns.iter().any(|c| c.key);
        let key = if has_key && op != Op::Truncate { render(new.or(old), None, true) } else { None };
        let raw = |s: Option<String>| s.and_then(|s| serde_json::value::RawValue::from_string(s).ok());
        let change = Change {
            op,
            schema: relation.schema.clone(),
            table: relation.name.clone(),
            key: raw(key),
            new: raw(new_json),
            old: raw(old_json),
        };
        out.push(self.event(txn, index, &channel, Body::Change(change)));
        Ok(())
    }

    /// The event, its JSON in the envelope's key order: `lsn`, `index`,
    /// `txid`, `kind`, `channel`, `time`, then the body.
    fn event(&self, txn: &Txn, index: u32, channel: &str, body: Body) -> Event {
        let time = commit_time(txn.time_us);
        let mut json = format!(
            "{{\"lsn\":\"{}\",\"index\":{},\"txid\":{},\"kind\":\"{}\",\"channel\":",
            pgwire_replication::Lsn(txn.lsn),
            index,
            txn.xid,
            match body {
                Body::Message(_) => "message",
                _ => "change",
            }
        );
        crate::event_log::json_string::write(&mut json, channel);
        json.push_str(",\"time\":\"");
        json.push_str(&time);
        json.push('"');
        let raw = |r: &Option<Box<serde_json::value::RawValue>>| r.as_ref().map_or("null", |r| r.get()).to_string();
        match &body {
            Body::Change(c) => {
                json.push_str(&format!(",\"op\":\"{}\",\"schema\":", c.op.as_str()));
                crate::event_log::json_string::write(&mut json, &c.schema);
                json.push_str(",\"table\":");
                crate::event_log::json_string::write(&mut json, &c.table);
                json.push_str(&format!(",\"key\":{},\"new\":{},\"old\":{}", raw(&c.key), raw(&c.new), raw(&c.old)));
            }
            Body::Message(m) => {
                json.push_str(",\"payload\":");
                crate::event_log::json_string::write(&mut json, &m.payload);
            }
            Body::Notify(_) => {}
        }
        json.push('}');
        let at = crate::event::WalPosition { lsn: txn.lsn, index };
        Event::from_wal(channel, at, txn.xid, time, body, json)
    }
}

/// PostgreSQL's epoch (2000-01-01) in Unix seconds.
const PG_EPOCH: u64 = 946_684_800;

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
    #[test]
    fn commit_times_are_rfc3339() {
        assert_eq!(super::commit_time(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(super::commit_time(1_500_000), "2000-01-01T00:00:01.500000Z");
        assert_eq!(super::commit_time(i64::MIN), "1970-01-01T00:00:00.000000Z");
        assert_eq!(super::commit_time(i64::MAX), "9999-12-31T23:59:59.000000Z");
    }
}
