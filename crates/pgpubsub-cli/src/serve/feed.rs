//! One subscriber's feed: what it missed, read from the log, then live
//! events from the hub, without a gap between the two.
//!
//! The hub subscription is taken first, so live events queue while the log
//! is read. An event read from the log can come again live only if its
//! transaction was still open when the subscription was taken (its txid is
//! at least the xmin taken just before): only those are remembered, by seq,
//! and skipped when they come again, so the memory is bounded by what
//! committed during the catch-up. Every item carries a resume position: resuming from
//! it may repeat a few events (delivery is at least once; `seq` identifies
//! duplicates) but never skips one.

use std::collections::HashSet;
use std::sync::Arc;

use pgpubsub::hub::Shared;
use pgpubsub::{Cursor, Delivery, Filter, Subscription};

use super::AppState;

/// Rows read from the log per query while catching a subscriber up.
const PAGE_ROWS: i64 = 500;
/// Bytes read from the log per query (past the first event).
const PAGE_BYTES: i64 = 8 << 20;

/// What a feed yields.
pub enum Item {
    /// An event, with the position to resume from once it is handled.
    Event { position: Cursor, shared: Arc<Shared> },
    /// Events the subscriber missed were pruned from the log.
    Resync { cursor: Cursor, pruned: Cursor },
    /// The subscriber fell behind: `missed` events were dropped; it should
    /// reconnect and resume from `position`.
    Lagged { missed: u64, position: Cursor },
}

/// A subscriber's feed.
pub struct Feed {
    state: AppState,
    filter: Filter,
    channels: Vec<String>,
    sub: Subscription,
    /// Where the log is to be read from next; `None` once caught up.
    replay_from: Option<Cursor>,
    backlog: std::collections::VecDeque<Item>,
    replayed: HashSet<i64>,
    /// The position of the last item handed out.
    position: Cursor,
    checked_retention: bool,
    /// xmin taken before subscribing: older transactions were all finished,
    /// so their events cannot also arrive live.
    subscribed_xmin: u64,
    /// The server's shutdown: the feed ends when it turns true.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Feed {
    /// Subscribes now; with `since`, first replays what came after it.
    ///
    /// # Errors
    /// When resuming and the log cannot be read.
    pub async fn new(state: AppState, filter: Filter, since: Option<Cursor>) -> Result<Feed, pgpubsub::Error> {
        let subscribed_xmin = match since {
            Some(_) => state.log.xmin().await?,
            None => 0,
        };
        let channels = if filter.channels.is_empty() {
            state.channels.iter().map(|c| c.as_str().to_string()).collect()
        } else {
            filter.channels.clone()
        };
        let sub = state.hub.subscribe(filter.clone());
        let shutdown = state.shutdown.clone();
        let position = since.unwrap_or_else(|| state.hub.position());
        Ok(Feed {
            state,
            filter,
            channels,
            sub,
            replay_from: since,
            backlog: Default::default(),
            replayed: HashSet::new(),
            position,
            checked_retention: false,
            subscribed_xmin,
            shutdown,
        })
    }

    /// The next item; `None` when the server is shutting down.
    ///
    /// Cancel-safe: every await comes before the state it changes, so a
    /// dropped call loses nothing (the next call starts over).
    ///
    /// # Errors
    /// When the log cannot be read (the subscriber should retry later).
    pub async fn next(&mut self) -> Result<Option<Item>, pgpubsub::Error> {
        loop {
            if *self.shutdown.borrow() {
                return Ok(None);
            }
            if let Some(item) = self.pop_backlog() {
                return Ok(Some(item));
            }
            if let Some(from) = self.replay_from {
                self.read_page(from).await?;
                continue;
            }
            let delivery = tokio::select! {
                d = self.sub.recv() => d,
                _ = self.shutdown.wait_for(|s| *s) => return Ok(None),
            };
            match delivery {
                None => return Ok(None),
                Some(d) => {
                    if let Some(item) = self.on_delivery(d) {
                        return Ok(Some(item));
                    }
                }
            }
        }
    }

    /// The next item if one is ready without waiting (never during a
    /// catch-up from the log).
    pub fn try_next(&mut self) -> Option<Item> {
        if let Some(item) = self.pop_backlog() {
            return Some(item);
        }
        if self.replay_from.is_some() {
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
    fn pop_backlog(&mut self) -> Option<Item> {
        let item = self.backlog.pop_front()?;
        if let Item::Event { position, .. } = &item {
            self.position = *position;
        }
        Some(item)
    }

    /// A live delivery as an item; `None` for an event already replayed from
    /// the log.
    fn on_delivery(&mut self, d: Delivery) -> Option<Item> {
        match d {
            Delivery::Event(shared) => {
                if shared.event.seq.is_some_and(|s| self.replayed.remove(&s)) {
                    return None;
                }
                self.position = self.position.max(shared.position);
                Some(Item::Event { position: self.position, shared })
            }
            Delivery::Lagged { missed, .. } => Some(Item::Lagged { missed, position: self.position }),
            _ => None,
        }
    }

    async fn read_page(&mut self, from: Cursor) -> Result<(), pgpubsub::Error> {
        if !self.checked_retention {
            // Marked only once answered: this may be cancelled mid-query.
            let pruned = self.state.log.pruned().await?;
            self.checked_retention = true;
            if pruned > from {
                self.backlog.push_back(Item::Resync { cursor: from, pruned });
                self.replay_from = Some(pruned);
                return Ok(());
            }
        }
        let xmin = self.state.log.xmin().await?;
        let rows = self
            .state
            .log
            .catch_up(&self.channels, from, PAGE_ROWS, PAGE_BYTES, self.state.max_event_bytes as i64)
            .await?;
        let more = rows.first().is_some_and(|r| r.page_rows >= PAGE_ROWS || (rows.len() as i64) < r.page_rows);
        let mut last = from;
        // The position moves with final events only (older than any running
        // transaction); past the first non-final one it stays.
        let mut safe = Some(self.position.max(from));
        for row in rows {
            last = row.cursor;
            safe = safe.filter(|_| row.cursor.txid < xmin).map(|_| row.cursor);
            let Ok(event) = row.event else { continue };
            let position = safe.unwrap_or(self.position);
            let shared = Arc::new(Shared::new(event, position));
            if !self.filter.matches(&shared) {
                continue;
            }
            if let (Some(seq), true) = (shared.event.seq, row.cursor.txid >= self.subscribed_xmin) {
                self.replayed.insert(seq);
            }
            self.backlog.push_back(Item::Event { position, shared });
        }
        self.replay_from = more.then_some(last);
        Ok(())
    }
}
