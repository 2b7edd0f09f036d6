//! The delivery engine: from a position, read the log page by page, every
//! committed event once, never skipping one that commits late.
//!
//! Sequence values are handed out before commit, so the log does not grow
//! in order: seq 100 may commit after seq 101 was read. A scan position
//! alone would skip it. The tail therefore keeps two things:
//! - `scan`: every event at or below this (txid, seq) has been read, except
//!   those of
//! - `open`: the transactions that were still in progress, below `scan`, when
//!   the last page was read (from that page's own snapshot), each with the
//!   last seq already read of it.
//!
//! Each page reads what follows `scan`, plus whatever the `open`
//! transactions have added, in one statement whose snapshot also says which
//! transactions are still open. A transaction that committed is read whole
//! and leaves `open`; one that aborted just leaves it. Nothing outside
//! `scan` and `open` can still add an event below `scan`: every event's
//! transaction has its txid before its seq (the SQL side makes sure), so a
//! transaction that was not in progress at the snapshot and is below `scan`
//! had finished.
//!
//! The commit-safe [`position`](Tail::position) (what a subscriber stores to
//! resume from) is `scan`, held back to the oldest open transaction: resuming
//! from it repeats at most the events read since that transaction began,
//! never skips one. Within a page, events are handed over in seq order
//! (statement order: a row updated by two transactions arrives in the order
//! of the updates); pages follow each other in commit order.
//!
//! Whatever reads the log reads through this, events the capturer copied
//! there from the WAL included: the [`Listener`](crate::Listener) (so
//! `listen`, `serve` fed from PostgreSQL, and the NATS bridge), and a
//! gateway [`Feed`](crate::Feed) resuming from the log. Not through it: a
//! feed resuming from the NATS stream (its own [`Replay`](crate::Replay)).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::event_log::{LogConn, Unreadable};
use crate::stats::Stats;

/// How much one page reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PageLimits {
    /// Most events per page.
    pub rows: i64,
    /// Most bytes stored per page, past its first event.
    pub bytes: i64,
    /// Events whose JSON is larger are skipped (counted in `oversize`).
    pub max_event_bytes: u64,
}

/// One page: events to hand over in order, then the position they lead to.
#[derive(Debug, Default)]
pub(crate) struct Page {
    /// The events, in seq order.
    pub events: Vec<Event>,
    /// Where a subscriber stands once it has handled every event of the page.
    pub position: Cursor,
    /// The page was full: read the next one without waiting.
    pub more: bool,
}

/// A reader of the log from a position; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Tail {
    /// Channels read; `None`: all.
    channels: Option<Vec<String>>,
    scan: Cursor,
    /// txid → last seq read of it (0: none).
    open: BTreeMap<u64, i64>,
    limits: PageLimits,
    stats: Arc<Stats>,
}

impl Tail {
    /// A tail that delivers every event after `from` (a commit-safe position,
    /// as [`Tail::position`] gives).
    pub fn new(from: Cursor, channels: Option<Vec<String>>, limits: PageLimits, stats: Arc<Stats>) -> Tail {
        Tail { channels, scan: from, open: BTreeMap::new(), limits, stats }
    }

    /// A tail that delivers every event that commits from now on.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub async fn from_now(
        log: &LogConn,
        channels: Option<Vec<String>>,
        limits: PageLimits,
        stats: Arc<Stats>,
    ) -> Result<Tail> {
        let (xmax, in_progress) = log.now().await?;
        let mut tail = Tail::new(Cursor::before_txid(xmax), channels, limits, stats);
        tail.open = in_progress.into_iter().filter(|&t| t < xmax).map(|t| (t, 0)).collect();
        Ok(tail)
    }

    /// The commit-safe position: every event at or below it has been read,
    /// and none can still appear there.
    pub fn position(&self) -> Cursor {
        match self.open.iter().next() {
            Some((&txid, &seq)) => self.scan.min(Cursor { txid, seq }),
            None => self.scan,
        }
    }

    /// The channels read (`None`: all).
    pub fn channels(&self) -> Option<&[String]> {
        self.channels.as_deref()
    }

    /// Reads `channel` too, from the next page on.
    pub fn add_channel(&mut self, channel: &str) {
        if let Some(list) = &mut self.channels {
            if !list.iter().any(|c| c == channel) {
                list.push(channel.to_string());
            }
        }
    }

    /// Stops reading `channel`.
    pub fn remove_channel(&mut self, channel: &str) {
        if let Some(list) = &mut self.channels {
            list.retain(|c| c != channel);
        }
    }

    /// Reads the next page.
    ///
    /// # Errors
    /// [`Error::ResyncNeeded`] when retention removed events this tail had
    /// not read (it then goes on from the oldest kept); [`Error::NotMigrated`]
    /// without the schema; connection and statement errors (the tail is
    /// unchanged: call again).
    pub async fn next_page(&mut self, log: &LogConn) -> Result<Page> {
        let open: Vec<(u64, i64)> = self.open.iter().map(|(&t, &s)| (t, s)).collect();
        let l = self.limits;
        let poll =
            log.poll(self.channels.as_deref(), self.scan, &open, l.rows, l.bytes, l.max_event_bytes as i64).await?;
        let before = self.position();
        if poll.pruned > before {
            Stats::bump(&self.stats.resyncs);
            tracing::warn!(cursor = %before, pruned = %poll.pruned, "events not yet read were pruned from the log");
            self.scan = poll.pruned;
            self.open.clear();
            return Err(Error::ResyncNeeded { cursor: before, pruned: poll.pruned });
        }
        let mut last_in_range = None;
        let mut events = Vec::with_capacity(poll.rows.len());
        for row in poll.rows {
            if row.cursor > self.scan {
                last_in_range = Some(row.cursor);
            } else if let Some(read) = self.open.get_mut(&row.cursor.txid) {
                *read = (*read).max(row.cursor.seq);
            }
            match row.event {
                Ok(e) => events.push(e),
                Err(Unreadable::TooLarge(bytes)) => {
                    Stats::bump(&self.stats.oversize);
                    tracing::warn!(seq = row.cursor.seq, bytes, "logged event over max_event_bytes; skipped");
                }
                Err(Unreadable::NotAnEvent) => {
                    Stats::bump(&self.stats.not_json);
                    tracing::warn!(seq = row.cursor.seq, channel = row.channel, "logged row is not an event; skipped");
                }
            }
        }
        // Unless the page ended among the open transactions' rows, it read
        // every row they had: the snapshot's in-progress list is the new
        // open set.
        if !poll.more || last_in_range.is_some() {
            let scan = last_in_range.unwrap_or(self.scan);
            let old_scan = self.scan;
            let read = std::mem::take(&mut self.open);
            self.open = poll
                .in_progress
                .into_iter()
                .filter(|&t| t < scan.txid)
                .map(|t| {
                    let seq = read.get(&t).copied().unwrap_or(if t == old_scan.txid { old_scan.seq } else { 0 });
                    (t, seq)
                })
                .collect();
            self.scan = scan;
        }
        events.sort_by_key(|e| e.seq);
        Ok(Page { events, position: self.position(), more: poll.more })
    }
}
