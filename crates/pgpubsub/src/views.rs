//! Row-level authorization: each subscriber sees exactly the row changes
//! its PostgreSQL role (with its claims) could `SELECT`.
//!
//! A subscriber is a [`Viewer`]: a role, and the claims its policies read
//! (PostgREST's convention: the JSON object of a token's claims, in the
//! setting `request.jwt.claims`). Viewers with the same role and claims
//! form one class and share every decision: [`Views`] keeps one [`Class`]
//! per viewer in use. The classes of one role decide their batches of
//! events together, one statement for all of them
//! (`pubsub.row_views_classes`, run as the role with each class's claims):
//! the table's policies on the old and the new row, and the columns the
//! role may read. Where the policies read the claims only as
//! `current_setting('request.jwt.claims', true)`, that statement joins the
//! rows with the classes' claims (a hash join for an equality such as
//! `tenant_id = claims ->> 'tenant'`); else it evaluates them class by
//! class. So the database work per event grows with the classes subscribed
//! (and often not even that), never with the subscribers, and the number
//! of statements with the roles.
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
use crate::error::{DbMessage, Error, Result};
use crate::event::{Change, Op, View};
use crate::event_log::LogConn;
use crate::hub::Shared;

/// How long a decision is reused: the bound on a policy change or a
/// revoked grant taking effect.
pub const FRESH: Duration = Duration::from_secs(1);

/// Per seq, the rounds that decided it lately.
type Verdicts = BTreeMap<i64, Vec<Verdict>>;

/// One round's decision of one event for the classes it decided.
#[derive(Debug)]
struct Verdict {
    at: Instant,
    /// The classes decided (ids, sorted; shared by the round's events).
    decided: Arc<[u64]>,
    /// What every one of them sees, when the role alone decides it (a
    /// table open to it, without row security for it, or whose policies
    /// read no claims); `None`: only those with an entry of their own see it.
    all: Option<Seen>,
}

/// A failed round: its number, the SQLSTATE and the message.
type Failure = (u64, Option<String>, String);

/// The next class's id.
static NEXT_CLASS: AtomicU64 = AtomicU64::new(1);

/// Decisions kept per class and per group before the stale ones (older
/// than [`FRESH`]) are dropped; those of the last second stay, whatever
/// their number (bounded by the rate of events).
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
    /// The classes of each role, which decide together.
    groups: Mutex<HashMap<Option<String>, Weak<Group>>>,
    counts: Arc<Counts>,
}

/// The classes of one role: one statement decides what all of them asked.
#[derive(Debug)]
struct Group {
    members: Mutex<Vec<Weak<Class>>>,
    /// Held by the one call that runs the group's statement (a round).
    gate: tokio::sync::Mutex<()>,
    /// Rounds ended: the calls that wait for a round wake at once (not one
    /// by one through the gate: a class may have thousands of callers).
    rounds: tokio::sync::watch::Sender<u64>,
    /// seq → when, and the ids (sorted) of the classes decided for it
    /// then. A class decided and without a decision of its own that is as
    /// new does not see the event: so a round records one entry per event
    /// for every class, and one per class only for the events it sees.
    verdicts: Mutex<Verdicts>,
    /// Tables the role may read whole (schema → table → when that was
    /// last said): their events pass without asking.
    open: Mutex<HashMap<String, HashMap<String, Instant>>>,
    /// Claims whose policies failed lately, and when: their classes ask
    /// alone for [`QUARANTINE`] (a bad token must not cost the others their
    /// join, reconnecting or not).
    failing: Mutex<HashMap<Option<String>, Instant>>,
    /// Rounds begun: each round's number.
    begun: AtomicU64,
}

/// How long claims whose policies failed are decided apart.
const QUARANTINE: Duration = Duration::from_secs(30);

impl Default for Group {
    fn default() -> Group {
        Group {
            members: Mutex::default(),
            gate: tokio::sync::Mutex::new(()),
            rounds: tokio::sync::watch::Sender::new(0),
            verdicts: Mutex::default(),
            open: Mutex::default(),
            failing: Mutex::default(),
            begun: AtomicU64::new(0),
        }
    }
}

/// Ends a round when dropped, however its call ends: frees the gate, then
/// wakes the waiters (in that order: one that wakes must be able to start
/// the next round).
struct RoundEnds<'a> {
    gate: Option<tokio::sync::MutexGuard<'a, ()>>,
    rounds: &'a tokio::sync::watch::Sender<u64>,
    round: u64,
}

impl Drop for RoundEnds<'_> {
    fn drop(&mut self) {
        drop(self.gate.take());
        let round = self.round;
        self.rounds.send_modify(|r| *r = (*r).max(round));
    }
}

impl Group {
    fn join(&self, class: &Arc<Class>) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members.retain(|c| c.strong_count() > 0);
        members.push(Arc::downgrade(class));
    }

    /// Notes that `claims` made the policies fail.
    fn quarantine(&self, claims: &Option<String>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.retain(|_, at| at.elapsed() < QUARANTINE);
        if failing.len() < KEPT {
            failing.insert(claims.clone(), Instant::now());
        }
    }

    /// Whether `claims` made the policies fail lately.
    fn quarantined(&self, claims: &Option<String>) -> bool {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.get(claims).is_some_and(|at| at.elapsed() < QUARANTINE)
    }

    /// Begins a round: its number, and the guard that ends it.
    fn begin<'a>(&'a self, gate: tokio::sync::MutexGuard<'a, ()>) -> (u64, RoundEnds<'a>) {
        let round = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        (round, RoundEnds { gate: Some(gate), rounds: &self.rounds, round })
    }

    fn members(&self) -> Vec<Arc<Class>> {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members.iter().filter_map(Weak::upgrade).collect()
    }
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
        let group = {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            groups.retain(|_, g| g.strong_count() > 0);
            match groups.get(&viewer.role).and_then(Weak::upgrade) {
                Some(g) => g,
                None => {
                    let g = Arc::new(Group::default());
                    groups.insert(viewer.role.clone(), Arc::downgrade(&g));
                    g
                }
            }
        };
        let class = Class::new(viewer.clone(), self.counts.clone(), group);
        classes.insert(viewer, Arc::downgrade(&class));
        class
    }

    /// Classes in use now.
    pub fn classes(&self) -> usize {
        let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        classes.values().filter(|c| c.strong_count() > 0).count()
    }

    /// Statements run so far to decide events (one per role per batch).
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

    /// Decides `events` for every class in use before they are handed out,
    /// one statement per role: then a subscriber whose filter has its
    /// class ([`Filter::class`](crate::hub::Filter::class)) is not even
    /// woken for the rows it may not see. Nothing to do (and no statement)
    /// while no class is in use.
    ///
    /// # Errors
    /// When the database cannot answer for some role (the events can still
    /// be handed out: each subscriber's reader decides what is not known).
    pub async fn decide_ahead(&self, log: &LogConn, events: &[Arc<Shared>]) -> Result<()> {
        if !events.iter().any(|s| needs(s).is_some()) {
            return Ok(());
        }
        let groups: Vec<Arc<Group>> = {
            let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            groups.values().filter_map(Weak::upgrade).collect()
        };
        if groups.is_empty() {
            return Ok(());
        }
        // Noted on each event for the hub: which classes were decided not
        // knowing whether they see it, and which of them do (a check per
        // subscriber without a lock). An event every decided class of a
        // role sees names none of that role's (they pass).
        let mut rounds: Vec<(Arc<[u64]>, std::collections::HashSet<i64>)> = Vec::new();
        let mut seen: HashMap<i64, Vec<u64>> = HashMap::new();
        let mut failure = None;
        for group in groups {
            let members = group.members();
            // One that has not failed lately runs the round (one that has
            // would run it alone).
            let Some(first) = members.iter().find(|c| !c.failing()).or(members.first()) else { continue };
            // A role that cannot be decided now leaves its events to its
            // subscribers' readers; the other roles' go on.
            let round = match first.round_for_all(log, events).await {
                Ok(round) => round,
                Err(e) => {
                    failure.get_or_insert(e);
                    continue;
                }
            };
            for (seq, ids) in round.seen {
                seen.entry(seq).or_default().extend(ids);
            }
            rounds.push((round.decided, round.all_see.into_iter().collect()));
        }
        let union = |of: &mut dyn Iterator<Item = &Arc<[u64]>>| -> Arc<[u64]> {
            let mut ids: Vec<u64> = of.flat_map(|d| d.iter().copied()).collect();
            ids.sort_unstable();
            ids.into()
        };
        let every: Arc<[u64]> = union(&mut rounds.iter().map(|(d, _)| d));
        for s in events {
            let Some((seq, _)) = needs(s) else { continue };
            let decided = if rounds.iter().all(|(_, all)| !all.contains(&seq)) {
                every.clone()
            } else {
                union(&mut rounds.iter().filter(|(_, all)| !all.contains(&seq)).map(|(d, _)| d))
            };
            s.decided_ahead(decided, seen.get(&seq).cloned().unwrap_or_default());
        }
        failure.map_or(Ok(()), Err)
    }
}

/// What a round decided: the classes (ids, sorted); per event (seq), those
/// of them that see it; the events all of them see; and the failure of the
/// class that ran it.
struct Round {
    decided: Arc<[u64]>,
    seen: HashMap<i64, Vec<u64>>,
    all_see: Vec<i64>,
    mine: Option<Error>,
}

/// What one class of subscribers sees; see the module docs.
#[derive(Debug)]
pub struct Class {
    viewer: Viewer,
    counts: Arc<Counts>,
    /// seq → (when decided, what the class sees), for the events it sees
    /// (the group's verdicts say which it does not).
    decided: Mutex<BTreeMap<i64, (Instant, Seen)>>,
    /// When a statement as the viewer last succeeded: the role may be
    /// taken (what [`Class::check`] asks).
    answered: Mutex<Option<Instant>>,
    /// Events some subscriber of the class asked about, by seq, not yet
    /// decided: the next statement of its group decides them all (while
    /// one statement runs, the events that come meanwhile gather into the
    /// next one).
    pending: Mutex<BTreeMap<i64, Arc<Shared>>>,
    /// The classes of the same role.
    group: Arc<Group>,
    /// Unique in the process (what an event decided ahead names it by).
    id: u64,
    /// The last round that could not decide for this class: its number,
    /// the SQLSTATE and the message (what its waiting subscribers get).
    failed: Mutex<Option<Failure>>,
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
            Seen::As(r) if r.position == s.position => Some(r),
            // Decided for another copy of the event (ahead, or for another
            // subscriber, whose reader stood elsewhere): at `s`'s position.
            Seen::As(r) => Some(Arc::new(Shared::new(r.event.clone(), s.position))),
        }
    }
}

/// One event's answer from `pubsub.row_views_classes`, for one class.
#[derive(Debug, Clone)]
struct Answer {
    readable: bool,
    new_seen: bool,
    old_seen: bool,
    columns: Option<Vec<String>>,
    open: bool,
}

/// The decisions a class holds, and its group's, under their locks.
struct Known<'a> {
    id: u64,
    decided: &'a BTreeMap<i64, (Instant, Seen)>,
    verdicts: &'a Verdicts,
    open: &'a HashMap<String, HashMap<String, Instant>>,
    now: Instant,
}

impl Known<'_> {
    /// What the class sees of `s` if that is known within [`FRESH`]: every
    /// event but a row change passes; a row change of a table open to the
    /// role passes; else the newest decision: the class's own (it sees
    /// the event), or its group's that names it (what every class decided
    /// sees, or nothing).
    fn of(&self, s: &Shared) -> Option<Seen> {
        let Some((seq, c)) = needs(s) else { return Some(Seen::Same) };
        let fresh = |at: &Instant| self.now - *at < FRESH;
        if self.open.get(&c.schema).and_then(|t| t.get(&c.table)).is_some_and(fresh) {
            return Some(Seen::Same);
        }
        let mine = self.decided.get(&seq).filter(|(at, _)| fresh(at));
        let group = self
            .verdicts
            .get(&seq)
            .into_iter()
            .flatten()
            .filter(|v| fresh(&v.at) && v.decided.binary_search(&self.id).is_ok())
            .max_by_key(|v| v.at);
        match (mine, group) {
            (Some((mine_at, seen)), Some(v)) if *mine_at >= v.at => Some(seen.clone()),
            (_, Some(v)) => Some(v.all.clone().unwrap_or(Seen::Hidden)),
            (Some((_, seen)), None) => Some(seen.clone()),
            (None, None) => None,
        }
    }
}

impl Class {
    /// A class in `group`, counting into `counts`.
    fn new(viewer: Viewer, counts: Arc<Counts>, group: Arc<Group>) -> Arc<Class> {
        let class = Arc::new(Class {
            viewer,
            counts,
            decided: Mutex::default(),
            answered: Mutex::default(),
            pending: Mutex::default(),
            group: group.clone(),
            id: NEXT_CLASS.fetch_add(1, Ordering::Relaxed),
            failed: Mutex::default(),
        });
        group.join(&class);
        class
    }

    /// A class of the reading connection's own role (a listener's), apart
    /// from any [`Views`].
    pub(crate) fn itself() -> Arc<Class> {
        Class::new(Viewer::itself(), Arc::default(), Arc::default())
    }

    /// Runs `f` over what the class knows now.
    fn with_known<T>(&self, f: impl FnOnce(&Known<'_>) -> T) -> T {
        let decided = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        let open = self.group.open.lock().unwrap_or_else(|e| e.into_inner());
        let verdicts = self.group.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        f(&Known { id: self.id, decided: &decided, verdicts: &verdicts, open: &open, now: Instant::now() })
    }

    /// This class's number, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
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
        ask(log, self.viewer.role.clone(), Vec::new(), Vec::new(), Vec::new(), vec![self.viewer.claims.clone()])
            .await?;
        *self.answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(())
    }

    /// What the class sees of `events`, in order: each as it is, rewritten
    /// (an enter, a leave, columns removed), or left out. Events other than
    /// row changes pass as they are (channel authorization covers them).
    /// One statement decides every row change not decided in the last
    /// [`FRESH`], for every class of the role that waits; while it runs,
    /// the others wait for its end (all woken at once) and look again.
    ///
    /// Cancel-safe: a dropped call only leaves decisions made for later.
    ///
    /// # Errors
    /// When the database cannot answer, or the class's policies fail on its
    /// claims (the events are not handed out).
    pub async fn see(&self, log: &LogConn, events: &[Arc<Shared>]) -> Result<Vec<Arc<Shared>>> {
        loop {
            if let Some(seen) = self.known(events) {
                return Ok(seen);
            }
            // Waiting (again: a round dropped or failed may have taken them).
            self.hold(events.iter().cloned());
            let mut rounds = self.group.rounds.subscribe();
            let waited_from = *rounds.borrow_and_update();
            if let Ok(gate) = self.group.gate.try_lock() {
                // Whatever happens to this call, the round ends (the gate
                // free first): the others look again.
                let (round, _ends) = self.group.begin(gate);
                if let Some(e) = self.decide(log, round, events, &[]).await?.mine {
                    return Err(e);
                }
                // Ours were all in the round: known now, unless some
                // expired meanwhile (then another round).
                continue;
            }
            // A statement runs: its end wakes every waiter at once.
            let _ = rounds.changed().await;
            if let Some(seen) = self.known(events) {
                return Ok(seen);
            }
            let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some((_, code, message)) = failed.filter(|(round, ..)| *round > waited_from) {
                return Err(Error::Db {
                    context: "deciding what a role may see",
                    source: DbMessage::reported(code, message),
                });
            }
        }
    }

    /// A round that decides `events` for every class of the group (and
    /// what they wait for), once the gate is free. A class that fails is
    /// left out of the answer (its callers get the error).
    async fn round_for_all(&self, log: &LogConn, events: &[Arc<Shared>]) -> Result<Round> {
        loop {
            let mut rounds = self.group.rounds.subscribe();
            rounds.borrow_and_update();
            if let Ok(gate) = self.group.gate.try_lock() {
                let (round, _ends) = self.group.begin(gate);
                // This class's own failure is its callers' (noted).
                return self.decide(log, round, &[], events).await;
            }
            let _ = rounds.changed().await;
        }
    }

    /// One round, by the holder of the group's gate: decides, in one
    /// statement, `own`, what this class and every other of the group waits
    /// for, and `everyone` for every class of the group. A class that fails
    /// has its error noted for `round` (for its callers waiting on the
    /// round, who ask again otherwise) and its claims quarantined; this
    /// class's own failure is also in the answer (`mine`). Errs when the
    /// statement fails (for every class).
    async fn decide(&self, log: &LogConn, round: u64, own: &[Arc<Shared>], everyone: &[Arc<Shared>]) -> Result<Round> {
        // This class first, with `own` whatever else it holds; then every
        // other of the group: those with events waiting (at most BATCH_MAX
        // each, about 2 * BATCH_MAX in all: the rest wait for the next
        // round), or all with `everyone`. A class that failed a moment ago
        // asks alone (a bad claim must not cost the others their join).
        let mut all: BTreeMap<i64, Arc<Shared>> =
            own.iter().chain(everyone).filter_map(|s| Some((needs(s)?.0, s.clone()))).collect();
        let mut asking: Vec<(&Class, Vec<Arc<Shared>>)> = Vec::new();
        let mine = self.take();
        all.extend(mine.iter().map(|s| (s.event.seq.unwrap_or_default(), s.clone())));
        asking.push((self, mine));
        let others = if self.failing() { Vec::new() } else { self.group.members() };
        for class in others.iter().map(Arc::as_ref).filter(|c| !std::ptr::eq(*c, self) && !c.failing()) {
            let full = all.len() >= 2 * BATCH_MAX;
            if full && everyone.is_empty() {
                break;
            }
            let todo = if full { Vec::new() } else { class.take() };
            if !todo.is_empty() || !everyone.is_empty() {
                all.extend(todo.iter().map(|s| (s.event.seq.unwrap_or_default(), s.clone())));
                asking.push((class, todo));
            }
        }
        let none = || Round { decided: Arc::from([]), seen: HashMap::new(), all_see: Vec::new(), mine: None };
        if all.is_empty() {
            return Ok(none());
        }
        let all: Vec<Arc<Shared>> = all.into_values().collect();
        let (mut tables, mut news, mut olds) = (Vec::new(), Vec::new(), Vec::new());
        for s in &all {
            let c = s.event.change().expect("only row changes are pending");
            tables.push(format!("{}.{}", quote_ident(&c.schema), quote_ident(&c.table)));
            news.push(c.new.as_ref().map(|r| r.get().to_string()));
            olds.push(c.old.as_ref().map(|r| r.get().to_string()));
        }
        let claims: Vec<Option<String>> = asking.iter().map(|(c, _)| c.viewer.claims.clone()).collect();
        // On failure, the callers waiting on this round ask again
        // themselves, with their own events (no class is at fault).
        let answers = ask(log, self.viewer.role.clone(), tables, news, olds, claims).await?;
        self.counts.statements.fetch_add(1, Ordering::Relaxed);
        self.counts.decided.fetch_add((all.len() * asking.len()) as u64, Ordering::Relaxed);
        let said = Instant::now();
        // Tables open to the role: their events pass without asking.
        {
            let mut open = self.group.open.lock().unwrap_or_else(|e| e.into_inner());
            for (s, facts) in all.iter().zip(&answers.facts) {
                let c = s.event.change().expect("only row changes are pending");
                match (facts.open, open.get_mut(&c.schema)) {
                    (true, _) => {
                        open.entry(c.schema.clone()).or_default().insert(c.table.clone(), said);
                    }
                    (false, Some(tables)) => {
                        tables.remove(&c.table);
                    }
                    (false, None) => {}
                }
            }
        }
        // What the role alone decides (the same for every class): kept
        // once per event, never per class.
        let common: Vec<Option<Seen>> = all
            .iter()
            .zip(&answers.facts)
            .map(|(s, facts)| match seen_as(s, facts) {
                Seen::Hidden => None,
                seen => Some(seen),
            })
            .collect();
        // Each class's own: the events it sees (a few, with row security).
        let mut by_class: HashMap<usize, Vec<usize>> = HashMap::new();
        for &(k, n) in answers.seen.keys() {
            by_class.entry(k).or_default().push(n);
        }
        let mut mine = None;
        let mut decided = Vec::with_capacity(asking.len());
        let mut seen: HashMap<i64, Vec<u64>> = HashMap::new();
        let mut records: Vec<(&Class, Vec<(i64, Seen)>)> = Vec::new();
        for (k, (class, _)) in asking.into_iter().enumerate() {
            if let Some((code, message)) = answers.failed.get(&k) {
                if std::ptr::eq(class, self) {
                    let source = DbMessage::reported(code.clone(), message.clone());
                    mine = Some(Error::Db { context: "deciding what a role may see", source });
                }
                // Its callers waiting on this round get the error; later
                // ones ask again with their own events.
                class.fail(round, code.clone(), message.clone());
                self.group.quarantine(&class.viewer.claims);
                continue;
            }
            decided.push(class.id);
            let mut sees: Vec<(i64, Seen)> = Vec::new();
            for n in by_class.remove(&k).unwrap_or_default() {
                if common[n].is_some() {
                    continue;
                }
                match seen_as(&all[n], &answers.of(k, n)) {
                    Seen::Hidden => {}
                    s => {
                        let seq = all[n].event.seq.unwrap_or_default();
                        seen.entry(seq).or_default().push(class.id);
                        sees.push((seq, s));
                    }
                }
            }
            records.push((class, sees));
        }
        decided.sort_unstable();
        let decided: Arc<[u64]> = decided.into();
        // Written at once, all with the same time (taken after the work,
        // so that what was decided is fresh for a whole FRESH).
        let now = Instant::now();
        for (class, sees) in records {
            *class.answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
            class.record(now, sees);
        }
        let all_see: Vec<i64> = all
            .iter()
            .zip(&common)
            .filter(|(_, c)| c.is_some())
            .map(|(s, _)| s.event.seq.unwrap_or_default())
            .collect();
        {
            let mut verdicts = self.group.verdicts.lock().unwrap_or_else(|e| e.into_inner());
            for (s, all) in all.iter().zip(common) {
                // Decided for other classes a moment ago: each stands, with
                // its own time.
                let entries = verdicts.entry(s.event.seq.unwrap_or_default()).or_default();
                entries.retain(|v| now - v.at < FRESH);
                entries.push(Verdict { at: now, decided: decided.clone(), all });
            }
            forget_stale(&mut verdicts, |entries| {
                entries.retain(|v| now - v.at < FRESH);
                entries.is_empty()
            });
        }
        let seen_by = seen.values().map(Vec::len).sum::<usize>() + all_see.len() * decided.len();
        self.counts.withheld.fetch_add((all.len() * decided.len()).saturating_sub(seen_by) as u64, Ordering::Relaxed);
        Ok(Round { decided, seen, all_see, mine })
    }

    /// Notes that the class could not be decided in `round`.
    fn fail(&self, round: u64, code: Option<String>, message: String) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some((round, code, message));
    }

    /// Whether the class's claims made its policies fail lately.
    fn failing(&self) -> bool {
        self.group.quarantined(&self.viewer.claims)
    }

    /// Adds `events`' row changes to what the class waits to have decided.
    fn hold(&self, events: impl IntoIterator<Item = Arc<Shared>>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for s in events {
            if let Some((seq, _)) = needs(&s) {
                pending.entry(seq).or_insert(s);
            }
        }
    }

    /// Takes at most BATCH_MAX of the waiting events, those not decided
    /// meanwhile.
    fn take(&self) -> Vec<Arc<Shared>> {
        let batch: BTreeMap<i64, Arc<Shared>> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match pending.keys().nth(BATCH_MAX).copied() {
                None => std::mem::take(&mut *pending),
                Some(first_left) => {
                    let rest = pending.split_off(&first_left);
                    std::mem::replace(&mut *pending, rest)
                }
            }
        };
        self.with_known(|k| batch.into_values().filter(|s| k.of(s).is_none()).collect())
    }

    /// What the class sees of `events`, if every row change among them was
    /// decided within [`FRESH`] or is of a table open to the role.
    fn known(&self, events: &[Arc<Shared>]) -> Option<Vec<Arc<Shared>>> {
        self.with_known(|k| {
            let mut out = Vec::with_capacity(events.len());
            for s in events {
                out.extend(k.of(s)?.of(s));
            }
            Some(out)
        })
    }

    /// Keeps what the class sees of the events it sees (and forgets the
    /// stale ones).
    fn record(&self, now: Instant, sees: Vec<(i64, Seen)>) {
        let mut decided = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        for (seq, seen) in sees {
            decided.insert(seq, (now, seen));
        }
        forget_stale(&mut decided, |(at, _)| now - *at >= FRESH);
    }
}

/// What one statement answered for a group's classes.
struct Answers {
    /// Per event (by index): what every class of the role sees of it.
    facts: Vec<Answer>,
    /// (class, event) → the class also sees the new row, the old row.
    seen: HashMap<(usize, usize), (bool, bool)>,
    /// Classes that could not be decided: SQLSTATE and message.
    failed: HashMap<usize, (Option<String>, String)>,
}

impl Answers {
    /// Class `k`'s answer for event `n`.
    fn of(&self, k: usize, n: usize) -> Answer {
        let mut a = self.facts[n].clone();
        if let Some((new, old)) = self.seen.get(&(k, n)) {
            a.new_seen |= new;
            a.old_seen |= old;
        }
        a
    }
}

/// One statement: `pubsub.row_views_classes` as `role`, for one class per
/// element of `claims`.
async fn ask(
    log: &LogConn,
    role: Option<String>,
    tables: Vec<String>,
    news: Vec<Option<String>>,
    olds: Vec<Option<String>>,
    claims: Vec<Option<String>>,
) -> Result<Answers> {
    let (events, classes) = (tables.len(), claims.len());
    let rows = log
        .run_pg("deciding what a role may see", |c| async move {
            c.query(
                "SELECT k, n, readable, new_seen, old_seen, columns, open
                 FROM pubsub.row_views_classes($1::text[], $2::text[]::jsonb[], $3::text[]::jsonb[], $4, $5::text[])",
                &[&tables, &news, &olds, &role, &claims],
            )
            .await
        })
        .await?;
    let mut facts: Vec<Option<Answer>> = vec![None; events];
    let mut answers = Answers { facts: Vec::new(), seen: HashMap::new(), failed: HashMap::new() };
    let wrong = |what: String| Error::ConnectionLost(format!("pubsub.row_views_classes answered {what}"));
    for r in &rows {
        let (k, n): (Option<i64>, Option<i64>) = (r.get(0), r.get(1));
        // 1-based, as SQL counts.
        let index = |i: i64, len: usize| usize::try_from(i - 1).ok().filter(|&i| i < len);
        match (k, n) {
            (None, Some(n)) => {
                let n = index(n, events).ok_or_else(|| wrong(format!("event {n} of {events}")))?;
                facts[n] = Some(Answer {
                    readable: r.get(2),
                    new_seen: r.get(3),
                    old_seen: r.get(4),
                    columns: r.get(5),
                    open: r.get(6),
                });
            }
            (Some(k), Some(n)) => {
                let k = index(k, classes).ok_or_else(|| wrong(format!("class {k} of {classes}")))?;
                let n = index(n, events).ok_or_else(|| wrong(format!("event {n} of {events}")))?;
                let seen = answers.seen.entry((k, n)).or_default();
                seen.0 |= r.get::<_, bool>(3);
                seen.1 |= r.get::<_, bool>(4);
            }
            (Some(k), None) => {
                let k = index(k, classes).ok_or_else(|| wrong(format!("class {k} of {classes}")))?;
                let said: Option<Vec<String>> = r.get(5);
                let said = said.unwrap_or_default();
                let code = said.first().cloned();
                answers.failed.insert(k, (code, said.get(1).cloned().unwrap_or_default()));
            }
            (None, None) => return Err(wrong("a row for no event and no class".into())),
        }
    }
    answers.facts = facts
        .into_iter()
        .enumerate()
        .map(|(n, a)| a.ok_or_else(|| wrong(format!("nothing for event {} (is the schema migrated?)", n + 1))))
        .collect::<Result<_>>()?;
    Ok(answers)
}

/// Drops the decisions `stale` says are past [`FRESH`]: the oldest seqs
/// while they are (new decisions are mostly of newer seqs), and all of
/// them past [`KEPT`] entries. Never by count alone: a replay's old seqs,
/// just decided, must stay until they are read.
fn forget_stale<V>(map: &mut BTreeMap<i64, V>, mut stale: impl FnMut(&mut V) -> bool) {
    while let Some(mut first) = map.first_entry() {
        if !stale(first.get_mut()) {
            break;
        }
        first.remove();
    }
    if map.len() > KEPT {
        map.retain(|_, v| !stale(v));
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
