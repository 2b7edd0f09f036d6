//! A live shape: a table's rows that match a filter, with some of their
//! columns, read in one snapshot ([`Shape::snapshot`]), then kept in step
//! by the table's changes from the log ([`Shape::see`]), handed over
//! exactly ([`super::handover`]).
//!
//! What a change does to a shape, for a subscriber holding it as a map of
//! key → row (the same words as row-level authorization, `crate::views`,
//! and applied after it):
//!
//! | change | old row in the shape | new row in the shape | sent as |
//! |---|---|---|---|
//! | INSERT | – | yes | the INSERT |
//! | UPDATE | yes | yes | the UPDATE |
//! | UPDATE | no | yes | the UPDATE, `view: "enter"`, `new` only |
//! | UPDATE | yes | no | the UPDATE, `view: "leave"`, `key` only |
//! | DELETE | yes | – | the DELETE, with the old row |
//! | TRUNCATE | – | – | the TRUNCATE (the shape is empty) |
//!
//! Anything else is not sent. Where a change does not carry the row to
//! decide on (an UPDATE or DELETE captured from the WAL without `REPLICA
//! IDENTITY FULL` has only the key of its old row), it is sent as what a
//! map can apply either way: an UPDATE whose new row is in the shape as
//! the UPDATE, one whose new row is not as leaving, a DELETE as the DELETE.
//! Only the columns asked for are sent, and always the key's.

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::handover::{Handover, Snapshot};
use super::{quote_ident, BoundFilter, Filter, FilterError};
use crate::error::Error;
use crate::event::{Change, Event, Op, View};
use crate::views::Viewer;

/// Why a shape cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// No such table (or the reader may not see it).
    #[error("no table {0:?}")]
    NoTable(String),
    /// The table's changes do not reach the log.
    #[error("table {0} is not watched into the log (pgpubsub watch {0}, or watch --wal with a capturer)")]
    NotWatched(String),
    /// A shape is kept by key.
    #[error("table {0} has no primary key: a shape keeps its rows by key")]
    NoKey(String),
    /// A column asked for is not one of the table's.
    #[error("unknown column {0:?}")]
    UnknownColumn(String),
    /// The filter does not fit the table.
    #[error("filter: {0}")]
    Filter(#[from] FilterError),
    /// The subscriber may not read a column its filter uses.
    #[error("the filter reads column {0:?}, which this role may not read")]
    Unreadable(String),
    /// The database said no, or is not there.
    #[error(transparent)]
    Db(#[from] Error),
}

impl From<ShapeError> for Error {
    /// As the library's error: the database's own, or what was wrong.
    fn from(e: ShapeError) -> Error {
        match e {
            ShapeError::Db(e) => e,
            other => Error::Config(other.to_string()),
        }
    }
}

/// A table, a filter, and the columns to send; see the module docs.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The table's schema.
    pub schema: String,
    /// The table.
    pub table: String,
    oid: u32,
    /// The channel its changes are logged on.
    pub channel: String,
    /// Captured from the WAL (the log may lag the table).
    pub wal: bool,
    filter: Option<BoundFilter>,
    /// Columns sent (the key's included), in the table's order; `None`: all.
    columns: Option<Vec<String>>,
    /// The primary key's columns.
    key: Vec<String>,
    /// Every column, in order.
    all: Vec<String>,
}

/// What a shape makes of an event.
#[derive(Debug)]
pub enum Seen {
    /// Not for this shape.
    Hidden,
    /// The event as it is.
    Same,
    /// The event rewritten for the shape (entering, leaving, fewer columns).
    As(Box<Event>),
}

/// A part of a snapshot being read ([`Snapshotting::next`]).
#[derive(Debug)]
pub enum SnapshotPart {
    /// Rows, each a JSON object (as the shape sends rows).
    Rows(Vec<String>),
    /// Every row was sent: how many, and where the changes begin.
    Done {
        /// Rows sent.
        rows: u64,
        /// The hand-over to the log.
        handover: Handover,
    },
}

/// Rows fetched per round trip while reading a snapshot.
pub const SNAPSHOT_BATCH: i32 = 1000;

/// The longest a snapshot of a table captured from the WAL waits for the
/// capturer to append what the snapshot saw.
pub const CAPTURE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Shape {
    /// Reads `table` (`name` or `schema.name`) from the catalog and checks
    /// `filter` and `columns` against it.
    ///
    /// # Errors
    /// [`ShapeError`]: the table is not there, not watched into the log,
    /// has no primary key; a column is unknown; the filter does not fit.
    pub async fn resolve(
        client: &Client,
        table: &str,
        filter: Option<&Filter>,
        columns: Option<&[String]>,
    ) -> std::result::Result<Shape, ShapeError> {
        let db = |e| Error::db("reading a shape's table", e);
        let row = client
            .query_opt(
                "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
                &[&table],
            )
            .await
            .map_err(db)?
            .ok_or_else(|| ShapeError::NoTable(table.chars().take(200).collect()))?;
        let (oid, schema, name): (u32, String, String) = (row.get(0), row.get(1), row.get(2));
        let shown = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        let cols = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(db)?;
        let typed: Vec<(String, String)> = cols.iter().map(|r| (r.get(0), r.get(1))).collect();
        let key: Vec<String> = client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&oid],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if key.is_empty() {
            return Err(ShapeError::NoKey(shown));
        }
        let watch = client
            .query_opt(
                "SELECT split_part(encode(t.tgargs, 'escape'), '\\000', 1), false FROM pg_trigger t \
                 WHERE t.tgrelid = $1 AND t.tgname = 'pubsub_watch' \
                 UNION ALL SELECT w.channel, true FROM pubsub.wal_watches w WHERE w.source::oid = $1 LIMIT 1",
                &[&oid],
            )
            .await
            .map_err(db)?
            .ok_or_else(|| ShapeError::NotWatched(shown.clone()))?;
        let filter = filter.map(|f| f.bind(&typed)).transpose()?;
        let all: Vec<String> = typed.into_iter().map(|(n, _)| n).collect();
        let columns = match columns {
            None => None,
            Some(asked) => {
                if let Some(unknown) = asked.iter().find(|c| !all.contains(c)) {
                    return Err(ShapeError::UnknownColumn(unknown.clone()));
                }
                Some(all.iter().filter(|c| asked.contains(c) || key.contains(c)).cloned().collect())
            }
        };
        Ok(Shape { schema, table: name, oid, channel: watch.get(0), wal: watch.get(1), filter, columns, key, all })
    }

    /// The primary key's columns.
    pub fn key(&self) -> &[String] {
        &self.key
    }

    /// What this shape makes of `event`; see the module docs.
    pub fn see(&self, event: &Event) -> Seen {
        self.judge(event, None)
    }

    /// What this shape makes of `seen`, which is how row-level
    /// authorization ([`crate::views`]) shows `original` to the subscriber:
    /// a row is in the subscriber's shape when it matches the filter *and*
    /// the subscriber may see it, so a row leaving either leaves the shape
    /// (and only a row that was in it leaves it).
    pub fn see_under(&self, original: &Event, seen: &Event) -> Seen {
        self.judge(seen, Some(original))
    }

    fn judge(&self, event: &Event, original: Option<&Event>) -> Seen {
        let Some(c) = event.change() else { return Seen::Hidden };
        if c.table != self.table || c.schema != self.schema {
            return Seen::Hidden;
        }
        let decides = |row: Option<&RawValue>| match (&self.filter, row) {
            (_, None) => None,
            (None, Some(_)) => Some(true),
            (Some(f), Some(r)) => self.whole(r).then(|| f.matches_json(r.get()).unwrap_or(false)),
        };
        let o = original.and_then(Event::change);
        let (new_in, old_in, view_in) = match o {
            // The filter decides on the original rows (a row leaving the
            // subscriber's view keeps no old row); what the subscriber may
            // see narrows it.
            Some(o) => {
                let (may_new, may_old) = match c.view {
                    Some(View::Enter) => (true, false),
                    Some(View::Leave) => (false, true),
                    None => (c.new.is_some() || o.new.is_none(), c.old.is_some() || o.old.is_none()),
                };
                let and = |d: Option<bool>, may: bool| if may { d } else { Some(false) };
                (and(decides(o.new.as_deref()), may_new), and(decides(o.old.as_deref()), may_old), None)
            }
            None => (decides(c.new.as_deref()), decides(c.old.as_deref()), c.view),
        };
        let (new, old, view) = match (c.op, view_in, new_in, old_in) {
            (Op::Truncate, ..) => return Seen::Same,
            (Op::Insert, _, Some(true), _) => (c.new.as_deref(), None, None),
            (Op::Update, Some(View::Leave), ..) => (None, None, Some(View::Leave)),
            (Op::Update, Some(View::Enter), Some(true), _) => (c.new.as_deref(), None, Some(View::Enter)),
            (Op::Update, None, Some(true), Some(true) | None) => (c.new.as_deref(), c.old.as_deref(), None),
            (Op::Update, None, Some(true), Some(false)) => (c.new.as_deref(), None, Some(View::Enter)),
            (Op::Update, None, Some(false) | None, Some(true)) => (None, None, Some(View::Leave)),
            (Op::Update, None, Some(false), None) => (None, None, Some(View::Leave)),
            (Op::Delete, _, _, Some(true) | None) => (None, c.old.as_deref(), None),
            _ => return Seen::Hidden,
        };
        let same = view == c.view
            && self.columns.is_none()
            && new.is_some() == c.new.is_some()
            && old.is_some() == c.old.is_some();
        if same {
            return Seen::Same;
        }
        let keep = |raw: Option<&RawValue>| match (&self.columns, raw) {
            (_, None) => Ok(None),
            (None, Some(r)) => Ok(Some(r.to_owned())),
            (Some(cols), Some(r)) => crate::views::only(r, cols).map(Some),
        };
        let (Ok(new), Ok(old)) = (keep(new), keep(old)) else { return Seen::Hidden };
        // Leaving: the key the subscriber holds the row under, the old
        // row's (an UPDATE may change the key).
        let old_row = o.and_then(|o| o.old.as_deref()).or(c.old.as_deref());
        let key = match (view, old_row) {
            (Some(View::Leave), Some(row)) => crate::views::only(row, &self.key).ok().or_else(|| c.key.clone()),
            _ => c.key.clone(),
        };
        let change = Change { op: c.op, schema: c.schema.clone(), table: c.table.clone(), key, new, old, view };
        match event.seen_as(change) {
            Some(e) => Seen::As(Box::new(e)),
            None => Seen::Hidden,
        }
    }

    /// What this shape makes of `event` read from the log after the
    /// snapshot that `handover` came with: [`Seen::Hidden`] for a change
    /// the snapshot already holds, else as [`Shape::see`].
    pub fn after(&self, handover: Option<&Handover>, event: &Event) -> Seen {
        match handover {
            Some(h) if h.covers(event) => Seen::Hidden,
            _ => self.see(event),
        }
    }

    /// Whether `row` has every column the filter reads (a WAL-captured
    /// old row may hold only the key: then it cannot be decided on).
    fn whole(&self, row: &RawValue) -> bool {
        let Some(filter) = &self.filter else { return true };
        let Ok(map) = serde_json::from_str::<std::collections::HashMap<&str, &RawValue>>(row.get()) else {
            return false;
        };
        filter.columns().iter().all(|c| map.contains_key(c.as_str()))
    }

    /// Starts reading the snapshot on `client` (a connection of its own,
    /// which the read ends with), as `viewer` (its role and claims: the
    /// table's policies and column privileges decide, as for its live
    /// events). The rows come in parts, then [`SnapshotPart::Done`] with the
    /// hand-over to the log.
    ///
    /// # Errors
    /// Before any row: the viewer's role cannot be taken, the filter reads a
    /// column it may not read ([`ShapeError::Unreadable`]), the table cannot
    /// be read.
    pub async fn snapshot(
        self: &Arc<Self>,
        client: Client,
        viewer: Option<Viewer>,
    ) -> std::result::Result<Snapshotting, ShapeError> {
        let snapshot = match self.begin(&client, viewer.as_ref()).await {
            Ok(s) => s,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel(2);
        let shape = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = shape.fetch(&client, snapshot, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Snapshotting { rx, task })
    }

    /// Opens the snapshot's transaction as `viewer` and declares its cursor.
    async fn begin(&self, client: &Client, viewer: Option<&Viewer>) -> std::result::Result<Snapshot, ShapeError> {
        let db = |e| ShapeError::Db(Error::db("reading a shape's snapshot", e));
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.map_err(db)?;
        let role = viewer.and_then(|v| v.role.clone());
        let claims = viewer.and_then(|v| v.claims.clone()).unwrap_or_default();
        let row = client
            .query_one(
                "SELECT CASE WHEN $1::text IS NULL THEN '' ELSE set_config('role', $1, true) END, \
                        set_config('request.jwt.claims', $2, true), \
                        pg_current_snapshot()::text",
                &[&role, &claims],
            )
            .await
            .map_err(|e| ShapeError::Db(Error::db("taking the viewer's role for a shape's snapshot", e)))?;
        let snapshot: Snapshot =
            row.get::<_, String>(2).parse().map_err(|e| ShapeError::Db(Error::Config(format!("{e}"))))?;
        let readable: Vec<String> = client
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped \
                 AND has_column_privilege(attrelid, attnum, 'SELECT') ORDER BY attnum",
                &[&self.oid],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(f) = &self.filter {
            if let Some(c) = f.columns().into_iter().find(|c| !readable.contains(c)) {
                return Err(ShapeError::Unreadable(c));
            }
        }
        let wanted = self.columns.as_ref().unwrap_or(&self.all);
        let list: Vec<String> = wanted.iter().filter(|c| readable.contains(c)).map(|c| quote_ident(c)).collect();
        let (predicate, params) = match &self.filter {
            Some(f) => f.to_sql(1),
            None => ("true".to_string(), Vec::new()),
        };
        let select = if list.is_empty() { "NULL::int AS none".to_string() } else { list.join(", ") };
        let sql = format!(
            "DECLARE pgpubsub_shape NO SCROLL CURSOR FOR SELECT row_to_json(t)::text FROM \
             (SELECT {select} FROM {}.{} WHERE {predicate}) t",
            quote_ident(&self.schema),
            quote_ident(&self.table)
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        client.execute(sql.as_str(), &refs).await.map_err(db)?;
        Ok(snapshot)
    }

    /// Fetches the declared cursor's rows to `tx`, then the hand-over.
    async fn fetch(
        &self,
        client: &Client,
        snapshot: Snapshot,
        tx: &mpsc::Sender<std::result::Result<SnapshotPart, ShapeError>>,
    ) -> std::result::Result<(), ShapeError> {
        let db = |e| ShapeError::Db(Error::db("reading a shape's snapshot", e));
        let fetch = format!("FETCH {SNAPSHOT_BATCH} FROM pgpubsub_shape");
        let mut rows = 0u64;
        loop {
            let batch: Vec<String> =
                client.query(fetch.as_str(), &[]).await.map_err(db)?.iter().map(|r| r.get(0)).collect();
            if batch.is_empty() {
                break;
            }
            rows += batch.len() as u64;
            if tx.send(Ok(SnapshotPart::Rows(batch))).await.is_err() {
                return Ok(());
            }
        }
        let lsn: Option<String> = if self.wal {
            let row = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.map_err(db)?;
            Some(row.get(0))
        } else {
            None
        };
        client.batch_execute("COMMIT").await.map_err(db)?;
        let mut handover = Handover::new(snapshot);
        if let Some(lsn) = lsn {
            handover.until = handover.until.max(captured_past(client, &lsn).await?);
        }
        let _ = tx.send(Ok(SnapshotPart::Done { rows, handover })).await;
        Ok(())
    }
}

/// Waits until the capturer has appended every change committed before
/// `lsn` (its slot confirmed past it, which it does only after the append
/// committed), then the position past which no event of those can be.
async fn captured_past(client: &Client, lsn: &str) -> std::result::Result<crate::cursor::Cursor, ShapeError> {
    let db = |e| ShapeError::Db(Error::db("waiting for the capturer", e));
    let began = std::time::Instant::now();
    loop {
        let row = client
            .query_one(
                "SELECT coalesce(bool_or(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots \
                 WHERE database = current_database() AND slot_name LIKE 'pgpubsub\\_capture%'",
                &[&lsn],
            )
            .await
            .map_err(db)?;
        if row.get::<_, bool>(0) {
            break;
        }
        if began.elapsed() > CAPTURE_WAIT {
            return Err(ShapeError::Db(Error::ConnectionLost(format!(
                "the capturer has not appended up to {lsn} within {CAPTURE_WAIT:?}: is `pgpubsub capture` running?"
            ))));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Taken after the confirmation was seen: the appends are visible in it.
    let row = client.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[]).await.map_err(db)?;
    let xmax: u64 = row.get::<_, String>(0).parse().unwrap_or(u64::MAX);
    Ok(crate::cursor::Cursor::before_txid(xmax))
}

/// A snapshot being read ([`Shape::snapshot`]); dropping it ends the read.
#[derive(Debug)]
pub struct Snapshotting {
    rx: mpsc::Receiver<std::result::Result<SnapshotPart, ShapeError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Snapshotting {
    /// The next part; `None` after [`SnapshotPart::Done`] or an error.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Option<std::result::Result<SnapshotPart, ShapeError>> {
        self.rx.recv().await
    }
}

impl Drop for Snapshotting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(filter: &str, columns: Option<&[&str]>) -> Shape {
        let typed = [("id", "integer"), ("status", "text"), ("qty", "integer")];
        let all: Vec<String> = typed.iter().map(|(n, _)| n.to_string()).collect();
        Shape {
            schema: "public".into(),
            table: "t".into(),
            oid: 1,
            channel: "t".into(),
            wal: false,
            filter: Some(Filter::parse(filter).unwrap().bind(&typed).unwrap()),
            columns: columns.map(|c| all.iter().filter(|a| c.contains(&a.as_str()) || *a == "id").cloned().collect()),
            key: vec!["id".into()],
            all,
        }
    }

    fn event(op: &str, view: Option<&str>, new: &str, old: &str) -> Event {
        let view = view.map(|v| format!(r#","view":"{v}""#)).unwrap_or_default();
        let text = format!(
            r#"{{"seq":5,"txid":9,"kind":"change","channel":"t","time":"2026-01-01T00:00:00Z","op":"{op}"{view},"schema":"public","table":"t","key":{{"id":1}},"new":{new},"old":{old}}}"#
        );
        Event::decode("t", text).unwrap()
    }

    /// (view, new, old) of what the shape sends; `None` for nothing.
    fn sent(seen: Seen, event: &Event) -> Option<(Option<View>, Option<String>, Option<String>)> {
        let e = match seen {
            Seen::Hidden => return None,
            Seen::Same => event.clone(),
            Seen::As(e) => *e,
        };
        let c = e.change().unwrap();
        Some((c.view, c.new.as_ref().map(|r| r.get().to_string()), c.old.as_ref().map(|r| r.get().to_string())))
    }

    const PAID: &str = r#"{"id":1,"status":"paid","qty":2}"#;
    const NEW: &str = r#"{"id":1,"status":"new","qty":3}"#;

    #[test]
    fn changes_enter_leave_stay_or_are_not_sent() {
        let s = shape("status = 'paid'", None);
        let cases = [
            (event("INSERT", None, PAID, "null"), Some((None, Some(PAID), None))),
            (event("INSERT", None, NEW, "null"), None),
            (event("UPDATE", None, PAID, PAID), Some((None, Some(PAID), Some(PAID)))),
            (event("UPDATE", None, PAID, NEW), Some((Some(View::Enter), Some(PAID), None))),
            (event("UPDATE", None, NEW, PAID), Some((Some(View::Leave), None, None))),
            (event("UPDATE", None, NEW, NEW), None),
            (event("DELETE", None, "null", PAID), Some((None, None, Some(PAID)))),
            (event("DELETE", None, "null", NEW), None),
            // An old row that is a key only (WAL without REPLICA IDENTITY FULL): sent as a map applies it.
            (event("DELETE", None, "null", r#"{"id":1}"#), Some((None, None, Some(r#"{"id":1}"#)))),
            (event("UPDATE", None, NEW, r#"{"id":1}"#), Some((Some(View::Leave), None, None))),
        ];
        for (e, want) in cases {
            let want = want.map(|(v, n, o): (Option<View>, Option<&str>, Option<&str>)| {
                (v, n.map(str::to_string), o.map(str::to_string))
            });
            assert_eq!(sent(s.see(&e), &e), want, "{}", e.json());
        }
    }

    #[test]
    fn only_the_columns_asked_for_and_the_key() {
        let s = shape("qty >= 2", Some(&["qty"]));
        let e = event("UPDATE", None, NEW, PAID);
        assert_eq!(
            sent(s.see(&e), &e),
            Some((None, Some(r#"{"id":1,"qty":3}"#.to_string()), Some(r#"{"id":1,"qty":2}"#.to_string())))
        );
    }

    #[test]
    fn under_row_level_authorization_a_row_leaves_only_a_shape_it_was_in() {
        let s = shape("status = 'paid'", None);
        // The role stops seeing a row that did not match: nothing to leave.
        let original = event("UPDATE", None, NEW, NEW);
        let seen = event("UPDATE", Some("leave"), "null", "null");
        assert!(sent(s.see_under(&original, &seen), &seen).is_none());
        // ... one that matched: it leaves.
        let original = event("UPDATE", None, PAID, PAID);
        assert_eq!(sent(s.see_under(&original, &seen), &seen), Some((Some(View::Leave), None, None)));
        // The role starts seeing a row that matches: it enters.
        let seen = event("UPDATE", Some("enter"), PAID, "null");
        assert_eq!(sent(s.see_under(&original, &seen), &seen), Some((Some(View::Enter), Some(PAID.into()), None)));
        // Seen whole, matching before only: it leaves the shape.
        let original = event("UPDATE", None, NEW, PAID);
        assert_eq!(sent(s.see_under(&original, &original), &original), Some((Some(View::Leave), None, None)));
    }
}
