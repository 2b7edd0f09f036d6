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
//! application embedding pgpubsub in its own server can do the same.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::event_log::LogConn;
use crate::hub::{Delivery, Filter, Hub, Shared, Subscription};
use crate::reassembly::Limits;
use crate::stats::Stats;
use crate::tail::{PageLimits, Tail};

/// Rows read from the log per page while catching a subscriber up.
const PAGE_ROWS: i64 = 500;
/// Bytes read from the log per page (past the first event).
const PAGE_BYTES: i64 = 8 << 20;

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
    /// Events the subscriber missed were pruned from the log: it should
    /// reload its state. The feed goes on from the oldest event kept.
    Resync {
        /// Where the subscriber was.
        cursor: Cursor,
        /// Where pruning had reached.
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

/// A subscriber's feed; see the module docs.
pub struct Feed {
    log: Arc<LogConn>,
    filter: Filter,
    sub: Subscription,
    /// Reading the log; `None` once caught up.
    replay: Option<Tail>,
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
        let (sub, subscribed_at) = hub.subscribe_at(filter.clone());
        let channels = (!filter.channels.is_empty()).then(|| filter.channels.clone());
        let page = PageLimits { rows: PAGE_ROWS, bytes: PAGE_BYTES, max_event_bytes: limits.max_event_bytes };
        let replay = since.map(|from| Tail::new(from, channels, page, Arc::new(Stats::default())));
        Feed {
            log,
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
        if let FeedItem::Event { position, .. } = &item {
            self.position = *position;
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
                self.position = self.position.max(shared.position);
                Some(FeedItem::Event { position: self.position, shared })
            }
            Delivery::Lagged { missed, .. } => Some(FeedItem::Lagged { missed, position: self.position }),
        }
    }

    async fn read_page(&mut self) -> Result<()> {
        let Some(tail) = &mut self.replay else { return Ok(()) };
        let from = tail.position();
        let page = match tail.next_page(&self.log).await {
            Ok(page) => page,
            Err(Error::ResyncNeeded { cursor, pruned }) => {
                self.backlog.push_back(FeedItem::Resync { cursor, pruned });
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let caught_up = page.events.is_empty() && !page.more;
        let last = page.events.len().saturating_sub(1);
        let queued = self.backlog.len();
        for (i, event) in page.events.into_iter().enumerate() {
            let at = event.seq.zip(event.txid).map(|(seq, txid)| Cursor { txid, seq });
            let position = if i == last { page.position } else { from.max(self.position) };
            let shared = Arc::new(Shared::new(event, position));
            if at.is_some_and(|c| c > self.subscribed_at) {
                if let Some(seq) = shared.event.seq {
                    self.replayed.insert(seq);
                }
            }
            if self.filter.matches(&shared) {
                self.backlog.push_back(FeedItem::Event { position, shared });
            }
        }
        if self.backlog.len() == queued {
            // Nothing of this page passed the filter: it is handled.
            self.position = self.position.max(page.position);
        }
        if caught_up {
            // The subscription has the rest.
            self.replay = None;
            if let Some(began) = self.replay_began.take() {
                metrics::histogram!(CATCH_UP_METRIC).record(began.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }
}
