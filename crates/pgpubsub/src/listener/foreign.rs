//! Foreign notifications on their way from the reading task to the
//! listener: seed-format parts put back together, each message decided at
//! the end of its batch, and everything handed over in the order it was
//! sent.
//!
//! A batch is what was read from the socket together, which holds all of
//! one transaction's notifications: Postgres queues them together at the
//! commit and sends them together. So at the end of the batch its `EOF` came
//! in, a seed message has every part its sender wrote with that `EOF`, in
//! whatever order they came; deciding at the `EOF` instead would cut off the
//! parts sent after it. The foreign notifications that came after an `EOF`
//! wait for its message, so that the order the sender chose holds.
//!
//! The limit: a batch ends when the socket has nothing more to read at once,
//! and Postgres sends a long batch in 8 kB writes, so a transaction of many
//! notifications may be read in two. A message whose parts came in a later
//! batch than its `EOF` is then released only when its parts prove it whole
//! (docs/protocol.md); it is never released with its parts in the wrong
//! order, and never truncated except in the two arrangements named there.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::event::Event;
use crate::reassembly::{Limits, Reassembler};
use crate::stats::Stats;

/// Notifications held for the end of a batch, at most; past it the batch
/// is ended early (a transaction of more notifications than this may then
/// have its seed messages decided before all their parts are in).
const HELD_MAX: usize = 4096;

/// A foreign notification waiting for the end of its batch.
enum Held {
    /// A whole payload, behind a seed message still to be decided.
    Text { channel: Box<str>, text: String },
    /// A seed-format message to decide, in the place of its `EOF` (or of the
    /// first new part after it).
    Seed { channel: Box<str>, id: Box<str> },
}

/// Foreign notifications of one listener, from the socket to the listener.
pub(crate) struct Foreign {
    reassembler: Reassembler,
    /// What waits for the end of this batch, in arrival order; empty unless
    /// a seed message is due. At most [`HELD_MAX`].
    held: Vec<Held>,
    /// To the listener; full means the subscriber is behind.
    out: mpsc::Sender<Event>,
    stats: Arc<Stats>,
    max_event_bytes: u64,
}

impl Foreign {
    pub fn new(limits: Limits, stats: Arc<Stats>, out: mpsc::Sender<Event>) -> Self {
        let max_event_bytes = limits.max_event_bytes;
        Foreign { reassembler: Reassembler::new(limits, stats.clone()), held: Vec::new(), out, stats, max_event_bytes }
    }

    /// Resolves once the listener is gone.
    pub async fn closed(&self) {
        self.out.closed().await;
    }

    /// A whole payload: handed over now, or behind a due seed message.
    pub fn text(&mut self, channel: &str, text: &str) {
        if self.held.is_empty() {
            self.hand_over(channel, text.to_string());
        } else {
            self.hold(Held::Text { channel: channel.into(), text: text.to_string() });
        }
    }

    /// A seed-format part (`<id><counter>:<data>`).
    pub fn seed_part(&mut self, channel: &str, id: &str, counter: u64, data: &str) {
        if self.reassembler.push_seed_part(channel, id, counter, data, Instant::now()) {
            self.hold(Held::Seed { channel: channel.into(), id: id.into() });
        }
    }

    /// A seed-format end (`<id>EOF`).
    pub fn seed_eof(&mut self, channel: &str, id: &str) {
        if self.reassembler.push_seed_eof(channel, id, Instant::now()) {
            self.hold(Held::Seed { channel: channel.into(), id: id.into() });
        }
    }

    /// The end of what arrived together: decides the due seed messages and
    /// hands over what waited, in arrival order.
    pub fn end_batch(&mut self) {
        for held in std::mem::take(&mut self.held) {
            match held {
                Held::Text { channel, text } => self.hand_over(&channel, text),
                Held::Seed { channel, id } => {
                    if let Some(text) = self.reassembler.settle_seed(&channel, &id) {
                        self.hand_over(&channel, text);
                    }
                }
            }
        }
    }

    /// The connection is gone: incomplete seed messages are dropped
    /// (counted), and what waited behind them is handed over.
    pub fn connection_lost(&mut self) {
        self.reassembler.clear();
        self.end_batch();
        self.reassembler.take_losses();
    }

    /// Drops seed messages older than `max_age` (counted, warned).
    pub fn expire(&mut self) {
        self.reassembler.expire(Instant::now());
        self.reassembler.take_losses();
    }

    fn hold(&mut self, held: Held) {
        self.held.push(held);
        if self.held.len() >= HELD_MAX {
            self.end_batch();
        }
    }

    /// Passes a foreign notification to the listener, unless it is over
    /// `max_event_bytes` or the listener is behind (counted, warned).
    fn hand_over(&mut self, channel: &str, text: String) {
        if text.len() as u64 > self.max_event_bytes {
            Stats::bump(&self.stats.oversize);
            tracing::warn!(channel, bytes = text.len(), "foreign notification over max_event_bytes; skipped");
            return;
        }
        match self.out.try_send(Event::foreign(channel, text)) {
            Ok(()) => Stats::bump(&self.stats.foreign),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Stats::bump(&self.stats.foreign_dropped);
                tracing::warn!(channel, "subscriber is behind: foreign notification dropped (not in the log)");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}
