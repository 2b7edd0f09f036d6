//! A subscriber's feed in the gateway: the library's [`pgpubsub::Feed`]
//! (replay, then live from the hub), replaying from the log, or from the
//! stream when fed from NATS ([`StreamReplay`]). It ends with the server's
//! shutdown, and keeps its channels LISTENed to while it lives.
//!
//! A token with a `role` claim puts its subscriber in that role's class
//! (`pgpubsub::views`): what the feed hands out, live or replayed, is what
//! the class sees, decided a batch at a time for the whole class.
//!
//! A shape (`super::shape`) first hands out its snapshot's rows and a
//! marker, then the changes from the log that the snapshot does not hold
//! (`pgpubsub::shape::handover`), as the shape shows them; after a resync
//! it reads the snapshot again.

use std::collections::VecDeque;
use std::sync::Arc;

use pgpubsub::shape::{Handover, Position, Seen, Shape, SnapshotPart};
use pgpubsub::views::Class;
use pgpubsub::{Cursor, FeedItem, Filter, LogConn, Viewer};

use super::error::ApiError;
use super::nats::{self, StreamReplay};
use super::shape::Reading;
use super::AppState;

/// What a feed hands out.
#[derive(Debug)]
pub enum Item {
    /// An event, with the position to resume from once it is handled.
    Event { position: Cursor, shared: Arc<pgpubsub::hub::Shared> },
    /// Events are gone (pruned, or never captured); with `snapshot`, a
    /// shape's rows follow again (drop what is held), then `Ready`.
    Resync { cursor: Cursor, pruned: Cursor, snapshot: bool },
    /// The subscriber fell behind: reconnect from `position`.
    Lagged { missed: u64, position: Cursor },
    /// Rows of a shape's snapshot, each a JSON object.
    Rows(Vec<String>),
    /// A shape's snapshot is whole: `rows` were sent; changes follow, and
    /// `id` is where to resume from.
    Ready { id: String, rows: u64 },
}

impl From<FeedItem> for Item {
    fn from(item: FeedItem) -> Item {
        match item {
            FeedItem::Event { position, shared } => Item::Event { position, shared },
            FeedItem::Resync { cursor, pruned } => Item::Resync { cursor, pruned, snapshot: false },
            FeedItem::Lagged { missed, position } => Item::Lagged { missed, position },
        }
    }
}

/// A shape subscription's state.
struct Shaped {
    shape: Arc<Shape>,
    /// Read the snapshot again after a resync.
    snapshot: bool,
    /// Its snapshot being read (the inner feed waits).
    reading: Option<Reading>,
    /// Rows handed out of the snapshot being read.
    rows: u64,
    /// The hand-over from the snapshot, while events may still be in it.
    handover: Option<Handover>,
}

/// A subscriber's feed.
pub struct Feed {
    /// `None` while a shape's snapshot is read.
    inner: Option<pgpubsub::Feed>,
    state: AppState,
    filter: Filter,
    viewer: Option<Viewer>,
    shaped: Option<Shaped>,
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

/// A shape subscription asked for: the shape, and whether to begin with
/// its snapshot.
pub struct ShapeAsk {
    pub shape: Arc<Shape>,
    pub snapshot: bool,
}

impl Feed {
    /// Subscribes now; with `since`, first replays what came after it.
    /// With a shape and its snapshot asked for and no `since`, the
    /// snapshot's rows come first.
    ///
    /// # Errors
    /// Before the hub's first event, when the database cannot say where
    /// "now" is; when the stream cannot be read.
    /// With `viewer`, it hands out what that viewer's class sees; a role
    /// the gateway's role may not become is refused (403).
    pub async fn new(
        state: AppState,
        filter: Filter,
        since: Option<Position>,
        viewer: Option<Viewer>,
        shape: Option<ShapeAsk>,
    ) -> Result<Feed, ApiError> {
        let class = match &viewer {
            Some(viewer) => {
                let (class, log) = (state.views.class(viewer.clone()), state.db.pick());
                class.check(&log).await.map_err(|e| refused(e, class.viewer()))?;
                Some((class, log))
            }
            None => None,
        };
        let (cursor, handover) = since.map(|p| (p.cursor, p.handover)).unzip();
        let shaped = shape.map(|ask| Shaped {
            shape: ask.shape,
            snapshot: ask.snapshot,
            reading: None,
            rows: 0,
            handover: handover.flatten(),
        });
        // The hub skips the rows the class is known not to see.
        let mut filter = filter;
        filter.class = class.as_ref().map(|(c, _)| c.id());
        let mut feed = Feed {
            inner: None,
            state: state.clone(),
            filter: filter.clone(),
            viewer: viewer.clone(),
            shaped,
            start: Cursor::default(),
            shutdown: state.shutdown.clone(),
            _held: None,
            class,
            undecided: Vec::new(),
            ready: VecDeque::new(),
        };
        match &mut feed.shaped {
            Some(s) if s.snapshot && cursor.is_none() => {
                s.reading = Some(state.snapshots.read(&s.shape, viewer).await.map_err(super::shape::refused)?);
            }
            _ => feed.open(cursor).await?,
        }
        Ok(feed)
    }

    /// Opens the inner feed from `since` (or from now).
    async fn open(&mut self, since: Option<Cursor>) -> Result<(), ApiError> {
        let state = &self.state;
        let filter = self.filter.clone();
        if let Some(source) = &state.source {
            let stats = state.listener_stats.clone();
            let replay =
                since.map(|s| (s, Box::new(StreamReplay::new(source.clone(), s, &filter.channels, stats)) as _));
            self.inner = Some(pgpubsub::Feed::with_replay(&state.hub, filter, replay));
            // From now: the hub begins at the stream's end at start.
            self.start = if since.is_none() { nats::position(source.start()) } else { Cursor::default() };
            return Ok(());
        }
        // Until the hub's first event its position is the start of the log,
        // which a subscriber must not be told to resume from. Then it starts
        // before the oldest transaction in progress, as a listener "from now"
        // does: every older one has finished. Taken before subscribing.
        self.start = match since {
            None if state.hub.position() == Cursor::default() => now(state).await?,
            _ => Cursor::default(),
        };
        self._held = Some(state.listening.hold(filter.channels.iter().map(String::as_str)));
        // Resumes from one position share one read of the log (a crowd
        // reconnecting after a restart: docs/performance.md).
        let replay = since.map(|s| (s, state.replays.replay(state.db.pick(), s, &filter.channels)));
        self.inner = Some(pgpubsub::Feed::with_replay(&state.hub, filter, replay));
        Ok(())
    }

    /// Where this subscriber may resume from before it is handed anything;
    /// `None` while a snapshot is read (a drop then reads it again).
    pub fn position(&self) -> Option<Cursor> {
        Some(self.inner.as_ref()?.position().max(self.start))
    }

    /// The id to send with an event handed out at `position` (the
    /// subscriber's) whose own is `own`, when the event's own will not do:
    /// for a shape, an id never behind where the subscriber stands (a
    /// resume from behind its snapshot's start would repeat what the
    /// snapshot held), carrying the hand-over while it is open.
    pub fn id_for(&self, position: Cursor, own: Cursor) -> Option<String> {
        let s = self.shaped.as_ref()?;
        let open = s.handover.as_ref().filter(|h| h.open_at(position));
        (open.is_some() || position != own).then(|| Position::new(position, open).to_string())
    }

    /// A shape's primary-key columns (what its rows are kept by).
    pub fn key(&self) -> &[String] {
        self.shaped.as_ref().map(|s| s.shape.key()).unwrap_or_default()
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
            if let Some(item) = self.snapshot_part().await? {
                return Ok(Some(item));
            }
            let Some(inner) = self.inner.as_mut() else {
                return Err(pgpubsub::Error::ConnectionLost("the shape's snapshot failed: subscribe again".into()));
            };
            let Some((class, log)) = self.class.clone() else {
                let item = tokio::select! {
                    item = inner.next() => item?,
                    _ = self.shutdown.wait_for(|s| *s) => None,
                };
                let Some(item) = item else { return Ok(None) };
                if let Some(item) = self.shape_item(item.into(), None).await? {
                    return Ok(Some(item));
                }
                continue;
            };
            if self.undecided.is_empty() {
                let first = tokio::select! {
                    item = inner.next() => item?,
                    _ = self.shutdown.wait_for(|s| *s) => None,
                };
                let Some(first) = first else { return Ok(None) };
                self.undecided.push(first.into());
                while self.undecided.len() < BATCH {
                    let Some(item) = inner.try_next() else { break };
                    self.undecided.push(item.into());
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
            let mut decided = Vec::new();
            for item in self.undecided.drain(..) {
                match item {
                    Item::Event { position, shared } => {
                        // `seen` keeps the order of `events`: this event's
                        // answer is next, if the class sees it.
                        if let Some(s) =
                            seen.next_if(|s| s.event.seq == shared.event.seq && s.position == shared.position)
                        {
                            decided.push((Item::Event { position, shared: s }, Some(shared)));
                        }
                    }
                    other => decided.push((other, None)),
                }
            }
            for (item, original) in decided {
                if let Some(item) = self.shape_item(item, original.as_deref()).await? {
                    self.ready.push_back(item);
                }
            }
        }
    }

    /// The next part of a snapshot being read, as an item; `None` when no
    /// snapshot is read. When it is whole, the changes begin after it.
    async fn snapshot_part(&mut self) -> Result<Option<Item>, pgpubsub::Error> {
        let Some(s) = self.shaped.as_mut() else { return Ok(None) };
        let Some(reading) = s.reading.as_mut() else { return Ok(None) };
        let part = tokio::select! {
            part = reading.parts.next() => part,
            _ = self.shutdown.wait_for(|s| *s) => return Ok(None),
        };
        match part {
            Some(Ok(SnapshotPart::Rows(rows))) => {
                s.rows += rows.len() as u64;
                Ok(Some(Item::Rows(rows)))
            }
            Some(Ok(SnapshotPart::Done { rows, handover })) => {
                s.reading = None;
                let start = handover.start();
                let id = Position::new(start, Some(&handover)).to_string();
                s.handover = Some(handover);
                self.inner = None;
                self.undecided.clear();
                self.open(Some(start)).await.map_err(|e| pgpubsub::Error::ConnectionLost(e.message().to_string()))?;
                Ok(Some(Item::Ready { id, rows }))
            }
            Some(Err(e)) => {
                s.reading = None;
                Err(e.into())
            }
            None => {
                s.reading = None;
                Err(pgpubsub::Error::ConnectionLost("the snapshot ended early".into()))
            }
        }
    }

    /// `item` as the shape shows it (the hand-over skips what its snapshot
    /// held); `None` when it is not for the subscriber. `original`: the
    /// event before row-level authorization rewrote it. A resync of a shape
    /// with a snapshot starts reading it again.
    async fn shape_item(
        &mut self,
        item: Item,
        original: Option<&pgpubsub::hub::Shared>,
    ) -> Result<Option<Item>, pgpubsub::Error> {
        let Some(s) = self.shaped.as_mut() else { return Ok(Some(item)) };
        match item {
            Item::Event { position, shared } => {
                if let Some(h) = &s.handover {
                    if h.covers(&shared.event) {
                        return Ok(None);
                    }
                    if !h.open_at(position) {
                        s.handover = None;
                    }
                }
                let seen = match original {
                    Some(o) => s.shape.see_under(&o.event, &shared.event),
                    None => s.shape.see(&shared.event),
                };
                Ok(match seen {
                    Seen::Hidden => None,
                    Seen::Same => Some(Item::Event { position, shared }),
                    Seen::As(event) => {
                        let shared = Arc::new(pgpubsub::hub::Shared::new(*event, shared.position));
                        Some(Item::Event { position, shared })
                    }
                })
            }
            Item::Resync { cursor, pruned, .. } if s.snapshot => {
                s.handover = None;
                s.rows = 0;
                self.inner = None;
                self._held = None;
                let reading = self.state.snapshots.read(&s.shape, self.viewer.clone()).await?;
                s.reading = Some(reading);
                Ok(Some(Item::Resync { cursor, pruned, snapshot: true }))
            }
            other => Ok(Some(other)),
        }
    }

    /// The next item if one is ready without waiting.
    pub fn try_next(&mut self) -> Option<Item> {
        if self.class.is_some() || self.shaped.is_some() {
            return self.ready.pop_front();
        }
        self.inner.as_mut()?.try_next().map(Item::from)
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
