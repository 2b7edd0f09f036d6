//! pgpubsub: PostgreSQL `LISTEN`/`NOTIFY` as a typed, lossless pub/sub.
//!
//! Row changes (captured by a trigger that `pubsub.watch` attaches) and
//! published messages are written to an event log and notified on a channel,
//! whole, in chunks, or by reference when large. A [`Listener`] receives
//! them on one connection and yields typed [`Event`]s.
//!
//! The modules, in the order data flows through them:
//! - [`migrate`]: the `pubsub` schema (log, encoder, trigger, store) as
//!   embedded dbmate migrations;
//! - [`publish`]: `watch`/`unwatch` a table, `publish` a message;
//! - [`store`]: the event-sourced snapshot + history store;
//! - [`retention`]: pruning the log by age or count;
//! - [`channel`]: channel names, validated and quoted in one place;
//! - [`listener`]: a subscriber's stream: live events, and catch-up from the
//!   log after any gap, from a commit-safe [`cursor`];
//! - [`wire`]: what one notification payload is (see docs/protocol.md);
//! - [`reassembly`]: chunks back into events, within fixed bounds;
//! - [`event`]: the typed event handed to subscribers;
//! - [`hub`]: one listener fanned out to many subscribers, each with a
//!   filter and a bounded queue;
//! - [`log`]: reading the event log back (catch-up, references, cursors);
//! - [`stats`]: counters of all the above; [`db`]: connecting; [`error`].
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

pub mod channel;
pub mod cursor;
pub mod db;
pub mod error;
pub mod event;
pub mod hub;
pub mod listener;
pub mod log;
pub mod migrate;
pub mod publish;
pub mod reassembly;
pub mod retention;
mod session;
pub mod stats;
pub mod store;
mod tls;
pub mod wire;

pub use channel::Channel;
pub use cursor::Cursor;
pub use error::{Error, Result};
pub use event::{Body, Change, Event, Message, Op};
pub use hub::{Delivery, Filter, Hub, Subscription, Transport};
pub use listener::{ConnectionState, Listener, ListenerOptions};
pub use publish::{publish, unwatch, watch};
pub use reassembly::Limits;
pub use stats::{Stats, StatsSnapshot};
