//! Row-level authorization: each subscriber sees exactly the row changes
//! its PostgreSQL role (with its claims) could `SELECT`.
//!
//! A subscriber is a [`Viewer`]: a role, and the claims its policies read
//! (PostgREST's convention: the JSON object of a token's claims, in the
//! setting `request.jwt.claims`). Viewers with the same role and claims
//! form one class and share every decision: [`Views`] keeps one [`Class`]
//! per viewer in use. A class decides a batch of events with one statement
//! (`pubsub.row_views`, run as the role with its claims): the table's
//! policies on the old and the new row, and the columns the role may read.
//! So the database work per event grows with the classes subscribed, not
//! with the subscribers.
//!
//! What a subscriber receives of a row change (the same rules for live
//! events and for a replay from the log):
//!
//! | change | the role sees | it receives |
//! |---|---|---|
//! | INSERT | the new row | the change |
//! | UPDATE | the old and the new row | the change |
//! | UPDATE | only the new row | the change, `view: "enter"`, no `old` |
//! | UPDATE | only the old row | the change, `view: "leave"`, only `key` |
//! | DELETE | the old row | the change, with the old row |
//! | TRUNCATE | the table | the change |
//! | anything else | | nothing |
//!
//! Columns the role may not read are removed from `new`, `old` and `key`
//! (a leave whose key would be empty is withheld: it could not name the
//! row). A decision is reused for at most [`FRESH`]: a changed policy or
//! a revoked grant takes effect for every event handed out after that.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::de::{MapAccess, Visitor};
use serde::Deserializer;
use serde_json::value::RawValue;

use crate::channel::quote_ident;
use crate::error::{Error, Result};
use crate::event::{Change, Op, View};
use crate::event_log::LogConn;
use crate::hub::Shared;

/// How long a decision is reused: the bound on a policy change or a
/// revoked grant taking effect.
pub const FRESH: Duration = Duration::from_secs(1);

/// Decisions kept per class (the newest, by seq).
const KEPT: usize = 50_000;

/// The most events one statement decides.
const BATCH_MAX: usize = 4_000;

/// Who a subscriber is to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Viewer {
    /// The role its events are decided as; `None`: the reading
    /// connection's own role.
    pub role: Option<String>,
    /// The claims its policies read (`request.jwt.claims`), a JSON object;
    /// `None`: unset.
    pub claims: Option<String>,
}

impl Viewer {
    /// A role with the claims of a token (a JSON object).
    pub fn role(role: impl Into<String>, claims: Option<String>) -> Viewer {
        Viewer { role: Some(role.into()), claims }
    }

    /// The reading connection's own role, without claims (`listen`, the
    /// library's readers).
    pub fn itself() -> Viewer {
        Viewer { role: None, claims: None }
    }
}

/// The classes of subscribers in use, one per [`Viewer`]; one per server.
#[derive(Debug, Default)]
pub struct Views {
    classes: Mutex<HashMap<Viewer, Weak<Class>>>,
    counts: Arc<Counts>,
}

/// What the classes have done.
#[derive(Debug, Default)]
struct Counts {
    /// Statements run to decide batches.
    statements: AtomicU64,
    /// Events decided by those statements.
    decided: AtomicU64,
    /// Events withheld from a class.
    withheld: AtomicU64,
}

impl Views {
    /// No classes yet.
    pub fn new() -> Views {
        Views::default()
    }

    /// The class of `viewer`, shared with every subscriber of the same
    /// viewer while one holds it.
    pub fn class(&self, viewer: Viewer) -> Arc<Class> {
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = classes.get(&viewer).and_then(Weak::upgrade) {
            return c;
        }
        classes.retain(|_, c| c.strong_count() > 0);
        let class = Arc::new(Class::new(viewer.clone(), self.counts.clone()));
        classes.insert(viewer, Arc::downgrade(&class));
        class
    }

    /// Classes in use now.
    pub fn classes(&self) -> usize {
        let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        classes.values().filter(|c| c.strong_count() > 0).count()
    }

    /// Statements run so far to decide events (one per class per batch).
    pub fn statements(&self) -> u64 {
        self.counts.statements.load(Ordering::Relaxed)
    }

    /// Events decided so far, over all classes.
    pub fn decided(&self) -> u64 {
        self.counts.decided.load(Ordering::Relaxed)
    }

    /// Events withheld so far from some class.
    pub fn withheld(&self) -> u64 {
        self.counts.withheld.load(Ordering::Relaxed)
    }
}

/// What one class of subscribers sees; see the module docs.
#[derive(Debug)]
pub struct Class {
    viewer: Viewer,
    counts: Arc<Counts>,
    /// seq → (when decided, what the class sees).
    decided: Mutex<BTreeMap<i64, (Instant, Seen)>>,
    /// Tables the class may read whole (schema → table → when that was
    /// last said): their events pass without asking.
    open: Mutex<HashMap<String, HashMap<String, Instant>>>,
    /// When a statement as the viewer last succeeded: the role may be
    /// taken (what [`Class::check`] asks).
    answered: Mutex<Option<Instant>>,
    /// Events some subscriber of the class asked about, by seq, not yet
    /// decided: the next statement decides them all (while one statement
    /// runs, the events that come meanwhile gather into the next one).
    pending: Mutex<BTreeMap<i64, Arc<Shared>>>,
    /// One statement at a time per class: the others wait for its answer.
    gate: tokio::sync::Mutex<()>,
}

/// What a class sees of one event.
#[derive(Debug, Clone)]
enum Seen {
    /// The event as it is.
    Same,
    /// Nothing.
    Hidden,
    /// The event rewritten for the class (shared by its subscribers).
    As(Arc<Shared>),
}

impl Seen {
    fn of(self, s: &Arc<Shared>) -> Option<Arc<Shared>> {
        match self {
            Seen::Same => Some(s.clone()),
            Seen::Hidden => None,
            Seen::As(r) => Some(r),
        }
    }
}

/// One event's answer from `pubsub.row_views`.
struct Answer {
    readable: bool,
    new_seen: bool,
    old_seen: bool,
    columns: Option<Vec<String>>,
    open: bool,
}

/// The decisions a class holds, under their locks.
struct Known<'a> {
    decided: &'a BTreeMap<i64, (Instant, Seen)>,
    open: &'a HashMap<String, HashMap<String, Instant>>,
    now: Instant,
}

impl Known<'_> {
    /// What the class sees of `s` if that is known within [`FRESH`]: every
    /// event but a row change passes; a row change of a table open to the
    /// class passes; else its decision.
    fn of(&self, s: &Shared) -> Option<Seen> {
        let Some((seq, c)) = needs(s) else { return Some(Seen::Same) };
        let fresh = |at: &Instant| self.now - *at < FRESH;
        if self.open.get(&c.schema).and_then(|t| t.get(&c.table)).is_some_and(fresh) {
            return Some(Seen::Same);
        }
        self.decided.get(&seq).filter(|(at, _)| fresh(at)).map(|(_, seen)| seen.clone())
    }
}

impl Class {
    /// A class of its own, counting into `counts`.
    fn new(viewer: Viewer, counts: Arc<Counts>) -> Class {
        Class {
            viewer,
            counts,
            decided: Mutex::default(),
            open: Mutex::default(),
            answered: Mutex::default(),
            pending: Mutex::default(),
            gate: tokio::sync::Mutex::new(()),
        }
    }

    /// A class of the reading connection's own role (a listener's), apart
    /// from any [`Views`].
    pub(crate) fn itself() -> Class {
        Class::new(Viewer::itself(), Arc::default())
    }

    /// Runs `f` over what the class knows now.
    fn with_known<T>(&self, f: impl FnOnce(&Known<'_>) -> T) -> T {
        let decided = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        f(&Known { decided: &decided, open: &open, now: Instant::now() })
    }

    /// The viewer this class decides for.
    pub fn viewer(&self) -> &Viewer {
        &self.viewer
    }

    /// Checks, through `log`, that the class can be decided at all: the
    /// reading role may become the viewer's role.
    ///
    /// # Errors
    /// [`Error::Db`] with SQLSTATE 42501 when it may not (the subscriber
    /// must be refused); another error when the database cannot answer.
    pub async fn check(&self, log: &LogConn) -> Result<()> {
        let answered = *self.answered.lock().unwrap_or_else(|e| e.into_inner());
        if answered.is_some_and(|at| at.elapsed() < FRESH) {
            // A crowd of one class resuming at once asks once.
            return Ok(());
        }
        self.ask(log, Vec::new(), Vec::new(), Vec::new()).await.map(drop)
    }

    /// What the class sees of `events`, in order: each as it is, rewritten
    /// (an enter, a leave, columns removed), or left out. Events other than
    /// row changes pass as they are (channel authorization covers them).
    /// One statement decides every row change not decided in the last
    /// [`FRESH`]; concurrent calls for the same events wait for it.
    ///
    /// Cancel-safe: a dropped call only leaves decisions made for later.
    ///
    /// # Errors
    /// When the database cannot answer (the events are not handed out).
    pub async fn see(&self, log: &LogConn, events: &[Arc<Shared>]) -> Result<Vec<Arc<Shared>>> {
        if let Some(seen) = self.known(events) {
            return Ok(seen);
        }
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for s in events {
                if let Some((seq, _)) = needs(s) {
                    pending.entry(seq).or_insert_with(|| s.clone());
                }
            }
        }
        let _one = self.gate.lock().await;
        if let Some(seen) = self.known(events) {
            return Ok(seen);
        }
        // This caller's events and what others asked meanwhile, in one
        // statement (at most BATCH_MAX of the others').
        let mut batch: BTreeMap<i64, Arc<Shared>> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match pending.keys().nth(BATCH_MAX).copied() {
                None => std::mem::take(&mut *pending),
                Some(first_left) => {
                    let rest = pending.split_off(&first_left);
                    std::mem::replace(&mut *pending, rest)
                }
            }
        };
        // Ours again: a holder whose statement failed took them out.
        batch.extend(events.iter().filter_map(|s| Some((needs(s)?.0, s.clone()))));
        let todo: Vec<Arc<Shared>> = self.with_known(|k| batch.into_values().filter(|s| k.of(s).is_none()).collect());
        let (mut tables, mut news, mut olds) = (Vec::new(), Vec::new(), Vec::new());
        for s in &todo {
            let c = s.event.change().expect("only row changes are pending");
            tables.push(format!("{}.{}", quote_ident(&c.schema), quote_ident(&c.table)));
            news.push(c.new.as_ref().map(|r| r.get().to_string()));
            olds.push(c.old.as_ref().map(|r| r.get().to_string()));
        }
        let answers = self.ask(log, tables, news, olds).await?;
        self.counts.statements.fetch_add(1, Ordering::Relaxed);
        self.counts.decided.fetch_add(todo.len() as u64, Ordering::Relaxed);
        let now = Instant::now();
        let mut decided = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            for (s, answer) in todo.iter().zip(answers) {
                let c = s.event.change().expect("only row changes are pending");
                let tables = open.entry(c.schema.clone()).or_default();
                if answer.open {
                    tables.insert(c.table.clone(), now);
                } else {
                    tables.remove(&c.table);
                }
                let seen = seen_as(s, &answer);
                if matches!(seen, Seen::Hidden) {
                    self.counts.withheld.fetch_add(1, Ordering::Relaxed);
                }
                decided.insert(s.event.seq.unwrap_or_default(), (now, seen));
            }
            // Every one of ours is known now; read before the oldest
            // decisions go (a lagging subscriber's may be among them).
            let known = Known { decided: &decided, open: &open, now };
            let out = events.iter().filter_map(|s| known.of(s).unwrap_or(Seen::Hidden).of(s)).collect();
            while decided.len() > KEPT {
                decided.pop_first();
            }
            Ok(out)
        }
    }

    /// What the class sees of `events`, if every row change among them was
    /// decided within [`FRESH`] or is of a table open to the class.
    fn known(&self, events: &[Arc<Shared>]) -> Option<Vec<Arc<Shared>>> {
        self.with_known(|k| {
            let mut out = Vec::with_capacity(events.len());
            for s in events {
                out.extend(k.of(s)?.of(s));
            }
            Some(out)
        })
    }

    /// One statement: `pubsub.row_views` as the viewer.
    async fn ask(
        &self,
        log: &LogConn,
        tables: Vec<String>,
        news: Vec<Option<String>>,
        olds: Vec<Option<String>>,
    ) -> Result<Vec<Answer>> {
        let n = tables.len();
        let (role, claims) = (self.viewer.role.clone(), self.viewer.claims.clone());
        let rows = log
            .run_pg("deciding what a role may see", |c| async move {
                c.query(
                    "SELECT n, readable, new_seen, old_seen, columns, open
                     FROM pubsub.row_views($1::text[], $2::text[]::jsonb[], $3::text[]::jsonb[], $4, $5) ORDER BY n",
                    &[&tables, &news, &olds, &role, &claims],
                )
                .await
            })
            .await?;
        *self.answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        if rows.len() != n {
            return Err(Error::ConnectionLost(format!(
                "pubsub.row_views answered {} rows for {n} events (is the schema migrated?)",
                rows.len()
            )));
        }
        Ok(rows
            .iter()
            .map(|r| Answer {
                readable: r.get(1),
                new_seen: r.get(2),
                old_seen: r.get(3),
                columns: r.get(4),
                open: r.get(5),
            })
            .collect())
    }
}

/// The seq and change of a row change from the log (what a class
/// decides); `None` for anything else.
fn needs(s: &Shared) -> Option<(i64, &Change)> {
    Some((s.event.seq?, s.event.change()?))
}

/// `s` as a role answered `a` sees it.
fn seen_as(s: &Arc<Shared>, a: &Answer) -> Seen {
    match rewrite(s, a) {
        None => Seen::Hidden,
        Some(r) if Arc::ptr_eq(&r, s) => Seen::Same,
        Some(r) => Seen::As(r),
    }
}

/// `s` as a role answered `a` sees it: itself, a rewritten copy, or
/// nothing.
fn rewrite(s: &Arc<Shared>, a: &Answer) -> Option<Arc<Shared>> {
    let c = s.event.change()?;
    if !a.readable {
        return None;
    }
    let (new, old, view) = match (c.op, a.new_seen, a.old_seen) {
        (Op::Truncate, _, _) => return Some(s.clone()),
        (Op::Insert, true, _) => (c.new.as_deref(), None, None),
        (Op::Update, true, true) => (c.new.as_deref(), c.old.as_deref(), None),
        (Op::Update, true, false) => (c.new.as_deref(), None, Some(View::Enter)),
        (Op::Update, false, true) => (None, None, Some(View::Leave)),
        (Op::Delete, _, true) => (None, c.old.as_deref(), None),
        _ => return None,
    };
    let keep = |raw: Option<&RawValue>| match (&a.columns, raw) {
        (_, None) => Ok(None),
        (None, Some(r)) => Ok(Some(r.to_owned())),
        (Some(cols), Some(r)) => only(r, cols).map(Some),
    };
    let key = keep(c.key.as_deref()).ok()?;
    if view == Some(View::Leave) && key.as_ref().is_none_or(|k| k.get() == "{}") {
        return None;
    }
    let change = Change {
        op: c.op,
        schema: c.schema.clone(),
        table: c.table.clone(),
        key,
        new: keep(new).ok()?,
        old: keep(old).ok()?,
        view,
    };
    // Unchanged: the event itself, rendered once for everyone.
    let same = change.view.is_none()
        && a.columns.is_none()
        && change.old.is_some() == c.old.is_some()
        && change.new.is_some() == c.new.is_some();
    if same {
        return Some(s.clone());
    }
    let event = s.event.seen_as(change)?;
    Some(Arc::new(Shared::new(event, s.position)))
}

/// The members of the JSON object `row` named in `columns`, in the row's
/// order.
pub(crate) fn only(row: &RawValue, columns: &[String]) -> serde_json::Result<Box<RawValue>> {
    struct Members<'a>(&'a [String]);
    impl<'de> Visitor<'de> for Members<'_> {
        type Value = Vec<(String, Box<RawValue>)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
            let mut kept = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                if self.0.contains(&k) {
                    kept.push((k, v));
                }
            }
            Ok(kept)
        }
    }
    let mut de = serde_json::Deserializer::from_str(row.get());
    let kept = (&mut de).deserialize_map(Members(columns))?;
    let mut out = String::from("{");
    for (i, (k, v)) in kept.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(k)?);
        out.push(':');
        out.push_str(v.get());
    }
    out.push('}');
    RawValue::from_string(out)
}

/// Whether `e` says the reading role may not become the viewer's role
/// (42501), or that there is no such role (22023).
pub fn refused(e: &Error) -> bool {
    matches!(e, Error::Db { source, .. } if matches!(source.code.as_deref(), Some("42501" | "22023")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::Cursor;
    use crate::event::Event;

    fn change(op: &str, new: &str, old: &str) -> Arc<Shared> {
        let text = format!(
            r#"{{"seq":5,"txid":9,"kind":"change","channel":"t","time":"2026-01-01T00:00:00Z","op":"{op}","schema":"public","table":"t","key":{{"id":1}},"new":{new},"old":{old}}}"#
        );
        Arc::new(Shared::new(Event::decode("t", text).unwrap(), Cursor { txid: 9, seq: 5 }))
    }

    fn answer(new_seen: bool, old_seen: bool, columns: Option<&[&str]>) -> Answer {
        let columns = columns.map(|c| c.iter().map(|s| s.to_string()).collect());
        Answer { readable: true, new_seen, old_seen, columns, open: false }
    }

    #[test]
    fn updates_enter_leave_or_stay() {
        let s = change("UPDATE", r#"{"id":1,"t":"a","x":2}"#, r#"{"id":1,"t":"b","x":1}"#);
        let same = rewrite(&s, &answer(true, true, None)).unwrap();
        assert!(Arc::ptr_eq(&same, &s), "an unchanged event is shared, not copied");
        let enter = rewrite(&s, &answer(true, false, None)).unwrap();
        let c = enter.event.change().unwrap();
        assert_eq!(
            (c.view, c.old.is_none(), c.new.as_ref().unwrap().get()),
            (Some(View::Enter), true, r#"{"id":1,"t":"a","x":2}"#)
        );
        let v: serde_json::Value = serde_json::from_str(enter.event.json()).unwrap();
        assert_eq!((v["view"].as_str(), v["seq"].as_i64(), v["old"].is_null()), (Some("enter"), Some(5), true));
        let leave = rewrite(&s, &answer(false, true, None)).unwrap();
        let c = leave.event.change().unwrap();
        assert_eq!((c.view, c.new.is_none(), c.old.is_none()), (Some(View::Leave), true, true));
        assert_eq!(c.key.as_ref().unwrap().get(), r#"{"id":1}"#);
        assert!(rewrite(&s, &answer(false, false, None)).is_none());
        // Decoded again (a client), the view is there.
        let again = Event::decode("t", leave.event.json().to_string()).unwrap();
        assert_eq!(again.change().unwrap().view, Some(View::Leave));
    }

    #[test]
    fn deletes_carry_the_old_row_and_columns_are_removed() {
        let s = change("DELETE", "null", r#"{"id":1,"t":"a","secret":"s"}"#);
        let seen = rewrite(&s, &answer(false, true, Some(&["id", "t"]))).unwrap();
        let c = seen.event.change().unwrap();
        assert_eq!(c.old.as_ref().unwrap().get(), r#"{"id":1,"t":"a"}"#);
        assert!(!seen.event.json().contains("secret"));
        assert!(rewrite(&s, &answer(false, false, None)).is_none());
        // A leave without a readable key cannot name its row.
        let u = change("UPDATE", r#"{"id":1}"#, r#"{"id":1}"#);
        assert!(rewrite(&u, &answer(false, true, Some(&["t"]))).is_none());
        let unreadable = Answer { readable: false, ..answer(true, true, None) };
        assert!(rewrite(&change("TRUNCATE", "null", "null"), &unreadable).is_none());
    }

    #[test]
    fn only_keeps_named_members_in_order() {
        let row = RawValue::from_string(r#"{"b":[1,{"c":2}],"a":"x\"y","z":null}"#.into()).unwrap();
        let kept = only(&row, &["z".to_string(), "b".to_string()]).unwrap();
        assert_eq!(kept.get(), r#"{"b":[1,{"c":2}],"z":null}"#);
        assert!(only(&RawValue::from_string("[1]".into()).unwrap(), &[]).is_err());
    }
}
