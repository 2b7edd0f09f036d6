//! pgpubsub: PostgreSQL `LISTEN`/`NOTIFY` as a typed, lossless pub/sub.
//!
//! Row changes (captured by a trigger that `pubsub.watch` attaches, or from
//! the WAL by the [`capture`] process for tables watched with
//! `pubsub.watch_wal`) and published messages are written to an event log; a NOTIFY only wakes a
//! waiting reader and carries no data. A [`Listener`] reads the log with its
//! own privileges and yields typed [`Event`]s, none lost, none forged.
//!
//! The modules, in the order data flows through them:
//! - [`db`]: connection strings (with libpq's TLS parameters) and opening
//!   every connection pgpubsub makes;
//! - [`migrate`]: the `pubsub` schema (the log, the capture trigger, the
//!   store) as embedded dbmate migrations;
//! - [`channel`]: channel names, validated and quoted in one place;
//! - [`watch`](mod@watch): `watch`/`unwatch` a table, `publish` a message:
//!   what writes the log; [`store`]: the event-sourced snapshot + history
//!   store, which writes it too;
//! - [`retention`]: pruning the log by age or count;
//! - [`shape`]: what a subscriber wants of a table: a filter over its
//!   columns, as a SQL predicate and evaluated on each event's row;
//! - `event_log`: reading the log back through a [`LogConn`]: pages, the
//!   wake lock, durable cursors, stored events rendered as JSON;
//! - `tail`: the one delivery engine, from a commit-safe [`cursor`] through
//!   the log, never skipping a late commit;
//! - [`listener`]: a subscriber's stream of typed [`event`]s: pages of the
//!   `tail`, a LISTEN connection for wake-ups, heartbeats and foreign
//!   notifications ([`wire`] frames, seed chunks put back together by
//!   [`reassembly`]), and the subscriber's cursor, stored if named;
//! - [`hub`]: one stream fanned out to many subscribers, each with a filter
//!   and a bounded queue; [`feed`]: one subscriber's resume from the log
//!   (or from another copy of it, a [`Replay`]), then live from the hub,
//!   without a gap; [`SharedReplays`]: many resumes from one position
//!   sharing one read of the log (a crowd reconnecting at once);
//! - [`capture`]: the other way in: one capturer per database reads the
//!   tables watched with `pubsub.watch_wal` from a logical replication slot
//!   (`wal`: the stream and its pgoutput messages) and appends their events
//!   to the same log, exactly once; writers run no trigger;
//! - [`stats`]: counters of all the above; [`backoff`]: the one reconnect
//!   backoff; [`error`]: the one error type.
//!
//! ```no_run
//! # async fn demo() -> pgpubsub::Result<()> {
//! use pgpubsub::{Channel, Listener, ListenerOptions};
//! let config = pgpubsub::db::parse_config("postgres://postgres@127.0.0.1/postgres")?;
//! let mut listener = Listener::connect(&config, &[Channel::new("orders")?], ListenerOptions::default()).await?;
//! while let Some(event) = listener.recv().await {
//!     println!("{}", event?.json());
//! }
//! # Ok(()) }
//! ```

pub mod backoff;
pub mod capture;
pub mod channel;
pub mod cursor;
pub mod db;
pub mod error;
pub mod event;
mod event_log;
pub mod feed;
pub mod hub;
pub mod listener;
pub mod migrate;
pub mod reassembly;
mod replay;
pub mod retention;
pub mod shape;
pub mod stats;
pub mod store;
mod tail;
pub mod views;
mod wal;
pub mod watch;
pub mod wire;

pub use backoff::Backoff;
pub use capture::{CaptureOptions, Capturer};
pub use channel::Channel;
pub use cursor::Cursor;
pub use error::{Error, Result};
pub use event::{Body, Change, Event, Message, Op, Resync, View, WalPosition};
pub use event_log::{LogConn, StatementError};
pub use feed::{Feed, FeedItem, Replay, ReplayPage, Replayed};
pub use hub::{Delivery, Filter, Hub, Subscription};
pub use listener::{ConnectionState, Listener, ListenerOptions};
pub use reassembly::Limits;
pub use replay::SharedReplays;
pub use stats::{Stats, StatsSnapshot};
pub use views::{Viewer, Views};
pub use watch::{publish, unwatch, watch};

/// The README's example (the crate's page), compiled by `cargo test --doc`
/// so that it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Not part of the API: how a stored event renders to JSON, public only so
/// the decode benchmark (`benches/decode.rs`) and the property tests
/// (`tests/props.rs`), which build outside the crate, can measure and check
/// it. Anything here may change in any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::event_log::{json_string, Logged, Unreadable};
}
