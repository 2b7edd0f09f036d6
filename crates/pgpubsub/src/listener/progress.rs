//! A listener's position: what it has handed over, what the subscriber has
//! handled (it asked for the next item since), and, for a named listener,
//! what is stored in `pubsub.cursors` to resume from after a restart.

use std::time::{Duration, Instant};

use crate::cursor::Cursor;
use crate::error::Result;
use crate::event_log::LogConn;

/// See the module docs.
#[derive(Debug)]
pub(super) struct Progress {
    /// Everything at or below is delivered and handled.
    cursor: Cursor,
    /// Where the cursor moves when the subscriber asks for the next item.
    pending: Option<Cursor>,
    /// The name the cursor is stored under; `None`: never stored.
    name: Option<String>,
    /// What is stored, and when it was.
    saved: Cursor,
    last_saved: Instant,
}

impl Progress {
    /// Starts at `cursor`; `saved` is what is stored under `name` already.
    pub fn new(cursor: Cursor, name: Option<String>, saved: Cursor) -> Progress {
        Progress { cursor, pending: None, name, saved, last_saved: Instant::now() }
    }

    /// The position: everything at or below it is delivered and handled
    /// (counting what was handed over last as handled).
    pub fn cursor(&self) -> Cursor {
        self.pending.map_or(self.cursor, |p| p.max(self.cursor))
    }

    /// What the cursor becomes once the item just handed over is handled.
    pub fn hand_over(&mut self, to: Option<Cursor>) {
        self.pending = to;
    }

    /// Moves the cursor forward (never back) to `to`.
    pub fn advance(&mut self, to: Cursor) {
        if to > self.cursor {
            self.cursor = to;
        }
    }

    /// The subscriber asked for the next item: what it was handed is handled.
    pub fn acknowledge(&mut self) {
        if let Some(p) = self.pending.take() {
            self.advance(p);
        }
    }

    /// Stores the cursor if it moved and `every` has passed since it was
    /// last stored; a failure is logged (and retried next time).
    pub async fn autosave(&mut self, log: &LogConn, every: Duration) {
        if self.name.is_some() && self.cursor > self.saved && self.last_saved.elapsed() >= every {
            if let Err(e) = self.save(log).await {
                tracing::warn!(error = %e, "could not store the cursor; will retry");
            }
        }
    }

    /// Stores the cursor now (nothing without a name, or when it has not
    /// moved).
    ///
    /// # Errors
    /// When the database cannot be written.
    pub async fn save(&mut self, log: &LogConn) -> Result<()> {
        let Some(name) = &self.name else {
            return Ok(());
        };
        if self.cursor == self.saved {
            return Ok(());
        }
        log.save_cursor(name, self.cursor).await?;
        self.saved = self.cursor;
        self.last_saved = Instant::now();
        Ok(())
    }
}
