//! The hub: fans one stream of events (a [`Listener`](crate::Listener)'s)
//! out to many subscribers, each with its own bounded queue and filter.
//!
//! Publishing never waits. An event is wrapped in an `Arc` once and shared by
//! every subscriber's queue, so its JSON is serialized once, not once per
//! subscriber. A subscriber whose queue is full misses events: from the first
//! miss nothing more is queued for it, and once it has read what was queued
//! it receives a [`Delivery::Lagged`] with how many it missed and the seq of
//! the last event it got, so it can resume from the log. The notice sits
//! exactly where the gap is. A slow subscriber therefore never slows the
//! others or grows memory: each queue holds at most `capacity` deliveries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::cursor::Cursor;
use crate::event::{Body, Event, Op};

/// What a subscriber receives.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Delivery {
    /// An event that passed the subscriber's filter.
    Event(Arc<Shared>),
    /// The queue was full: `missed` events were dropped for this subscriber
    /// after the event with seq `last_seq` (`None`: before any).
    Lagged {
        /// Events dropped.
        missed: u64,
        /// The last event delivered before the drop.
        last_seq: Option<i64>,
    },
}

/// One event as every subscriber shares it.
#[derive(Debug)]
pub struct Shared {
    /// The event.
    pub event: Event,
    /// Where a subscriber that has this event may resume from: the feeding
    /// listener's cursor when the event went out. Commit-safe (never past an
    /// event that might still arrive), so resuming from it can repeat a few
    /// events but never skip one.
    pub position: Cursor,
    /// Its new (or old) row parsed, on first use by a column filter.
    row: OnceLock<Option<Value>>,
    /// The caller's renderings of this event (one per slot), each made by
    /// the first subscriber that needs it and shared by the rest.
    frames: [OnceLock<bytes::Bytes>; FRAME_SLOTS],
    /// Which classes of subscribers were decided for it ahead, and which
    /// of them see it (`views::Views::decide_ahead`).
    ahead: OnceLock<Ahead>,
}

/// The classes decided for an event ahead: ids, sorted (the decided ones
/// shared by every event of a batch).
#[derive(Debug)]
struct Ahead {
    decided: Arc<[u64]>,
    seen: Vec<u64>,
}

/// How many renderings of an event [`Shared::frame`] keeps: one per wire
/// format the caller serves (the gateway's are WebSocket and SSE).
pub const FRAME_SLOTS: usize = 2;

impl Shared {
    /// Wraps an event for sharing.
    pub fn new(event: Event, position: Cursor) -> Self {
        Shared {
            event,
            position,
            row: OnceLock::new(),
            frames: std::array::from_fn(|_| OnceLock::new()),
            ahead: OnceLock::new(),
        }
    }

    /// Notes which classes (by id) were decided for this event ahead, and
    /// which of them see it; the first note stands.
    pub(crate) fn decided_ahead(&self, decided: Arc<[u64]>, mut seen: Vec<u64>) {
        seen.sort_unstable();
        let _ = self.ahead.set(Ahead { decided, seen });
    }

    /// Whether class `id` was decided ahead not to see this event.
    pub(crate) fn hidden_from(&self, id: u64) -> bool {
        self.ahead.get().is_some_and(|a| a.seen.binary_search(&id).is_err() && a.decided.binary_search(&id).is_ok())
    }

    /// This event rendered by `make` into `slot` (below [`FRAME_SLOTS`]; the
    /// caller gives each of its wire formats a slot of its own), made once
    /// for all subscribers: each gets a reference-counted handle to the same
    /// bytes. A slot past the last is rendered anew on every call.
    pub fn frame(&self, slot: usize, make: impl FnOnce(&Shared) -> bytes::Bytes) -> bytes::Bytes {
        match self.frames.get(slot) {
            Some(cell) => cell.get_or_init(|| make(self)).clone(),
            None => make(self),
        }
    }

    /// The row a column filter looks at: `new`, or `old` for a delete.
    fn row(&self) -> Option<&Value> {
        self.row
            .get_or_init(|| {
                let c = self.event.change()?;
                let raw = c.new.as_ref().or(c.old.as_ref())?;
                serde_json::from_str(raw.get()).ok()
            })
            .as_ref()
    }
}

/// Which events a subscriber wants. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Filter {
    /// Channels (at least one must match; empty: all).
    pub channels: Vec<String>,
    /// Only row changes of this table (`table` or `schema.table`).
    pub table: Option<String>,
    /// Only these operations.
    pub ops: Vec<Op>,
    /// Only rows whose columns equal these values (all of them).
    pub columns: Vec<(String, Value)>,
    /// Not the row changes that the class of subscribers with this id
    /// (`views::Class::id`) was decided ahead not to see
    /// (`views::Views::decide_ahead`): a subscriber is not woken for the
    /// rows of other tenants. What was not decided passes, to be decided
    /// by the subscriber's own reader.
    pub class: Option<u64>,
}

impl Filter {
    /// A filter on channels only.
    pub fn channels<I, S>(channels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Filter { channels: channels.into_iter().map(Into::into).collect(), ..Filter::default() }
    }

    /// Whether `shared` passes.
    pub fn matches(&self, shared: &Shared) -> bool {
        let e = &shared.event;
        if !self.channels.is_empty() && !self.channels.contains(&e.channel) {
            return false;
        }
        if self.class.is_some_and(|id| shared.hidden_from(id)) {
            return false;
        }
        if self.table.is_none() && self.ops.is_empty() && self.columns.is_empty() {
            return true;
        }
        // A gap in capture concerns every subscriber of the channel.
        if matches!(e.body, Body::Resync(_)) {
            return true;
        }
        let Body::Change(c) = &e.body else { return false };
        if let Some(t) = &self.table {
            let qualified = t.contains('.');
            let same = if qualified { *t == format!("{}.{}", c.schema, c.table) } else { *t == c.table };
            if !same {
                return false;
            }
        }
        if !self.ops.is_empty() && !self.ops.contains(&c.op) {
            return false;
        }
        if self.columns.is_empty() {
            return true;
        }
        let Some(row) = shared.row() else { return false };
        self.columns.iter().all(|(k, v)| row.get(k) == Some(v))
    }
}

struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<Delivery>,
    /// Events dropped and not yet reported; shared with the subscription,
    /// which reports them once its queue is empty.
    missed: Arc<AtomicU64>,
}

/// Counters of a hub.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Events published into the hub.
    pub events: AtomicU64,
    /// Deliveries queued to subscribers.
    pub deliveries: AtomicU64,
    /// Deliveries dropped because a subscriber's queue was full.
    pub dropped: AtomicU64,
    /// Lag notices queued.
    pub lag_notices: AtomicU64,
}

/// The fan-out point; cheap to clone (all clones are the same hub).
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next_id: AtomicU64,
    capacity: usize,
    stats: HubStats,
    /// The position of the latest event published.
    position: Mutex<Cursor>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("subscribers", &self.subscribers()).finish_non_exhaustive()
    }
}

/// A subscriber's end: deliveries in order. Dropping it unsubscribes.
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<Delivery>,
    missed: Arc<AtomicU64>,
    /// Seq of the last event handed out, for the lag notice.
    last_seq: Option<i64>,
    hub: Hub,
}

impl Subscription {
    /// The next delivery; `None` when the hub is gone.
    pub async fn recv(&mut self) -> Option<Delivery> {
        if let Some(d) = self.try_recv() {
            return Some(d);
        }
        // Empty and nothing missed: the hub queues again, so wait.
        let d = self.rx.recv().await?;
        Some(self.track(d))
    }

    /// A delivery if one is ready now: a queued event, or the lag notice
    /// once the queue before the gap has been read.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        match self.rx.try_recv() {
            Ok(d) => Some(self.track(d)),
            Err(_) => {
                let missed = self.missed.swap(0, Ordering::AcqRel);
                (missed > 0).then(|| {
                    self.hub.inner.stats.lag_notices.fetch_add(1, Ordering::Relaxed);
                    Delivery::Lagged { missed, last_seq: self.last_seq }
                })
            }
        }
    }

    fn track(&mut self, d: Delivery) -> Delivery {
        if let Delivery::Event(s) = &d {
            self.last_seq = s.event.seq.or(self.last_seq);
        }
        d
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.lock().remove(&self.id);
    }
}

impl Hub {
    /// A hub whose subscribers each queue at most `capacity` deliveries.
    pub fn new(capacity: usize) -> Self {
        Hub {
            inner: Arc::new(Inner {
                subscribers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                capacity: capacity.max(1),
                stats: HubStats::default(),
                position: Mutex::new(Cursor::default()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Subscriber>> {
        // A panic elsewhere while holding the lock leaves the map usable.
        self.inner.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a subscriber.
    pub fn subscribe(&self, filter: Filter) -> Subscription {
        self.subscribe_at(filter).0
    }

    /// Adds a subscriber, and says from where: every event at or below the
    /// position returned was published before it (so a subscriber resuming
    /// from the log needs to remember only what it replays above it).
    pub fn subscribe_at(&self, filter: Filter) -> (Subscription, Cursor) {
        let (tx, rx) = mpsc::channel(self.inner.capacity);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let missed = Arc::new(AtomicU64::new(0));
        let mut subs = self.lock();
        subs.insert(id, Subscriber { filter, tx, missed: missed.clone() });
        let at = self.position();
        drop(subs);
        (Subscription { id, rx, missed, last_seq: None, hub: self.clone() }, at)
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.lock().len()
    }

    /// The resume position of the latest event published.
    pub fn position(&self) -> Cursor {
        *self.inner.position.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This hub's counters.
    pub fn stats(&self) -> &HubStats {
        &self.inner.stats
    }

    /// Hands `event` to every subscriber whose filter it passes, without
    /// waiting; returns how many got it. Its resume position is the last one
    /// given to [`Hub::publish_at`] (the start of the log before any).
    pub fn publish(&self, event: Event) -> usize {
        let at = *self.inner.position.lock().unwrap_or_else(|e| e.into_inner());
        self.publish_at(event, at)
    }

    /// [`Hub::publish`], with the position a subscriber holding this event
    /// may resume from.
    pub fn publish_at(&self, event: Event, position: Cursor) -> usize {
        self.publish_shared(Arc::new(Shared::new(event, position)))
    }

    /// [`Hub::publish_at`] of an event already shared (its position inside).
    pub fn publish_shared(&self, shared: Arc<Shared>) -> usize {
        let position = shared.position;
        let stats = &self.inner.stats;
        stats.events.fetch_add(1, Ordering::Relaxed);
        let mut delivered = 0;
        let mut gone = Vec::new();
        let mut subs = self.lock();
        for (id, sub) in subs.iter_mut() {
            if !sub.filter.matches(&shared) {
                continue;
            }
            // Behind already: nothing more until it has read up to the gap.
            if sub.missed.load(Ordering::Acquire) > 0 {
                sub.missed.fetch_add(1, Ordering::AcqRel);
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match sub.tx.try_send(Delivery::Event(shared.clone())) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.missed.fetch_add(1, Ordering::AcqRel);
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
            }
        }
        for id in gone {
            subs.remove(&id);
        }
        // Moved under the subscribers' lock, after the event went out: a
        // subscription taken with this position has all before it.
        let mut at = self.inner.position.lock().unwrap_or_else(|e| e.into_inner());
        *at = (*at).max(position);
        drop(at);
        stats.deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Feeds the hub from a stream of events with their resume positions
    /// (such as [`Listener::into_positioned`](crate::Listener::into_positioned))
    /// until it ends, or every handle to the hub but this one is gone. A
    /// resync is logged; the stream goes on from the oldest event kept.
    pub async fn run<S>(self, events: S)
    where
        S: futures_util::Stream<Item = crate::Result<(Event, Cursor)>>,
    {
        use futures_util::StreamExt;
        let mut events = std::pin::pin!(events);
        while let Some(item) = events.next().await {
            match item {
                Ok((event, position)) => {
                    self.publish_at(event, position);
                }
                Err(e) => tracing::warn!(error = %e, "hub: the event stream reported an error"),
            }
            if Arc::strong_count(&self.inner) == 1 && self.subscribers() == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: i64, table: &str, op: &str, row: &str) -> Event {
        let text = format!(
            r#"{{"seq":{seq},"txid":1,"kind":"change","channel":"ch","op":"{op}","schema":"public","table":"{table}","key":null,"new":{row},"old":null}}"#
        );
        Event::decode("ch", text).unwrap()
    }

    fn events(sub: &mut Subscription) -> Vec<Delivery> {
        std::iter::from_fn(|| sub.try_recv()).collect()
    }

    #[test]
    fn filters_by_channel_table_op_and_column() {
        let hub = Hub::new(16);
        let mut all = hub.subscribe(Filter::default());
        let mut other = hub.subscribe(Filter::channels(["elsewhere"]));
        let mut orders = hub.subscribe(Filter { table: Some("public.orders".into()), ..Filter::default() });
        let mut inserts = hub.subscribe(Filter { ops: vec![Op::Insert], ..Filter::default() });
        let mut tea =
            hub.subscribe(Filter { columns: vec![("item".into(), serde_json::json!("tea"))], ..Filter::default() });
        hub.publish(change(1, "orders", "INSERT", r#"{"item":"tea"}"#));
        hub.publish(change(2, "users", "UPDATE", r#"{"item":"tea"}"#));
        hub.publish(change(3, "orders", "UPDATE", r#"{"item":"jam"}"#));
        let seqs = |v: Vec<Delivery>| -> Vec<i64> {
            v.into_iter()
                .map(|d| match d {
                    Delivery::Event(s) => s.event.seq.unwrap(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(seqs(events(&mut all)), [1, 2, 3]);
        assert!(events(&mut other).is_empty());
        assert_eq!(seqs(events(&mut orders)), [1, 3]);
        assert_eq!(seqs(events(&mut inserts)), [1]);
        assert_eq!(seqs(events(&mut tea)), [1, 2]);
    }

    #[test]
    fn a_full_queue_drops_for_that_subscriber_only_then_says_so() {
        let hub = Hub::new(2);
        let mut slow = hub.subscribe(Filter::default());
        let mut fast = hub.subscribe(Filter::default());
        for seq in 1..=5 {
            hub.publish(change(seq, "t", "INSERT", "{}"));
            events(&mut fast);
        }
        // slow got 1 and 2, then missed 3, 4, 5: told so right after 2,
        // without waiting for another event.
        match &events(&mut slow)[..] {
            [Delivery::Event(a), Delivery::Event(b), Delivery::Lagged { missed: 3, last_seq: Some(2) }] => {
                assert_eq!((a.event.seq, b.event.seq), (Some(1), Some(2)))
            }
            other => panic!("{other:?}"),
        }
        hub.publish(change(6, "t", "INSERT", "{}"));
        match &events(&mut slow)[..] {
            [Delivery::Event(e)] => assert_eq!(e.event.seq, Some(6)),
            other => panic!("{other:?}"),
        }
        assert_eq!(hub.stats().dropped.load(Ordering::Relaxed), 3);
        assert_eq!(hub.stats().lag_notices.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn one_serialization_shared_by_all() {
        let hub = Hub::new(4);
        let mut a = hub.subscribe(Filter::default());
        let mut b = hub.subscribe(Filter::default());
        hub.publish(change(1, "t", "INSERT", "{}"));
        let (Some(Delivery::Event(x)), Some(Delivery::Event(y))) = (a.try_recv(), b.try_recv()) else { panic!() };
        assert!(Arc::ptr_eq(&x, &y));
        assert!(std::ptr::eq(x.event.json(), y.event.json()));
    }

    #[test]
    fn dropping_a_subscription_unsubscribes() {
        let hub = Hub::new(4);
        let s = hub.subscribe(Filter::default());
        assert_eq!(hub.subscribers(), 1);
        drop(s);
        assert_eq!(hub.subscribers(), 0);
        assert_eq!(hub.publish(change(1, "t", "INSERT", "{}")), 0);
    }
}
