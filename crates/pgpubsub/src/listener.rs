//! The listener: a subscriber's view of one or more channels (or all of
//! them), with nothing lost.
//!
//! Events come from the log only (`tail.rs` reads it from a
//! commit-safe position). A reading task (`reader.rs`) owns the LISTEN
//! connection: it hears wake-ups and foreign notifications, nothing else.
//!
//! While events flow, [`Listener::recv`] reads the next page as soon as the
//! last is handed over. When a read finds nothing, the listener tries to
//! become the waiting one: it takes the wake lock (writers then send a
//! wake-up; while nobody holds it they send nothing, so a busy system sends
//! no NOTIFY at all), reads once more, and sleeps until a wake-up or the
//! next heartbeat. If writers are in flight (they hold the lock shared) it
//! reads again after a short, growing pause. A subscriber that does not call
//! `recv` just makes the next page larger: nothing queues, nothing is
//! dropped, and no writer waits for it.
//!
//! The subscriber's position is a [`Cursor`]: everything at or below it was
//! returned by `recv` *and* the subscriber has asked for the next item since
//! (so it has handled it). A named listener stores it in `pubsub.cursors`
//! and resumes from it after a restart: delivery is at least once.
//! Foreign notifications (kind `notify`, no `seq`) are not in the log:
//! delivered live only, in arrival order between pages.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, Stream};
use tokio::sync::{mpsc, watch, Notify};

use crate::channel::Channel;
use crate::cursor::Cursor;
use crate::db::Config;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::event_log::{LogConn, WaitLock};
use crate::reader::{Command, Outputs, Reader};
use crate::reassembly::Limits;
use crate::stats::Stats;
use crate::tail::{PageLimits, Tail};

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
            page_rows: 1000,
            page_bytes: 16 << 20,
            poll_min: Duration::from_micros(500),
            poll_max: Duration::from_millis(20),
            linger: Duration::from_millis(2),
            autosave: true,
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

    fn page_limits(&self) -> PageLimits {
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

/// Whether this listener is the one writers wake, or sleeps on behalf of
/// the one that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Not waiting: reads find events, or writers are in flight.
    No,
    /// Holds the wake lock, taken on this generation of the log connection.
    Mine(u64),
    /// Another listener holds it; wake-ups reach us too.
    Peer,
}

/// A stream of events from one or more channels; see the module docs.
pub struct Listener {
    tail: Tail,
    log: Arc<LogConn>,
    stats: Arc<Stats>,
    state: watch::Receiver<ConnectionState>,
    wake: Arc<Notify>,
    foreign: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
    channels: Vec<Channel>,
    options: ListenerOptions,
    /// Everything at or below is delivered and handled.
    cursor: Cursor,
    /// Where the cursor moves when the subscriber asks for the next item.
    pending: Option<Cursor>,
    /// Events of the last page not yet handed over.
    ready: VecDeque<Event>,
    /// Where the cursor stands once `ready` is handed over.
    page_end: Option<Cursor>,
    /// Read the log before waiting again.
    due: bool,
    waiting: Waiting,
    /// Pause before the next read while writers are in flight.
    pause: Duration,
    /// The next read waits until then (see [`ListenerOptions::linger`]).
    not_before: Option<Instant>,
    last_saved: Instant,
    saved: Cursor,
    /// Delay before the next read after a failure.
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
    /// Connects, LISTENs, proves that notifications arrive, and starts
    /// delivering the events of `channels` (all channels when empty).
    /// Whatever commits after this returns is delivered; with a stored
    /// cursor (`options.name`), everything after it too.
    ///
    /// # Errors
    /// [`Error::Connect`] when the database cannot be reached;
    /// [`Error::ReadReplica`] on a standby; [`Error::NotifyUnavailable`] when
    /// a notification sent to ourselves never arrives (a transaction pooler);
    /// [`Error::Db`] when LISTEN is refused; [`Error::NotMigrated`] without
    /// the schema.
    pub async fn connect(config: &Config, channels: &[Channel], options: ListenerOptions) -> Result<Listener> {
        let config = crate::db::tuned(config);
        let log = Arc::new(LogConn::new(config.clone(), options.deaf_after));
        let stats = Arc::new(Stats::default());
        let (foreign_tx, foreign) = mpsc::channel(options.buffer.max(1));
        let (state_tx, state) = watch::channel(ConnectionState::Listening);
        let (commands, commands_rx) = mpsc::channel(64);
        let wake = Arc::new(Notify::new());
        let fence_channel = Channel::new(format!("pgpubsub_fence_{}", random_suffix()))?;
        let names = (!channels.is_empty()).then(|| channels.iter().map(|c| c.as_str().to_string()).collect());
        let limits = options.page_limits();

        let stored = match &options.name {
            Some(name) => log.load_cursor(name).await?,
            None => None,
        };
        // Taken before LISTEN: "from now" starts here.
        let tail = match stored {
            Some(from) => Tail::new(from, names, limits, stats.clone()),
            None => Tail::from_now(&log, names, limits, stats.clone()).await?,
        };
        let outputs = Outputs { wake: wake.clone(), foreign: foreign_tx, state: state_tx };
        let mut reader = Reader::new(
            config,
            channels.to_vec(),
            fence_channel,
            (options.clone(), log.clone(), stats.clone()),
            outputs,
            commands_rx,
        );
        let mut live = reader.open().await?;
        reader.prove(&mut live).await?;
        tokio::spawn(reader.run(live));

        let cursor = tail.position();
        let mut listener = Listener {
            tail,
            log,
            stats,
            state,
            wake,
            foreign,
            commands,
            channels: channels.to_vec(),
            cursor,
            pending: None,
            ready: VecDeque::new(),
            page_end: None,
            due: true,
            waiting: Waiting::No,
            pause: options.poll_min,
            not_before: None,
            options,
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
            if let Ok(event) = self.foreign.try_recv() {
                Stats::bump(&self.stats.events);
                return Some(Ok(event));
            }
            if let Some(event) = self.ready.pop_front() {
                if self.ready.is_empty() {
                    self.pending = self.page_end.take();
                }
                Stats::bump(&self.stats.events);
                return Some(Ok(event));
            }
            if let Some(end) = self.page_end.take() {
                self.advance(end);
            }
            if self.due {
                if let Some(at) = self.not_before.take() {
                    // A partial page just went out: let a few more commits
                    // gather before reading again (see `linger`).
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        e = self.foreign.recv() => {
                            Stats::bump(&self.stats.events);
                            return Some(Ok(e?));
                        }
                    }
                }
                match self.read().await {
                    Ok(()) => self.retry = Duration::ZERO,
                    Err(e @ Error::ResyncNeeded { .. }) => return Some(Err(e)),
                    Err(e) => {
                        self.retry = (self.retry * 2).clamp(self.options.backoff_min, self.options.backoff_max);
                        tracing::warn!(error = %e, retry_in = ?self.retry, "reading the log failed; retrying");
                        self.waiting = Waiting::No;
                        tokio::select! {
                            () = tokio::time::sleep(self.retry) => {}
                            e = self.foreign.recv() => return Some(Ok(e?)),
                        }
                    }
                }
                continue;
            }
            // Nothing to read: sleep until a wake-up, a foreign notification,
            // the end of the pause or the heartbeat.
            let sleep = match self.waiting {
                Waiting::No => self.pause,
                _ => self.options.heartbeat,
            };
            tokio::select! {
                () = self.wake.notified() => {}
                e = self.foreign.recv() => {
                    self.due = self.waiting == Waiting::No;
                    Stats::bump(&self.stats.events);
                    return Some(Ok(e?));
                }
                () = tokio::time::sleep(sleep) => {
                    if self.waiting == Waiting::No {
                        self.pause = (self.pause * 2).min(self.options.poll_max);
                    }
                }
            }
            self.due = true;
        }
    }

    /// Reads one page; when it is empty, moves towards waiting.
    async fn read(&mut self) -> Result<()> {
        if let Waiting::Mine(generation) = self.waiting {
            if generation == self.log.generation() {
                // Woken (or the heartbeat): writers may stop sending wake-ups.
                self.log.stop_waiting().await?;
            }
            self.waiting = Waiting::No;
        } else if self.waiting == Waiting::Peer {
            self.waiting = Waiting::No;
        }
        self.due = false;
        Stats::bump(&self.stats.polls);
        let started = Instant::now();
        let page = self.tail.next_page(&self.log).await?;
        let found = !page.events.is_empty() || page.more;
        self.page_end = Some(page.position);
        self.ready.extend(page.events);
        if found {
            self.due = true;
            self.pause = self.options.poll_min;
            if !page.more {
                self.not_before = Some(started + self.options.linger);
            }
            return Ok(());
        }
        // Nothing new. Become the waiting listener (or find the one that
        // is), then read once more: a writer that sent no wake-up has
        // finished by now, and its events are visible.
        // Assumed taken until the answer says otherwise: a call cancelled
        // here must not leave the lock held and forgotten.
        self.waiting = Waiting::Mine(self.log.generation());
        match self.log.try_wait().await? {
            WaitLock::Busy => {
                self.waiting = Waiting::No;
                return Ok(());
            }
            WaitLock::Mine => self.waiting = Waiting::Mine(self.log.generation()),
            WaitLock::Peer => self.waiting = Waiting::Peer,
        }
        Stats::bump(&self.stats.polls);
        let page = self.tail.next_page(&self.log).await?;
        self.page_end = Some(page.position);
        if !page.events.is_empty() || page.more {
            self.ready.extend(page.events);
            self.due = true;
        }
        Ok(())
    }

    /// The listener as a [`Stream`] of what [`recv`](Self::recv) returns.
    pub fn into_stream(self) -> impl Stream<Item = Result<Event>> + Send {
        futures_util::stream::unfold(self, |mut l| async move { l.recv().await.map(|item| (item, l)) })
    }

    /// The listener as a [`Stream`] of events, each with the position a
    /// subscriber holding it may resume from (what [`Listener::cursor`] says
    /// right after it is returned): what a [`Hub`](crate::Hub) takes.
    pub fn into_positioned(self) -> impl Stream<Item = Result<(Event, Cursor)>> + Send {
        futures_util::stream::unfold(self, |mut l| async move {
            let item = l.recv().await?;
            let position = l.cursor();
            Some((item.map(|e| (e, position)), l))
        })
    }

    /// The next event if one is ready without waiting for the network.
    pub fn try_recv(&mut self) -> Option<Result<Event>> {
        if self.ready.is_empty() && self.foreign.is_empty() {
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

    /// The channels listened on (empty: all).
    pub fn channels(&self) -> &[Channel] {
        &self.channels
    }

    /// Adds a channel while running: its events that commit from the next
    /// read on are delivered, and its foreign notifications once LISTEN is
    /// issued (at once, and again after every reconnect). A listener of all
    /// channels only LISTENs, for foreign notifications.
    pub async fn add_channel(&mut self, channel: Channel) {
        if self.tail.channels().is_some() && !self.channels.contains(&channel) {
            self.tail.add_channel(channel.as_str());
            self.channels.push(channel.clone());
        }
        let _ = self.commands.send(Command::Listen(channel)).await;
        self.due = true;
    }

    /// Removes a channel while running: nothing more of it is delivered
    /// after the events already read.
    pub async fn remove_channel(&mut self, channel: &Channel) {
        if self.tail.channels().is_some() {
            self.tail.remove_channel(channel.as_str());
            self.channels.retain(|c| c != channel);
            self.ready.retain(|e| e.channel != channel.as_str());
        }
        let _ = self.commands.send(Command::Unlisten(channel.clone())).await;
    }

    /// Turns storing the cursor by itself on or off (see
    /// [`ListenerOptions::autosave`]); for instance on only while every
    /// event returned so far is handled, such as while waiting for the next.
    pub fn set_autosave(&mut self, on: bool) {
        self.options.autosave = on;
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
        if let Waiting::Mine(_) = self.waiting {
            let _ = self.log.stop_waiting().await;
        }
        self.save().await
    }

    fn advance(&mut self, to: Cursor) {
        if to > self.cursor {
            self.cursor = to;
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
