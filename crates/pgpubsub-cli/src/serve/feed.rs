//! A subscriber's feed in the gateway: the library's [`pgpubsub::Feed`]
//! (replay, then live from the hub), replaying from the log, or from the
//! stream when fed from NATS ([`StreamReplay`]). It ends with the server's
//! shutdown, and keeps its channels LISTENed to while it lives.

use pgpubsub::{Cursor, Filter};

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
}

impl Feed {
    /// Subscribes now; with `since`, first replays what came after it.
    ///
    /// # Errors
    /// Before the hub's first event, when the database cannot say where
    /// "now" is; when the stream cannot be read.
    pub async fn new(state: AppState, filter: Filter, since: Option<Cursor>) -> Result<Feed, ApiError> {
        let shutdown = state.shutdown.clone();
        if let Some(source) = &state.source {
            let stats = state.listener_stats.clone();
            let replay =
                since.map(|s| (s, Box::new(StreamReplay::new(source.clone(), s, &filter.channels, stats)) as _));
            let inner = pgpubsub::Feed::with_replay(&state.hub, filter, replay);
            // From now: the hub begins at the stream's end at start.
            let start = if since.is_none() { nats::position(source.start()) } else { Cursor::default() };
            return Ok(Feed { inner, start, shutdown, _held: None });
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
        Ok(Feed { inner, start, shutdown, _held: Some(held) })
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
        if *self.shutdown.borrow() {
            return Ok(None);
        }
        tokio::select! {
            item = self.inner.next() => item,
            _ = self.shutdown.wait_for(|s| *s) => Ok(None),
        }
    }

    /// The next item if one is ready without waiting.
    pub fn try_next(&mut self) -> Option<Item> {
        self.inner.try_next()
    }
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
