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
mod options;
mod session;
mod slot;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use self::batch::Batch;
pub use self::options::{CaptureOptions, CaptureSnapshot, CaptureStats};
use self::session::{set, Session};
pub use self::slot::{drop_idle, slots, SlotInfo};
use crate::db::Config;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::wal::{self, Decoder, SlotError};

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
        let mut backoff = crate::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let ended = self.session(&mut stop).await;
            // A session that streamed: from now on failures are retried.
            if self.stats.active.swap(0, Ordering::Relaxed) == 1 {
                started = true;
                backoff.reset();
            }
            let delay = match ended {
                Ok(Ended::Stopped) => return Ok(()),
                Ok(Ended::Again) => continue,
                Ok(Ended::Standby(why)) => {
                    started = true;
                    if standing_by.as_deref() != Some(why.as_str()) {
                        tracing::info!(slot = %self.slot, holder = %why, "standby: another capturer streams the slot; waiting to take over");
                        standing_by = Some(why);
                    }
                    self.options.standby_poll
                }
                Err(e @ (Error::NotMigrated | Error::Config(_))) => return Err(e),
                // Before a first stream, what will not mend by waiting
                // (wal_level, grants) ends the capturer with its reason;
                // a lost or refused connection (a server restarting, a
                // killed predecessor's session not yet gone) is retried.
                Err(e) if !started && permanent(&e) => return Err(e),
                Err(e) => {
                    Stats::bump(&self.stats.reconnects);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, slot = %self.slot, retry_in = ?delay, "capture session ended; starting again");
                    standing_by = None;
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }

    /// One session: a statement connection and the slot's stream, from the
    /// stored state, until stopped or something fails.
    async fn session(&self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Result<Ended> {
        let o = &self.options;
        let mut config = self.config.clone();
        config.pg_mut().application_name("pgpubsub capture (append)");
        let side = crate::db::connect(&config).await?;
        let t = o.statement_timeout;
        // Fails early (and clearly) without the schema (Error::NotMigrated)
        // or the grants. Nobody else changes it while the slot is missing.
        let before = within(t, batch::state(&side, &self.slot)).await?;
        let append = within(t, batch::prepare(&side)).await?;
        let failed = |e| async {
            if matches!(e, Error::Config(_)) {
                return Err(e);
            }
            if within(t, slot::invalidated(&side, &self.slot)).await.unwrap_or(false) {
                tracing::error!(slot = %self.slot, "the server invalidated the replication slot (it kept more WAL \
                    than max_slot_wal_keep_size allows): changes made meanwhile are lost to capture; re-creating \
                    it and recording a resync in the log");
                let channels = within(t, slot::reset(&side, &self.slot)).await?;
                Stats::bump(&self.stats.resets);
                tracing::warn!(channels, "a resync event was appended on every WAL-watched channel");
                return Ok(Ended::Again);
            }
            Err(e)
        };
        let (client, created) = match wal::connect(&self.config, &self.slot, o.status_interval).await {
            Ok(c) => c,
            Err(SlotError::InUse(e)) => return Ok(Ended::Standby(e.to_string())),
            Err(SlotError::Failed(e)) => return failed(e).await,
        };
        if let Some(created) = created {
            // A new slot streams from now: a capturer that had appended
            // before lost what happened in between (a slot dropped by hand,
            // or lost in a failover). Say so in the log, then store the
            // channel map as of the slot's start, read in its snapshot.
            if before.appended.is_some() || before.map.is_some() {
                tracing::error!(slot = %self.slot, "the replication slot was missing (dropped, or lost in a \
                    failover) and was created again: changes since the capturer last confirmed were not captured; \
                    recording a resync in the log");
                within(
                    t,
                    slot::record_gap(
                        &side,
                        &self.slot,
                        "the replication slot was missing and was created again: \
                    changes made since the capturer last confirmed were not captured",
                    ),
                )
                .await?;
                Stats::bump(&self.stats.resets);
            }
            let map = within(t, batch::map_in_snapshot(&side, &created.snapshot, created.consistent_point)).await?;
            Batch::default().append(&side, &append, &self.slot, Some(&map), t).await?;
        }
        let stream = match wal::start(client).await {
            Ok(s) => s,
            Err(SlotError::InUse(e)) => return Ok(Ended::Standby(e.to_string())),
            Err(SlotError::Failed(e)) => return failed(e).await,
        };
        // Read once this session holds the slot: what another capturer
        // appended before is in it, and what it had not confirmed streams
        // again to this one.
        let state = within(t, batch::state(&side, &self.slot)).await?;
        let map = match state.map {
            Some(m) => m,
            // A slot made by an older pgpubsub, before maps were stored.
            None => within(t, batch::current_map(&side)).await?,
        };
        set(&self.stats.active, 1);
        tracing::info!(slot = %self.slot, appended = ?state.appended.map(|p| p.to_string()), "capturing: this capturer streams the slot");
        let mut run =
            Session::new(o, &self.slot, &self.stats, (side, append), stream, Decoder::new(map), state.appended);
        let ended = run.go(stop).await;
        run.close().await;
        ended
    }
}

/// Whether `e` is a mistake of setup that retrying cannot mend: the
/// server's settings (wal_level, max_replication_slots), a missing
/// privilege, a refused login, an undefined object.
fn permanent(e: &Error) -> bool {
    let code = match e {
        Error::NotMigrated | Error::Config(_) => return true,
        Error::Wal { source, .. } => wal::sqlstate(source),
        Error::Db { source, .. } => source.code.as_deref(),
        Error::Connect { source, .. } => source.as_db_error().map(|d| d.code().code()),
        _ => None,
    };
    // 28: invalid authorization; 42: privileges, undefined objects;
    // 55000: wal_level; 53400: too few slots or senders.
    code.is_some_and(|c| c.starts_with("28") || c.starts_with("42") || c == "55000" || c == "53400")
}

/// `f`, or [`Error::ConnectionLost`] if the side connection does not
/// answer within `t` (a silently dead network never does).
pub(super) async fn within<T>(t: Duration, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(t, f).await {
        Ok(r) => r,
        Err(_) => Err(Error::ConnectionLost(format!("the capturer's statement connection: no answer within {t:?}"))),
    }
}
