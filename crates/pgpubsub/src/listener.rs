//! The listener: a subscriber's view of one or more channels, with nothing
//! lost.
//!
//! A reading task (`session.rs`) owns the LISTEN connection and queues live
//! events, fences and gaps. [`Listener::recv`] delivers them, and whenever
//! something may have been missed (start-up from a stored cursor, reconnect,
//! a full queue, a chunk that never came) it first reads the missed events
//! from the log, in (txid, seq) order, skipping what it already delivered.
//!
//! The subscriber's position is a [`Cursor`]: everything at or below it was
//! returned by `recv` *and* the subscriber has asked for the next item since
//! (so it has handled it). It advances on fences and while replaying final
//! events, never past a transaction that might still commit. A named
//! listener stores it in `pubsub.cursors` and resumes from it after a restart.
//!
//! Delivery is at least once: after a restart the events between the stored
//! cursor and the last one handled are delivered again. Foreign
//! notifications (no `seq`) are not in the log: delivered live only.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, Stream};
use tokio::sync::{mpsc, watch};

use crate::channel::Channel;
use crate::cursor::Cursor;
use crate::db::Config;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::log::{LogConn, Unreadable};
use crate::reassembly::Limits;
use crate::session::{Item, Session};
use crate::stats::Stats;

/// How a listener behaves. Every field has a default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ListenerOptions {
    /// Bounds on chunk reassembly.
    pub limits: Limits,
    /// Live events queued for the subscriber. When full, live events are
    /// dropped and read back from the log once the subscriber catches up.
    pub buffer: usize,
    /// A name to store the cursor under (`pubsub.cursors`), so a restarted
    /// listener resumes where it stopped. `None`: start from now.
    pub name: Option<String>,
    /// How often the connection is proved alive (and the cursor moved).
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
    /// Most events read from the log per catch-up query.
    pub catch_up_rows: i64,
    /// Most bytes of events read per catch-up query (past the first event).
    pub catch_up_bytes: i64,
    /// Events above the cursor remembered to skip duplicates; past this the
    /// oldest are forgotten (a duplicate may then be delivered).
    pub max_remembered: usize,
    /// Store a named listener's cursor by itself (at most once per
    /// heartbeat) as events are acknowledged. Turn off to call
    /// [`Listener::save`] at points of your own, such as after a flush.
    pub autosave: bool,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            limits: Limits::default(),
            buffer: 4096,
            name: None,
            heartbeat: Duration::from_secs(1),
            deaf_after: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            queue_warn: 0.5,
            catch_up_rows: 1000,
            catch_up_bytes: 16 << 20,
            max_remembered: 1 << 20,
            autosave: true,
        }
    }
}

impl ListenerOptions {
    /// Sets the reassembly bounds.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the live-event buffer (at least 1).
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.max(1);
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

/// A stream of events from one or more channels; see the module docs.
pub struct Listener {
    items: mpsc::Receiver<Item>,
    log: Arc<LogConn>,
    stats: Arc<Stats>,
    state: watch::Receiver<ConnectionState>,
    channels: Vec<Channel>,
    /// Channel names as strings, for catch-up queries.
    names: Vec<String>,
    options: ListenerOptions,
    /// Everything at or below is delivered and handled.
    cursor: Cursor,
    /// Where the cursor moves when the subscriber asks for the next item.
    pending: Option<Cursor>,
    /// Events above the cursor already delivered (to skip duplicates).
    delivered: BTreeSet<Cursor>,
    /// Events read from the log, to deliver before anything live; each with
    /// the cursor it completes, if it is final.
    replay: VecDeque<(Event, Option<Cursor>)>,
    /// A catch-up is running from this position.
    catching_up: Option<Cursor>,
    /// The scan ran past a transaction that may still commit: the cursor
    /// waits for the next fence.
    scan_blocked: bool,
    last_saved: Instant,
    saved: Cursor,
    /// Delay before the next catch-up attempt after a failure.
    retry: Duration,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("channels", &self.channels)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Connects, LISTENs on `channels`, proves that notifications arrive, and
    /// starts delivering. Whatever commits after this returns is delivered;
    /// with a stored cursor (`options.name`), everything after it too.
    ///
    /// # Errors
    /// [`Error::Connect`] when the database cannot be reached;
    /// [`Error::ReadReplica`] on a standby; [`Error::NotifyUnavailable`] when
    /// a notification sent to ourselves never arrives (a transaction pooler);
    /// [`Error::Db`] when LISTEN is refused; [`Error::NotMigrated`] for a
    /// named listener without the schema.
    pub async fn connect(config: &Config, channels: &[Channel], options: ListenerOptions) -> Result<Listener> {
        let config = crate::db::tuned(config);
        let log = Arc::new(LogConn::new(config.clone(), options.deaf_after));
        let stats = Arc::new(Stats::default());
        let (tx, items) = mpsc::channel(options.buffer.max(1));
        let (state_tx, state) = watch::channel(ConnectionState::Listening);
        let fence_channel = Channel::new(format!("pgpubsub_fence_{}", random_suffix()))?;

        // Taken before LISTEN: every transaction older than this finished
        // before we listened, so "from now" starts here.
        let start = Cursor::before_txid(log.xmin().await?);
        let stored = match &options.name {
            Some(name) => log.load_cursor(name).await?,
            None => None,
        };

        let mut session = Session::new(
            config,
            channels.to_vec(),
            fence_channel,
            options.clone(),
            log.clone(),
            stats.clone(),
            tx,
            state_tx,
        );
        let mut live = session.open().await?;
        session.prove(&mut live).await?;
        tokio::spawn(session.run(live));

        let cursor = stored.unwrap_or(start);
        let mut listener = Listener {
            items,
            log,
            stats,
            state,
            names: channels.iter().map(|c| c.as_str().to_string()).collect(),
            channels: channels.to_vec(),
            options,
            cursor,
            pending: None,
            delivered: BTreeSet::new(),
            replay: VecDeque::new(),
            // Resuming: first deliver what was missed while away.
            catching_up: stored,
            scan_blocked: false,
            last_saved: Instant::now(),
            saved: stored.unwrap_or_default(),
            retry: Duration::ZERO,
        };
        if stored.is_none() && listener.options.name.is_some() {
            listener.save().await?;
        }
        Ok(listener)
    }

    /// The next event; `None` once the listener has stopped.
    ///
    /// Calling it again also acknowledges the previous event: the cursor
    /// moves past it. Transient failures (reconnects, a slow log) are
    /// retried inside; `Err` is returned only for [`Error::ResyncNeeded`],
    /// after which delivery continues from the oldest event still logged.
    pub async fn recv(&mut self) -> Option<Result<Event>> {
        loop {
            self.acknowledge().await;
            if let Some((event, completes)) = self.replay.pop_front() {
                self.pending = completes;
                Stats::bump(&self.stats.replayed);
                Stats::bump(&self.stats.events);
                return Some(Ok(event));
            }
            if let Some(from) = self.catching_up {
                match self.catch_up(from).await {
                    Ok(()) => {
                        self.retry = Duration::ZERO;
                        continue;
                    }
                    Err(e @ Error::ResyncNeeded { .. }) => return Some(Err(e)),
                    Err(Error::NotMigrated) => {
                        // Only foreign notifications can be flowing: nothing
                        // is logged, so there is nothing to catch up from.
                        tracing::warn!("gap on a database without the pubsub schema: events in it are lost");
                        self.catching_up = None;
                        continue;
                    }
                    Err(e) => {
                        self.retry = (self.retry * 2).clamp(self.options.backoff_min, self.options.backoff_max);
                        tracing::warn!(error = %e, retry_in = ?self.retry, "catch-up failed; retrying");
                        tokio::time::sleep(self.retry).await;
                        continue;
                    }
                }
            }
            match self.items.recv().await? {
                Item::Event(event) => {
                    if self.is_duplicate(&event) {
                        Stats::bump(&self.stats.duplicates);
                        continue;
                    }
                    Stats::bump(&self.stats.events);
                    return Some(Ok(event));
                }
                Item::Fence { xmin } => self.on_fence(xmin),
                Item::Gap => {
                    Stats::bump(&self.stats.gaps);
                    self.catching_up = Some(self.cursor);
                }
            }
        }
    }

    /// The listener as a [`Stream`] of what [`recv`](Self::recv) returns.
    pub fn into_stream(self) -> impl Stream<Item = Result<Event>> + Send {
        futures_util::stream::unfold(self, |mut l| async move { l.recv().await.map(|item| (item, l)) })
    }

    /// The next event if one is ready without waiting for the network.
    pub fn try_recv(&mut self) -> Option<Result<Event>> {
        // A catch-up page would start a query only to abandon it here.
        if self.replay.is_empty() && self.catching_up.is_some() {
            return None;
        }
        self.recv().now_or_never().flatten()
    }

    /// This listener's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The state of the listening connection, updated as it changes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// The channels listened on.
    pub fn channels(&self) -> &[Channel] {
        &self.channels
    }

    /// The position: everything at or below it is delivered and handled.
    pub fn cursor(&self) -> Cursor {
        self.pending.map_or(self.cursor, |p| p.max(self.cursor))
    }

    /// Acknowledges the last event and stores the cursor (named listeners);
    /// call before exiting.
    ///
    /// # Errors
    /// When the cursor cannot be stored.
    pub async fn close(mut self) -> Result<()> {
        if let Some(p) = self.pending.take() {
            self.advance(p);
        }
        self.save().await
    }

    fn is_duplicate(&mut self, event: &Event) -> bool {
        let (Some(seq), Some(txid)) = (event.seq, event.txid) else {
            return false;
        };
        let at = Cursor { txid, seq };
        if at <= self.cursor || !self.delivered.insert(at) {
            return true;
        }
        if self.delivered.len() > self.options.max_remembered {
            self.delivered.pop_first();
            Stats::bump(&self.stats.forgotten);
        }
        false
    }

    fn on_fence(&mut self, xmin: u64) {
        // Every event of a transaction older than xmin came before this fence
        // and, if there was a gap, was replayed before it was popped.
        self.advance(Cursor::before_txid(xmin));
        self.scan_blocked = false;
    }

    fn advance(&mut self, to: Cursor) {
        if to > self.cursor {
            self.cursor = to;
            self.delivered = self.delivered.split_off(&Cursor { txid: to.txid, seq: to.seq.saturating_add(1) });
        }
    }

    async fn acknowledge(&mut self) {
        if let Some(p) = self.pending.take() {
            self.advance(p);
        }
        let due = self.last_saved.elapsed() >= self.options.heartbeat;
        if self.options.autosave && self.options.name.is_some() && self.cursor > self.saved && due {
            if let Err(e) = self.save().await {
                tracing::warn!(error = %e, "could not store the cursor; will retry");
            }
        }
    }

    /// Stores the cursor of a named listener now (nothing for an anonymous
    /// one, or when it has not moved). Everything returned before the last
    /// `recv` call counts as handled.
    ///
    /// # Errors
    /// When the database cannot be written.
    pub async fn save(&mut self) -> Result<()> {
        let Some(name) = &self.options.name else {
            return Ok(());
        };
        if self.cursor == self.saved {
            return Ok(());
        }
        self.log.save_cursor(name, self.cursor).await?;
        self.saved = self.cursor;
        self.last_saved = Instant::now();
        Ok(())
    }

    /// Reads one page of missed events into `replay`.
    async fn catch_up(&mut self, from: Cursor) -> Result<()> {
        if from == self.cursor {
            let pruned = self.log.pruned().await?;
            if pruned > self.cursor {
                let behind = self.cursor;
                Stats::bump(&self.stats.resyncs);
                tracing::warn!(cursor = %behind, pruned = %pruned, "events this subscriber missed were pruned");
                self.cursor = pruned;
                self.catching_up = Some(pruned);
                return Err(Error::ResyncNeeded { cursor: behind, pruned });
            }
            self.scan_blocked = false;
        }
        let xmin = self.log.xmin().await?;
        let rows = self
            .log
            .catch_up(
                &self.names,
                from,
                self.options.catch_up_rows,
                self.options.catch_up_bytes,
                self.options.limits.max_event_bytes as i64,
            )
            .await?;
        let more = rows
            .first()
            .is_some_and(|r| r.page_rows >= self.options.catch_up_rows || (rows.len() as i64) < r.page_rows);
        let mut last = from;
        for row in rows {
            last = row.cursor;
            // Final (no older transaction can still commit) and nothing
            // unfinished before it in this scan: the cursor may move here.
            let final_here = row.cursor.txid < xmin && !self.scan_blocked;
            if !final_here {
                self.scan_blocked = true;
            }
            let already = row.cursor <= self.cursor || self.delivered.contains(&row.cursor);
            let event = match row.event {
                _ if already => None,
                Ok(e) => Some(e),
                Err(Unreadable::TooLarge(bytes)) => {
                    Stats::bump(&self.stats.oversize);
                    tracing::warn!(seq = row.cursor.seq, bytes, "logged event over max_event_bytes; skipped");
                    None
                }
                Err(Unreadable::NotAnEvent) => {
                    Stats::bump(&self.stats.not_json);
                    tracing::warn!(seq = row.cursor.seq, "logged event is not an event of ours; skipped");
                    None
                }
            };
            let completes = final_here.then_some(row.cursor);
            match event {
                Some(e) => {
                    if !final_here {
                        self.delivered.insert(row.cursor);
                    }
                    self.replay.push_back((e, completes));
                }
                None => {
                    if let Some(c) = completes {
                        match self.replay.back_mut() {
                            Some((_, slot)) => *slot = Some(c),
                            None => self.advance(c),
                        }
                    }
                }
            }
        }
        // The next page is read once this one is delivered, so `replay`
        // never holds more than one page.
        self.catching_up = more.then_some(last);
        if self.catching_up.is_none() {
            tracing::debug!(cursor = %self.cursor, "caught up");
        }
        Ok(())
    }
}

/// 12 hex digits from the clock and the process: unique enough for a fence
/// channel (it only has to differ between the listeners of one database).
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}
