//! One subscriber's feed: what it missed, read from the log, then live
//! events from a [`Hub`], without a gap between the two and without
//! repeating what the replay already gave.
//!
//! The hub subscription is taken first, together with the hub's position
//! (every event at or below it was published before the subscription), so
//! live events queue while the log is read. An event read from the log can
//! come again live only if it lies above that position: only those are
//! remembered, by seq, and skipped when they come again. Every item carries
//! a resume position: resuming from it may repeat a few events (`seq`
//! identifies them) but never skips one.
//!
//! This is how the gateway resumes a browser from `Last-Event-ID`, and how an
//! application embedding pgpubsub in its own server can do the same. What is
//! replayed comes from the log ([`Feed::new`]) or from any other copy of it
//! in the same order that implements [`Replay`] ([`Feed::with_replay`]: the
//! gateway fed from a NATS stream).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::event::Body;
use crate::event_log::LogConn;
use crate::hub::{Delivery, Filter, Hub, Shared, Subscription};
use crate::reassembly::Limits;
use crate::stats::Stats;
use crate::tail::{PageLimits, Tail};

/// Rows read from the log per page while catching a subscriber up.
pub(crate) const PAGE_ROWS: i64 = 500;
/// Bytes read from the log per page (past the first event).
pub(crate) const PAGE_BYTES: i64 = 8 << 20;

/// The histogram (through the `metrics` facade; an application installs the
/// exporter) of how long resuming subscribers took to read the log up to the
/// live events, in seconds.
pub const CATCH_UP_METRIC: &str = "pgpubsub_catch_up_seconds";

/// What a feed yields.
#[derive(Debug)]
pub enum FeedItem {
    /// An event, with the position to resume from once it is handled.
    Event {
        /// Where to resume from once this event is handled.
        position: Cursor,
        /// The event, shared with every other subscriber.
        shared: Arc<Shared>,
    },
    /// Events the subscriber missed are not in the log: they were pruned
    /// (the feed goes on from the oldest event kept), or never captured (a
    /// [`Body::Resync`] event: capture from the WAL lost
    /// its slot). It should reload its state.
    Resync {
        /// Where the subscriber was.
        cursor: Cursor,
        /// Where the gap ends: resume from here.
        pruned: Cursor,
    },
    /// The subscriber fell behind: `missed` live events were dropped; it
    /// should reconnect and resume from `position`.
    Lagged {
        /// Events dropped.
        missed: u64,
        /// Where to resume from.
        position: Cursor,
    },
}

/// An event as a feed item: a gap in capture (a [`Body::Resync`] event in
/// the log) is handed over as [`FeedItem::Resync`], the way every consumer
/// already handles a gap, ending where the event stands.
fn item(before: Cursor, position: Cursor, shared: Arc<Shared>) -> FeedItem {
    if matches!(shared.event.body, Body::Resync(_)) {
        return FeedItem::Resync { cursor: before, pruned: position };
    }
    FeedItem::Event { position, shared }
}

/// Where a resuming [`Feed`] reads what its subscriber missed, page by page,
/// in the order the hub delivers live events.
///
/// `next_page` must be cancel-safe, as [`Feed::next`] is: a call dropped at
/// an await must leave the replay where it was.
pub trait Replay: Send {
    /// The next page. `live_from` is the hub's position when the feed
    /// subscribed: every event above it also comes live.
    fn next_page(&mut self, live_from: Cursor) -> Pin<Box<dyn Future<Output = Result<ReplayPage>> + Send + '_>>;
}

/// One page of a [`Replay`].
#[derive(Debug, Default)]
pub struct ReplayPage {
    /// The events read, in order.
    pub events: Vec<Replayed>,
    /// Where the page leaves its reader once every event of it is handled.
    pub position: Cursor,
    /// Caught up: the hub has everything after this page.
    pub caught_up: bool,
    /// Events before this page are gone (pruned, expired): where the
    /// subscriber was, and where they are gone up to.
    pub gone: Option<(Cursor, Cursor)>,
}

/// An event read by a [`Replay`].
#[derive(Debug)]
pub struct Replayed {
    /// The event, wrapped for sharing, with the position a subscriber
    /// stands at once it handled it (the feed keeps positions from going
    /// back). Replays that serve many feeds at once hand each the same
    /// `Arc`, so each event is rendered once for all of them.
    pub shared: Arc<Shared>,
    /// It also comes live (it lies above `live_from`): skipped when it does.
    pub comes_live: bool,
}

/// The log as a [`Replay`].
struct LogReplay {
    log: Arc<LogConn>,
    tail: Tail,
}

impl Replay for LogReplay {
    fn next_page(&mut self, live_from: Cursor) -> Pin<Box<dyn Future<Output = Result<ReplayPage>> + Send + '_>> {
        Box::pin(async move {
            let from = self.tail.position();
            let page = match self.tail.next_page(&self.log).await {
                Ok(page) => page,
                Err(Error::ResyncNeeded { cursor, pruned }) => {
                    return Ok(ReplayPage { gone: Some((cursor, pruned)), ..ReplayPage::default() });
                }
                Err(e) => return Err(e),
            };
            let caught_up = page.events.is_empty() && !page.more;
            let last = page.events.len().saturating_sub(1);
            let events = page
                .events
                .into_iter()
                .enumerate()
                .map(|(i, event)| {
                    let at = event.seq.zip(event.txid).map(|(seq, txid)| Cursor { txid, seq });
                    // Only the page's end is final: a late commit may still
                    // land below an event inside it.
                    let position = if i == last { page.position } else { from };
                    Replayed {
                        comes_live: at.is_some_and(|c| c > live_from),
                        shared: Arc::new(Shared::new(event, position)),
                    }
                })
                .collect();
            Ok(ReplayPage { events, position: page.position, caught_up, gone: None })
        })
    }
}

/// A subscriber's feed; see the module docs.
pub struct Feed {
    filter: Filter,
    sub: Subscription,
    /// Reading what was missed; `None` once caught up.
    replay: Option<Box<dyn Replay>>,
    backlog: VecDeque<FeedItem>,
    /// Seqs replayed above the hub's position at subscription.
    replayed: HashSet<i64>,
    /// The hub's position when the subscription was taken.
    subscribed_at: Cursor,
    /// The position of the last item handed out.
    position: Cursor,
    /// When the catch-up from the log began, until it ends.
    replay_began: Option<std::time::Instant>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").field("filter", &self.filter).field("position", &self.position).finish_non_exhaustive()
    }
}

impl Feed {
    /// Subscribes to `hub` now; with `since`, first replays from the log
    /// what came after it, read through `log` (a statement connection of the
    /// subscriber's privileges).
    pub fn new(log: Arc<LogConn>, hub: &Hub, filter: Filter, since: Option<Cursor>, limits: &Limits) -> Feed {
        let channels = (!filter.channels.is_empty()).then(|| filter.channels.clone());
        let page = PageLimits { rows: PAGE_ROWS, bytes: PAGE_BYTES, max_event_bytes: limits.max_event_bytes };
        let replay = since.map(|from| {
            let tail = Tail::new(from, channels, page, Arc::new(Stats::default()));
            Box::new(LogReplay { log, tail }) as Box<dyn Replay>
        });
        Feed::with_replay(hub, filter, since.zip(replay))
    }

    /// Subscribes to `hub` now; with `since`, first replays what came after
    /// it from `replay` (which reads from that position on).
    pub fn with_replay(hub: &Hub, filter: Filter, since: Option<(Cursor, Box<dyn Replay>)>) -> Feed {
        let (sub, subscribed_at) = hub.subscribe_at(filter.clone());
        let (since, replay) = since.unzip();
        Feed {
            filter,
            sub,
            replay,
            backlog: VecDeque::new(),
            replayed: HashSet::new(),
            subscribed_at,
            position: since.unwrap_or(subscribed_at),
            replay_began: since.map(|_| std::time::Instant::now()),
        }
    }

    /// The position of the last item handed out.
    pub fn position(&self) -> Cursor {
        self.position
    }

    /// The next item; `None` when the hub is gone.
    ///
    /// Cancel-safe: every await comes before the state it changes, so a
    /// dropped call loses nothing (the next call starts over).
    ///
    /// # Errors
    /// When the log cannot be read (the subscriber should retry later).
    pub async fn next(&mut self) -> Result<Option<FeedItem>> {
        loop {
            if let Some(item) = self.pop_backlog() {
                return Ok(Some(item));
            }
            if self.replay.is_some() {
                self.read_page().await?;
                continue;
            }
            let Some(d) = self.sub.recv().await else { return Ok(None) };
            if let Some(item) = self.on_delivery(d) {
                return Ok(Some(item));
            }
        }
    }

    /// The next item if one is ready without waiting (never during a
    /// catch-up from the log).
    pub fn try_next(&mut self) -> Option<FeedItem> {
        if let Some(item) = self.pop_backlog() {
            return Some(item);
        }
        if self.replay.is_some() {
            return None;
        }
        loop {
            let d = self.sub.try_recv()?;
            if let Some(item) = self.on_delivery(d) {
                return Some(item);
            }
        }
    }

    /// The next item read from the log, if any, moving the position with it.
    fn pop_backlog(&mut self) -> Option<FeedItem> {
        let item = self.backlog.pop_front()?;
        match &item {
            FeedItem::Event { position, .. } => self.position = *position,
            FeedItem::Resync { pruned, .. } => self.position = self.position.max(*pruned),
            FeedItem::Lagged { .. } => {}
        }
        Some(item)
    }

    /// A live delivery as an item; `None` for an event already replayed.
    fn on_delivery(&mut self, d: Delivery) -> Option<FeedItem> {
        match d {
            Delivery::Event(shared) => {
                if !self.replayed.is_empty() && shared.event.seq.is_some_and(|s| self.replayed.remove(&s)) {
                    return None;
                }
                let before = self.position;
                self.position = self.position.max(shared.position);
                Some(item(before, self.position, shared))
            }
            Delivery::Lagged { missed, .. } => Some(FeedItem::Lagged { missed, position: self.position }),
        }
    }

    async fn read_page(&mut self) -> Result<()> {
        let Some(replay) = &mut self.replay else { return Ok(()) };
        let page = replay.next_page(self.subscribed_at).await?;
        if let Some((cursor, pruned)) = page.gone {
            // What lies before `pruned` is gone: the subscriber stands there
            // now (set, not raised: a position of another source's kind
            // would otherwise stay).
            self.position = pruned;
            self.backlog.push_back(FeedItem::Resync { cursor, pruned });
        }
        let queued = self.backlog.len();
        let mut before = self.position;
        for Replayed { shared, comes_live } in page.events {
            // Never behind where the subscriber stands already.
            let shared = match shared.position < self.position {
                true => Arc::new(Shared::new(shared.event.clone(), self.position)),
                false => shared,
            };
            let position = shared.position;
            if comes_live {
                if let Some(seq) = shared.event.seq {
                    self.replayed.insert(seq);
                }
            }
            if self.filter.matches(&shared) {
                self.backlog.push_back(item(before, position, shared));
                before = position;
            }
        }
        if self.backlog.len() == queued {
            // Nothing of this page passed the filter: it is handled.
            self.position = self.position.max(page.position);
        }
        if page.caught_up {
            // The subscription has the rest.
            self.replay = None;
            if let Some(began) = self.replay_began.take() {
                metrics::histogram!(CATCH_UP_METRIC).record(began.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }
}
