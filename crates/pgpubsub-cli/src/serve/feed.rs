//! A subscriber's feed in the gateway: the library's [`pgpubsub::Feed`]
//! (replay, then live from the hub), replaying from the log, or from the
//! stream when fed from NATS ([`StreamReplay`]). It ends with the server's
//! shutdown, and keeps its channels LISTENed to while it lives.
//!
//! A token with a `role` claim puts its subscriber in that role's class
//! (`pgpubsub::views`): what the feed hands out, live or replayed, is what
//! the class sees, decided a batch at a time for the whole class.

use std::collections::VecDeque;
use std::sync::Arc;

use pgpubsub::views::Class;
use pgpubsub::{Cursor, Filter, LogConn, Viewer};

pub use pgpubsub::FeedItem as Item;

use super::error::ApiError;
use super::nats::{self, StreamReplay};
use super::AppState;

/// A subscriber's feed.
pub struct Feed {
    inner: pgpubsub::Feed,
    /// Where this subscriber stood when it subscribed.
    start: Cursor,
    /// The server's shutdown: the feed ends when it turns true.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Keeps its channels LISTENed to while it lives.
    _held: Option<super::listening::Held>,
    /// Row-level authorization: the class it sees as, and where it asks.
    class: Option<(Arc<Class>, Arc<LogConn>)>,
    /// Items taken from `inner` and not yet decided for the class.
    undecided: Vec<Item>,
    /// Items decided, to hand out.
    ready: VecDeque<Item>,
}

/// The most items decided in one statement for one subscriber's batch.
const BATCH: usize = 256;

impl Feed {
    /// Subscribes now; with `since`, first replays what came after it.
    ///
    /// # Errors
    /// Before the hub's first event, when the database cannot say where
    /// "now" is; when the stream cannot be read.
    /// With `viewer`, it hands out what that viewer's class sees; a role
    /// the gateway's role may not become is refused (403).
    pub async fn new(
        state: AppState,
        filter: Filter,
        since: Option<Cursor>,
        viewer: Option<Viewer>,
    ) -> Result<Feed, ApiError> {
        let class = match viewer {
            Some(viewer) => {
                let (class, log) = (state.views.class(viewer), state.db.pick());
                class.check(&log).await.map_err(|e| refused(e, class.viewer()))?;
                Some((class, log))
            }
            None => None,
        };
        let mut feed = Feed::unauthorized(state, filter, since).await?;
        feed.class = class;
        Ok(feed)
    }

    async fn unauthorized(state: AppState, filter: Filter, since: Option<Cursor>) -> Result<Feed, ApiError> {
        let shutdown = state.shutdown.clone();
        if let Some(source) = &state.source {
            let stats = state.listener_stats.clone();
            let replay =
                since.map(|s| (s, Box::new(StreamReplay::new(source.clone(), s, &filter.channels, stats)) as _));
            let inner = pgpubsub::Feed::with_replay(&state.hub, filter, replay);
            // From now: the hub begins at the stream's end at start.
            let start = if since.is_none() { nats::position(source.start()) } else { Cursor::default() };
            return Ok(Feed::of(inner, start, shutdown, None));
        }
        // Until the hub's first event its position is the start of the log,
        // which a subscriber must not be told to resume from. Then it starts
        // before the oldest transaction in progress, as a listener "from now"
        // does: every older one has finished. Taken before subscribing.
        let start = match since {
            None if state.hub.position() == Cursor::default() => now(&state).await?,
            _ => Cursor::default(),
        };
        let held = state.listening.hold(filter.channels.iter().map(String::as_str));
        // Resumes from one position share one read of the log (a crowd
        // reconnecting after a restart: docs/performance.md).
        let replay = since.map(|s| (s, state.replays.replay(state.db.pick(), s, &filter.channels)));
        let inner = pgpubsub::Feed::with_replay(&state.hub, filter, replay);
        Ok(Feed::of(inner, start, shutdown, Some(held)))
    }

    fn of(
        inner: pgpubsub::Feed,
        start: Cursor,
        shutdown: tokio::sync::watch::Receiver<bool>,
        held: Option<super::listening::Held>,
    ) -> Feed {
        let (class, undecided, ready) = (None, Vec::new(), VecDeque::new());
        Feed { inner, start, shutdown, _held: held, class, undecided, ready }
    }

    /// Where this subscriber may resume from before it is handed anything.
    pub fn position(&self) -> Cursor {
        self.inner.position().max(self.start)
    }

    /// The next item; `None` when the server is shutting down. Cancel-safe.
    ///
    /// # Errors
    /// When the log or stream cannot be read (the subscriber should retry
    /// later).
    pub async fn next(&mut self) -> Result<Option<Item>, pgpubsub::Error> {
        loop {
            if *self.shutdown.borrow() {
                return Ok(None);
            }
            if let Some(item) = self.ready.pop_front() {
                return Ok(Some(item));
            }
            let Some((class, log)) = self.class.clone() else {
                return tokio::select! {
                    item = self.inner.next() => item,
                    _ = self.shutdown.wait_for(|s| *s) => Ok(None),
                };
            };
            if self.undecided.is_empty() {
                let first = tokio::select! {
                    item = self.inner.next() => item?,
                    _ = self.shutdown.wait_for(|s| *s) => None,
                };
                let Some(first) = first else { return Ok(None) };
                self.undecided.push(first);
                while self.undecided.len() < BATCH {
                    let Some(item) = self.inner.try_next() else { break };
                    self.undecided.push(item);
                }
            }
            // Kept in `undecided` until decided: a dropped call loses nothing.
            let events: Vec<_> = self
                .undecided
                .iter()
                .filter_map(|i| match i {
                    Item::Event { shared, .. } => Some(shared.clone()),
                    _ => None,
                })
                .collect();
            let seen = tokio::select! {
                seen = class.see(&log, &events) => seen?,
                _ = self.shutdown.wait_for(|s| *s) => return Ok(None),
            };
            let mut seen = seen.into_iter().peekable();
            for item in self.undecided.drain(..) {
                match item {
                    Item::Event { position, shared } => {
                        // `seen` keeps the order of `events`: this event's
                        // answer is next, if the class sees it.
                        if let Some(s) =
                            seen.next_if(|s| s.event.seq == shared.event.seq && s.position == shared.position)
                        {
                            self.ready.push_back(Item::Event { position, shared: s });
                        }
                    }
                    other => self.ready.push_back(other),
                }
            }
        }
    }

    /// The next item if one is ready without waiting.
    pub fn try_next(&mut self) -> Option<Item> {
        if self.class.is_some() {
            return self.ready.pop_front();
        }
        self.inner.try_next()
    }
}

/// A class that cannot be decided, as the subscriber's answer.
fn refused(e: pgpubsub::Error, viewer: &Viewer) -> ApiError {
    let role = viewer.role.as_deref().unwrap_or_default();
    if pgpubsub::views::refused(&e) {
        return ApiError::Forbidden(format!(
            "the token's role {role:?} cannot be taken by the gateway's database role (GRANT {role} TO <the gateway's role>; docs/delivery.md, \"Row-level authorization\")"
        ));
    }
    ApiError::from(e)
}

/// The position "from now": before the oldest transaction in progress.
async fn now(state: &AppState) -> Result<Cursor, pgpubsub::Error> {
    let log = state.db.pick();
    let xmin: String = log
        .run("reading the snapshot", |c| async move {
            let row = c.query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[]).await?;
            Ok::<_, tokio_postgres::Error>(row.get(0))
        })
        .await?;
    Ok(Cursor::before_txid(xmin.parse().unwrap_or(0)))
}
