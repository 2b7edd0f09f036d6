//! One streaming session of a capturer: read the slot's messages, gather
//! them into batches, append, confirm.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio_postgres::{Client, Statement};

use super::batch::Batch;
use super::{slots, CaptureOptions, CaptureStats, Ended};
use crate::error::{Error, Result};
use crate::event::WalPosition;
use crate::stats::Stats;
use crate::wal::{self, Decoder, Txn};

/// One streaming session's state.
pub(super) struct Session<'a> {
    o: &'a CaptureOptions,
    slot: &'a str,
    stats: &'a CaptureStats,
    side: Client,
    /// `side`'s prepared append.
    append: Statement,
    stream: ReplicationClient,
    decoder: Decoder,
    batch: Batch,
    /// The last event in the log: what the stream sends again up to it is skipped.
    appended: Option<WalPosition>,
    /// The transaction being read.
    txn: Option<Txn>,
    /// The end of the last transaction read whole: confirmed to the server
    /// once everything read before it is in the log.
    confirm: Option<Lsn>,
    /// Commit time of the newest event in the batch (µs since 2000).
    newest_commit_us: i64,
    /// Since when something read is owed to the log: it is appended once
    /// this is `linger` old (or the batch is full), whatever keeps coming.
    owed_since: Option<tokio::time::Instant>,
    /// When the last append began: the next begins no sooner than `linger`
    /// after it, so a lone change is appended at once, and a stream of
    /// them in batches at most one `linger` apart.
    last_flush: Option<tokio::time::Instant>,
    last_health: Option<Instant>,
    warned: bool,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        o: &'a CaptureOptions,
        slot: &'a str,
        stats: &'a CaptureStats,
        (side, append): (Client, Statement),
        stream: ReplicationClient,
        decoder: Decoder,
        appended: Option<WalPosition>,
    ) -> Self {
        Session {
            o,
            slot,
            stats,
            side,
            append,
            stream,
            decoder,
            batch: Batch::default(),
            appended,
            txn: None,
            confirm: None,
            newest_commit_us: 0,
            owed_since: None,
            last_flush: None,
            last_health: None,
            warned: false,
        }
    }

    /// Ends the stream (the server lets the slot go once it has).
    pub(super) async fn close(mut self) {
        if tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await.is_err() {
            self.stream.abort();
        }
    }

    /// Whether something read is not yet in the log (or the map not stored).
    fn owed(&self) -> bool {
        !self.batch.is_empty() || self.confirm.is_some() || self.decoder.map_dirty()
    }

    pub(super) async fn go(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Result<Ended> {
        // No message at all (the server sends keepalives) for `idle_timeout`
        // means the connection is dead, however the loop turns meanwhile.
        let mut heard = tokio::time::Instant::now();
        loop {
            if self.last_health.is_none_or(|t| t.elapsed() >= self.o.health_interval) {
                self.health().await;
            }
            let silent_until = heard + self.o.idle_timeout;
            let next = if self.owed() {
                match self.ready().await {
                    Some(r) => r,
                    None => {
                        self.flush().await?;
                        continue;
                    }
                }
            } else {
                let health_at = tokio::time::Instant::now() + self.o.health_interval;
                tokio::select! {
                    r = self.stream.recv() => r,
                    () = tokio::time::sleep_until(silent_until) => {
                        return Err(Error::ConnectionLost(format!("no message from the server within {:?}", self.o.idle_timeout)));
                    }
                    () = tokio::time::sleep_until(health_at) => continue,
                    _ = stop.wait_for(|s| *s) => return Ok(Ended::Stopped),
                }
            };
            heard = tokio::time::Instant::now();
            match next {
                Ok(Some(event)) => self.handle(event).await?,
                Ok(None) => return Err(Error::ConnectionLost("the server ended the replication stream".into())),
                Err(e) => return Err(wal::wal_error("reading the replication stream", e)),
            }
            if self.batch.events.len() >= self.o.batch_rows || self.batch.bytes >= self.o.batch_bytes {
                self.flush().await?;
            }
            if *stop.borrow() && self.txn.is_none() {
                self.flush().await?;
                return Ok(Ended::Stopped);
            }
        }
    }

    /// The next message, if it comes before it is time to append: once what
    /// is owed is `linger` old, or, between transactions, once `linger` has
    /// passed since the last append began (at once after a quiet spell:
    /// only the messages already here are taken first).
    async fn ready(&mut self) -> Option<pgwire_replication::Result<Option<ReplicationEvent>>> {
        let now = tokio::time::Instant::now();
        let due = *self.owed_since.get_or_insert(now) + self.o.linger;
        let at = match (self.txn, self.last_flush) {
            (None, Some(last)) => due.min(last + self.o.linger),
            (None, None) => now,
            (Some(_), _) => due,
        };
        tokio::time::timeout_at(at, self.stream.recv()).await.ok()
    }

    async fn handle(&mut self, event: ReplicationEvent) -> Result<()> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                self.txn = Some(Txn { lsn: final_lsn.as_u64(), xid, time_us: commit_time_micros, next_index: 0 });
            }
            ReplicationEvent::XLogData { data, .. } => {
                // A table described anew: learn the shapes of its column
                // types first (arrays, composites, domains render nested).
                // Asked again each time: a composite type may have changed
                // since (ALTER TYPE), and the stream describes a table anew
                // after its definition changes.
                if let Ok(crate::wal::pgoutput::Msg::Relation(rel)) = crate::wal::pgoutput::parse(&data) {
                    let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
                    self.decoder.types.forget(&oids);
                    let learn = self.decoder.types.learn(&self.side, oids);
                    super::within(self.o.statement_timeout, learn).await?;
                }
                let Some(txn) = self.txn else {
                    // Outside a transaction only relations are learnt.
                    let idle = Txn { lsn: 0, xid: 0, time_us: 0, next_index: 0 };
                    self.decoder.message(&self.stats.malformed, &idle, &data, &mut Vec::new());
                    return Ok(());
                };
                let mut out = Vec::new();
                let rows = self.decoder.message(&self.stats.malformed, &txn, &data, &mut out);
                if let Some(t) = self.txn.as_mut() {
                    t.next_index += rows;
                }
                for e in out {
                    if self.appended.is_some_and(|a| e.at <= a) {
                        Stats::bump(&self.stats.skipped);
                        continue;
                    }
                    self.newest_commit_us = txn.time_us;
                    self.batch.push(e);
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } if self.txn.take().is_some() => {
                Stats::bump(&self.stats.transactions);
                self.confirm = Some(end_lsn);
                if self.batch.is_empty() && !self.decoder.map_dirty() {
                    // Nothing of it to append: confirmed as it is.
                    self.stream.update_applied_lsn(end_lsn);
                    self.confirm = None;
                }
            }
            // Nothing in flight: everything the server decoded before
            // wal_end is in the log, so the slot may move past WAL that held
            // none of our tables (else it would keep it forever).
            ReplicationEvent::KeepAlive { wal_end, .. }
                if !self.owed() && self.txn.is_none() && wal_end.as_u64() > 0 =>
            {
                self.stream.update_applied_lsn(wal_end);
            }
            _ => {}
        }
        Ok(())
    }

    /// Appends what was read (and the channel map, if it changed), then
    /// confirms the transactions read whole.
    async fn flush(&mut self) -> Result<()> {
        self.owed_since = None;
        let map = self.decoder.take_map_change();
        if !self.batch.is_empty() || map.is_some() {
            self.last_flush = Some(tokio::time::Instant::now());
            let last = self.batch.events.last().map(|e| e.at);
            let new =
                self.batch.append(&self.side, &self.append, self.slot, map.as_ref(), self.o.statement_timeout).await?;
            Stats::bump(&self.stats.batches);
            self.stats.events.fetch_add(new, Ordering::Relaxed);
            if let Some(at) = last {
                self.appended = Some(at);
                set(&self.stats.lag_us, lag_us(self.newest_commit_us));
            }
        }
        if let Some(end) = self.confirm.take() {
            self.stream.update_applied_lsn(end);
        }
        Ok(())
    }

    /// Measures the slot's retained WAL; warns past the threshold.
    async fn health(&mut self) {
        self.last_health = Some(Instant::now());
        let Ok(Ok(all)) = tokio::time::timeout(self.o.statement_timeout, slots(&self.side)).await else { return };
        let Some(me) = all.iter().find(|s| s.name == self.slot) else { return };
        set(&self.stats.retained_bytes, me.retained_bytes);
        if me.retained_bytes > self.o.retained_warn_bytes && !self.warned {
            tracing::warn!(slot = %self.slot, retained_bytes = me.retained_bytes, safe_wal_bytes = ?me.safe_wal_bytes,
                "the replication slot keeps more WAL than expected: is the capturer keeping up? \
                 (set max_slot_wal_keep_size so a stalled capturer cannot fill the disk)");
            self.warned = true;
        } else if me.retained_bytes <= self.o.retained_warn_bytes / 2 {
            self.warned = false;
        }
    }
}

pub(super) fn set(gauge: &AtomicU64, value: u64) {
    gauge.store(value, Ordering::Relaxed);
}

/// Microseconds from a commit time (µs since 2000-01-01) to now.
fn lag_us(commit_us: i64) -> u64 {
    let epoch_us = i128::from(wal::PG_EPOCH) * 1_000_000;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros();
    (now as i128 - epoch_us - i128::from(commit_us)).max(0) as u64
}
