//! A subscriber's feed in the gateway: the library's [`pgpubsub::Feed`]
//! (replay from the log, then live from the hub), ended by the server's
//! shutdown.

use pgpubsub::{Cursor, Filter, Limits};

pub use pgpubsub::FeedItem as Item;

use super::AppState;

/// A subscriber's feed.
pub struct Feed {
    inner: pgpubsub::Feed,
    /// The server's shutdown: the feed ends when it turns true.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Feed {
    /// Subscribes now; with `since`, first replays what came after it.
    ///
    /// # Errors
    /// Never today; kept fallible for feeds that must check something first.
    pub async fn new(state: AppState, filter: Filter, since: Option<Cursor>) -> Result<Feed, pgpubsub::Error> {
        let limits = Limits { max_event_bytes: state.max_event_bytes as u64, ..Limits::default() };
        let inner = pgpubsub::Feed::new(state.log.clone(), &state.hub, filter, since, &limits);
        Ok(Feed { inner, shutdown: state.shutdown.clone() })
    }

    /// The next item; `None` when the server is shutting down. Cancel-safe.
    ///
    /// # Errors
    /// When the log cannot be read (the subscriber should retry later).
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
