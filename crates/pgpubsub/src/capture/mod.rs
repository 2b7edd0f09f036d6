//! The capturer: the WAL as a way into the log. One per database reads the
//! tables watched with `pubsub.watch_wal` (and `pubsub.wal_messages`) from
//! a logical replication slot and appends their events to `pubsub.events`
//! in batches, in commit order, exactly once. Writers run no trigger; every
//! reader reads the log as it reads trigger-captured events, with no
//! `REPLICATION` attribute (docs/delivery.md, "Capture from the WAL").
//!
//! - **Exactly once.** A batch is appended by one call of
//!   `pubsub.capture_append`, which stores, in the same transaction, the
//!   place (commit LSN, index) of the last event appended, and drops every
//!   event at or before the place stored. The slot is confirmed to the
//!   server only after that commit. Killed at any moment, a capturer
//!   re-reads from the slot what was not confirmed (at most what arrived in
//!   one `status_interval`, plus the transaction in progress) and appends
//!   none of it twice.
//! - **One active per database.** The slot streams to one session at a
//!   time: a second capturer stands by, trying again every
//!   `standby_poll`, and takes over when the first is gone.
//! - **Events keep their source.** A captured event's `txid` (with `seq`)
//!   is its place in the log, as for every logged event; `source_txid` is
//!   the transaction that made the change (xid8), `lsn` and `index` its
//!   place in the WAL, `time` its commit time.
//! - **Channels as they were.** The channel of a change is the one its
//!   table had when it committed: changes of `pubsub.wal_watches` are read
//!   in the stream, and the map is stored with the position.
//! - **Slot safety.** The WAL the slot keeps is measured every
//!   `health_interval` ([`CaptureStats`], [`slots`]) and a warning is
//!   logged past `retained_warn_bytes`. When the server has invalidated the
//!   slot (`max_slot_wal_keep_size`), the capturer says so, drops and
//!   re-creates it, and records a `resync` event on every WAL-watched
//!   channel: readers learn of the gap in the log, never silently.

mod batch;
mod slot;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio_postgres::Client;

use self::batch::Batch;
pub use self::slot::{drop_idle, slots, SlotInfo};
use crate::db::Config;
use crate::error::{Error, Result};
use crate::event::WalPosition;
use crate::stats::Stats;
use crate::wal::{self, Decoder, SlotError, Txn};

/// How a [`Capturer`] works. The defaults suit most; see each field.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CaptureOptions {
    /// Names the slot: `pgpubsub_capture_<name>`; `None`: `pgpubsub_capture`.
    /// Slots are per cluster: two databases of one cluster need two names.
    pub name: Option<String>,
    /// Most events per append (default 2,000)...
    pub batch_rows: usize,
    /// ...and most bytes (default 8 MiB): a capturer catching up confirms
    /// (and, killed, re-reads) at most this much at a time.
    pub batch_bytes: usize,
    /// The longest a change read waits to be appended (default 5 ms): what
    /// arrives meanwhile goes in the same append, so concurrent writers
    /// share appends (and the database's work per event falls), at up to
    /// this much latency.
    pub linger: Duration,
    /// How often the confirmed position is sent to the server (default 250 ms).
    pub status_interval: Duration,
    /// A standby tries to take the slot this often (default 1 s).
    pub standby_poll: Duration,
    /// How often the slot's retained WAL is measured (default 5 s).
    pub health_interval: Duration,
    /// Warn when the slot keeps more WAL than this (default 1 GiB).
    pub retained_warn_bytes: u64,
    /// No message from the server (not even a keepalive) for this long
    /// means the connection is dead (default 75 s: the server sends a
    /// keepalive every `wal_sender_timeout / 2`, 30 s by default).
    pub idle_timeout: Duration,
    /// Longest an append may take before its connection is presumed dead.
    pub statement_timeout: Duration,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            name: None,
            batch_rows: 2000,
            batch_bytes: 8 << 20,
            linger: Duration::from_millis(5),
            status_interval: Duration::from_millis(250),
            standby_poll: Duration::from_secs(1),
            health_interval: Duration::from_secs(5),
            retained_warn_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(75),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

impl CaptureOptions {
    /// The defaults, with the slot named after `name`.
    pub fn named(name: Option<String>) -> Self {
        CaptureOptions { name, ..CaptureOptions::default() }
    }
}

macro_rules! capture_stats {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters and gauges of a capturer (relaxed atomics, for
        /// reporting: `/metrics`, the load report).
        #[derive(Debug, Default)]
        pub struct CaptureStats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A copy of [`CaptureStats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct CaptureSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl CaptureStats {
            /// Reads every counter.
            pub fn snapshot(&self) -> CaptureSnapshot {
                CaptureSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

capture_stats! {
    /// Events appended to the log.
    events,
    /// Appends (one transaction each).
    batches,
    /// Source transactions read whole.
    transactions,
    /// Events read again after a restart and not appended twice.
    skipped,
    /// WAL messages that did not parse.
    malformed,
    /// Sessions replaced after a failure.
    reconnects,
    /// Slots re-created after the server invalidated them (each a resync in the log).
    resets,
    /// Gauge: 1 while this capturer holds the slot, 0 standing by.
    active,
    /// Gauge: bytes of WAL the slot keeps, at the last measure.
    retained_bytes,
    /// Gauge: commit-to-append lag of the last batch's newest event, in microseconds.
    lag_us,
    /// CPU time this process spent, at the last measure, in microseconds (Linux only).
    cpu_us,
}

/// A capturer; see the [module](self) documentation.
pub struct Capturer {
    config: Config,
    options: CaptureOptions,
    slot: String,
    stats: Arc<CaptureStats>,
}

/// How one session ended.
enum Ended {
    Stopped,
    /// Try again now (the slot was re-created).
    Again,
    /// Another capturer holds the slot.
    Standby(String),
}

impl Capturer {
    /// A capturer of the database `config` names.
    ///
    /// # Errors
    /// [`Error::Config`] when the name cannot name a slot.
    pub fn new(config: &Config, options: CaptureOptions) -> Result<Capturer> {
        let slot = wal::slot_name(options.name.as_deref())?;
        Ok(Capturer { config: config.clone(), options, slot, stats: Arc::default() })
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<CaptureStats> {
        self.stats.clone()
    }

    /// The replication slot it streams.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Captures until `stop` resolves: stands by while another capturer
    /// holds the slot, reconnects after failures. The first session must
    /// start (or find the slot in use): a server that cannot decode, or a
    /// role without `REPLICATION`, is an error at once.
    ///
    /// # Errors
    /// [`Error::Wal`] (with a hint) when the first session cannot start;
    /// [`Error::NotMigrated`] without the schema.
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut session = std::pin::pin!(self.sessions(stop_rx));
        let mut stop = std::pin::pin!(stop);
        tokio::select! {
            r = &mut session => return r,
            () = &mut stop => {}
        }
        // Finish what is in hand (append and confirm), then return.
        let _ = stop_tx.send(true);
        session.await
    }

    async fn sessions(&self, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
        let mut started = false;
        let mut standing_by: Option<String> = None;
        let mut delay = Duration::from_millis(100);
        loop {
            let ended = self.session(&mut stop).await;
            // A session that streamed: from now on failures are retried.
            started |= self.stats.active.swap(0, Ordering::Relaxed) == 1;
            match ended {
                Ok(Ended::Stopped) => return Ok(()),
                Ok(Ended::Again) => continue,
                Ok(Ended::Standby(why)) => {
                    started = true;
                    if standing_by.as_deref() != Some(why.as_str()) {
                        tracing::info!(slot = %self.slot, holder = %why, "standby: another capturer streams the slot; waiting to take over");
                        standing_by = Some(why);
                    }
                    delay = self.options.standby_poll;
                }
                Err(e @ (Error::NotMigrated | Error::Config(_))) => return Err(e),
                Err(e) if !started => return Err(e),
                Err(e) => {
                    Stats::bump(&self.stats.reconnects);
                    tracing::warn!(error = %e, slot = %self.slot, "capture session ended; starting again");
                    standing_by = None;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            delay =
                if standing_by.is_some() { self.options.standby_poll } else { (delay * 2).min(Duration::from_secs(5)) };
        }
    }

    /// One session: a statement connection and the slot's stream, from the
    /// stored state, until stopped or something fails.
    async fn session(&self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Result<Ended> {
        let o = &self.options;
        let side = crate::db::connect(&self.config).await?;
        let state = batch::state(&side, &self.slot).await.map_err(not_migrated)?;
        let stream = match wal::open(&self.config, &self.slot, o.status_interval).await {
            Ok(s) => s,
            Err(SlotError::InUse(e)) => return Ok(Ended::Standby(e.to_string())),
            Err(SlotError::Failed(e)) => {
                if slot::invalidated(&side, &self.slot).await.unwrap_or(false) {
                    tracing::error!(slot = %self.slot, "the server invalidated the replication slot (it kept more WAL \
                        than max_slot_wal_keep_size allows): changes made meanwhile are lost to capture; re-creating \
                        it and recording a resync in the log");
                    let channels = slot::reset(&side, &self.slot).await?;
                    Stats::bump(&self.stats.resets);
                    tracing::warn!(channels, "a resync event was appended on every WAL-watched channel");
                    return Ok(Ended::Again);
                }
                return Err(e);
            }
        };
        let map = match state.map {
            Some(m) => m,
            // Read once the slot exists: a watch made since is in its stream.
            None => batch::current_map(&side).await?,
        };
        set(&self.stats.active, 1);
        tracing::info!(slot = %self.slot, appended = ?state.appended.map(|p| p.to_string()), "capturing: this capturer streams the slot");
        let mut run = Session {
            o,
            slot: &self.slot,
            stats: &self.stats,
            side,
            stream,
            decoder: Decoder::new(map),
            batch: Batch::default(),
            appended: state.appended,
            txn: None,
            confirm: None,
            newest_commit_us: 0,
            owed_since: None,
            last_health: None,
            warned: false,
        };
        let ended = run.go(stop).await;
        if tokio::time::timeout(Duration::from_secs(2), run.stream.shutdown()).await.is_err() {
            run.stream.abort();
        }
        ended
    }
}

/// The schema check of the first statement: a missing function is an old schema.
fn not_migrated(e: Error) -> Error {
    match e.sqlstate() {
        Some("42883" | "42P01" | "3F000") => Error::NotMigrated,
        _ => e,
    }
}

/// One streaming session's state.
struct Session<'a> {
    o: &'a CaptureOptions,
    slot: &'a str,
    stats: &'a CaptureStats,
    side: Client,
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
    last_health: Option<Instant>,
    warned: bool,
}

impl Session<'_> {
    /// Whether something read is not yet in the log (or the map not stored).
    fn owed(&self) -> bool {
        !self.batch.is_empty() || self.confirm.is_some() || self.decoder.map_dirty()
    }

    async fn go(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Result<Ended> {
        loop {
            if self.last_health.is_none_or(|t| t.elapsed() >= self.o.health_interval) {
                self.health().await;
            }
            let next = if self.owed() {
                match self.ready().await {
                    Some(r) => r,
                    None => {
                        self.flush().await?;
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    r = self.stream.recv() => r,
                    () = tokio::time::sleep(self.o.idle_timeout) => {
                        return Err(Error::ConnectionLost(format!("no message from the server within {:?}", self.o.idle_timeout)));
                    }
                    () = tokio::time::sleep(self.o.health_interval) => continue,
                    _ = stop.wait_for(|s| *s) => return Ok(Ended::Stopped),
                }
            };
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

    /// The next message, if one comes before what is owed is `linger` old.
    async fn ready(&mut self) -> Option<pgwire_replication::Result<Option<ReplicationEvent>>> {
        let since = *self.owed_since.get_or_insert_with(tokio::time::Instant::now);
        tokio::time::timeout_at(since + self.o.linger, self.stream.recv()).await.ok()
    }

    async fn handle(&mut self, event: ReplicationEvent) -> Result<()> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                self.txn = Some(Txn { lsn: final_lsn.as_u64(), xid, time_us: commit_time_micros, next_index: 0 });
            }
            ReplicationEvent::XLogData { data, .. } => {
                // A table described anew: learn the shapes of its column
                // types first (arrays, composites, domains render nested).
                if let Ok(crate::wal::pgoutput::Msg::Relation(rel)) = crate::wal::pgoutput::parse(&data) {
                    let unknown = self.decoder.types.unknown(rel.columns.iter().map(|c| c.type_oid));
                    if !unknown.is_empty() {
                        self.decoder.types.learn(&self.side, unknown).await?;
                    }
                }
                let Some(txn) = self.txn else {
                    // Outside a transaction only relations are learnt.
                    let idle = Txn { lsn: 0, xid: 0, time_us: 0, next_index: 0 };
                    self.decoder.message(&self.stats.malformed, &idle, &data, &mut Vec::new());
                    return Ok(());
                };
                let mut out = Vec::new();
                let decoded = self.decoder.message(&self.stats.malformed, &txn, &data, &mut out);
                if let Some(t) = self.txn.as_mut() {
                    t.next_index += decoded.rows;
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
            let last = self.batch.events.last().map(|e| e.at);
            let new = self.batch.append(&self.side, self.slot, map.as_ref(), self.o.statement_timeout).await?;
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

    /// Measures the slot's retained WAL (and this process's CPU); warns past the threshold.
    async fn health(&mut self) {
        self.last_health = Some(Instant::now());
        if let Some(cpu) = process_cpu_us() {
            set(&self.stats.cpu_us, cpu);
        }
        let Ok(all) = slots(&self.side).await else { return };
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

fn set(gauge: &AtomicU64, value: u64) {
    gauge.store(value, Ordering::Relaxed);
}

/// Microseconds from a commit time (µs since 2000-01-01) to now.
fn lag_us(commit_us: i64) -> u64 {
    const PG_EPOCH_US: i128 = 946_684_800 * 1_000_000;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros();
    (now as i128 - PG_EPOCH_US - i128::from(commit_us)).max(0) as u64
}

/// This process's CPU time (user + system), from /proc (Linux).
fn process_cpu_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may hold spaces) start after its `)`.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux we run on.
    Some(ticks * 10_000)
}
