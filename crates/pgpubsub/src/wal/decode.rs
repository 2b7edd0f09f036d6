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
    /// Events of it so far.
    pub(super) index: u32,
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
        let ok: bool = side
            .query_one("SELECT has_table_privilege($1::oid, 'SELECT')", &[&rel])
            .await
            .map_err(|e| crate::Error::db("checking the reader's privileges", e))?
            .get(0);
        self.allowed.insert(rel, (ok, Instant::now()));
        Ok(ok)
    }

    /// Reads one pgoutput message of `txn`; the events it makes, if any,
    /// go to `out`. `skip`: a transaction already delivered (after a
    /// reconnect): only relations are learnt.
    pub(super) async fn message(
        &mut self,
        side: &Client,
        stats: &Stats,
        txn: &mut Txn,
        data: &[u8],
        skip: bool,
        out: &mut Vec<Event>,
    ) -> crate::Result<()> {
        let msg = match pgoutput::parse(data) {
            Ok(m) => m,
            Err(e) => {
                Stats::bump(&stats.malformed);
                tracing::warn!(error = %e, lsn = %pgoutput::lsn_text(txn.lsn), "skipping a WAL message");
                return Ok(());
            }
        };
        let (rel, op, new, old, old_full) = match msg {
            Msg::Relation(r) => {
                self.allowed.remove(&r.id);
                self.relations.insert(r.id, r);
                return Ok(());
            }
            _ if skip => return Ok(()),
            Msg::Insert { rel, new } => (rel, Op::Insert, Some(new), None, false),
            Msg::Update { rel, old, new } => {
                let full = old.as_ref().is_some_and(|o| o.full);
                (rel, Op::Update, Some(new), old.map(|o| o.values), full)
            }
            Msg::Delete { rel, old } => (rel, Op::Delete, None, Some(old.values), old.full),
            Msg::Truncate { rels } => {
                for rel in rels {
                    self.change(side, txn, rel, Op::Truncate, None, None, false, out).await?;
                }
                return Ok(());
            }
            Msg::Other => return Ok(()),
        };
        let Some(relation) = self.relations.get(&rel) else {
            Stats::bump(&stats.malformed);
            tracing::warn!(rel, "a WAL change of a table the stream did not describe: skipped");
            return Ok(());
        };
        if ours(relation, "wal_watches") {
            self.watch_changed(relation.clone(), new.as_deref(), old.as_deref());
            return Ok(());
        }
        if ours(relation, "wal_messages") {
            let Some(new) = new else { return Ok(()) };
            let (Some(channel), Some(payload)) =
                (pgoutput::text(relation, &new, "channel"), pgoutput::text(relation, &new, "payload"))
            else {
                Stats::bump(&stats.malformed);
                return Ok(());
            };
            if self.wants(channel) && self.may_read(side, rel).await? {
                let (channel, payload) = (channel.to_string(), payload.to_string());
                out.push(self.event(txn, &channel, Body::Message(Message { payload })));
            }
            return Ok(());
        }
        self.change(side, txn, rel, op, new.as_deref(), old.as_deref(), old_full, out).await
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
        txn: &mut Txn,
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
        out.push(self.event(txn, &channel, Body::Change(change)));
        Ok(())
    }

    /// The event, its JSON in the envelope's key order: `lsn`, `index`,
    /// `txid`, `kind`, `channel`, `time`, then the body.
    fn event(&self, txn: &mut Txn, channel: &str, body: Body) -> Event {
        let time = commit_time(txn.time_us);
        let mut json = format!(
            "{{\"lsn\":\"{}\",\"index\":{},\"txid\":{},\"kind\":\"{}\",\"channel\":",
            pgoutput::lsn_text(txn.lsn),
            txn.index,
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
        let at = crate::event::WalPosition { lsn: txn.lsn, index: txn.index };
        txn.index += 1;
        Event::from_wal(channel, at, txn.xid, time, body, json)
    }
}

/// PostgreSQL's epoch (2000-01-01) in Unix seconds.
const PG_EPOCH: u64 = 946_684_800;

/// A commit time (µs since 2000-01-01) in RFC 3339, UTC.
fn commit_time(us: i64) -> String {
    let unix = std::time::UNIX_EPOCH + Duration::from_secs(PG_EPOCH);
    let t =
        if us >= 0 { unix + Duration::from_micros(us as u64) } else { unix - Duration::from_micros(us.unsigned_abs()) };
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn commit_times_are_rfc3339() {
        assert_eq!(super::commit_time(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(super::commit_time(1_500_000), "2000-01-01T00:00:01.500000Z");
    }
}
