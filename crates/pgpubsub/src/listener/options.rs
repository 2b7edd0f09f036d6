//! How a listener behaves ([`ListenerOptions`]) and what state its
//! listening connection is in ([`ConnectionState`]): what the listener and
//! its reading task both read.

use std::time::Duration;

use crate::reassembly::Limits;
use crate::tail::PageLimits;

/// How a listener behaves. Every field has a default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ListenerOptions {
    /// Bounds on event sizes and on reassembly of seed-format chunks.
    pub limits: Limits,
    /// Foreign notifications queued for the subscriber; past this they are
    /// dropped (counted: they are not in the log).
    pub buffer: usize,
    /// A name to store the cursor under (`pubsub.cursors`), so a restarted
    /// listener resumes where it stopped. `None`: start from now.
    pub name: Option<String>,
    /// Where to start when no cursor is stored under `name`: after this
    /// position (a shape's [`Handover::start`](crate::shape::Handover::start),
    /// a position saved by the application). `None`: from now.
    pub since: Option<crate::cursor::Cursor>,
    /// How often the listening connection is proved alive, and the longest a
    /// waiting listener sleeps without reading the log.
    pub heartbeat: Duration,
    /// A heartbeat not back within this marks the connection deaf: replaced.
    /// Also the limit for connecting and for each log statement.
    pub deaf_after: Duration,
    /// First reconnect delay; doubles per failure up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Warn when `pg_notification_queue_usage()` reaches this (0 to 1).
    pub queue_warn: f64,
    /// Most events read from the log per page.
    pub page_rows: i64,
    /// Most bytes of events read per page (past the first event).
    pub page_bytes: i64,
    /// First pause before reading again while writers are in flight;
    /// doubles up to `poll_max` while reads find nothing.
    pub poll_min: Duration,
    /// Longest such pause.
    pub poll_max: Duration,
    /// After a page that was not full, the next read starts no sooner than
    /// this after the last one began: under a steady stream of small
    /// commits, reads then carry several events each instead of one, which
    /// leaves the database's CPU to the writers. Adds at most this much
    /// latency; zero reads again at once.
    pub linger: Duration,
    /// Store a named listener's cursor by itself (at most once per
    /// heartbeat) as events are acknowledged. Turn off to call
    /// [`Listener::save`](super::Listener::save) at points of your own, such as after a flush.
    pub autosave: bool,
    /// Row-level authorization ([`crate::views`]): hand over row changes
    /// as the reading role may see them under the tables' own policies and
    /// column privileges (entering, leaving, deletes with the old row),
    /// and nothing it may not see. On by default; off for a reader that
    /// reads on behalf of others and decides for each of them itself (the
    /// gateway, the bridge).
    pub row_views: bool,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            limits: Limits::default(),
            buffer: 4096,
            name: None,
            since: None,
            heartbeat: Duration::from_secs(1),
            deaf_after: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            queue_warn: 0.5,
            page_rows: 1000,
            page_bytes: 16 << 20,
            poll_min: Duration::from_micros(500),
            poll_max: Duration::from_millis(20),
            linger: Duration::from_millis(2),
            autosave: true,
            row_views: true,
        }
    }
}

impl ListenerOptions {
    /// Sets the size and reassembly bounds.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the foreign-notification buffer (at least 1).
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.max(1);
        self
    }

    /// Starts after `position` unless a cursor is stored under the name
    /// ([`ListenerOptions::since`]).
    pub fn since(mut self, position: crate::cursor::Cursor) -> Self {
        self.since = Some(position);
        self
    }

    /// Makes the listener durable under `name`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the heartbeat period and the deaf limit.
    pub fn heartbeat(mut self, every: Duration, deaf_after: Duration) -> Self {
        self.heartbeat = every;
        self.deaf_after = deaf_after.max(every);
        self
    }

    /// Turns row-level authorization by the reading role on or off (see
    /// [`ListenerOptions::row_views`]).
    pub fn row_views(mut self, on: bool) -> Self {
        self.row_views = on;
        self
    }

    /// How much one read of the log takes.
    pub(super) fn page_limits(&self) -> PageLimits {
        PageLimits { rows: self.page_rows.max(1), bytes: self.page_bytes, max_event_bytes: self.limits.max_event_bytes }
    }
}

/// The state of the listening connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected, LISTENing, heartbeats coming back.
    Listening,
    /// Lost; trying again (`attempt` failures so far).
    Reconnecting {
        /// Failed attempts since the connection was lost.
        attempt: u32,
        /// Why the last attempt (or the connection) failed.
        error: String,
    },
}
