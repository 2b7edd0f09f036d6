//! The listener: a subscriber's view of one or more channels (or all of
//! them), with nothing lost.
//!
//! Events come from the log only (`tail.rs` reads it from a
//! commit-safe position). A reading task (`reader.rs`) owns the LISTEN
//! connection: it hears wake-ups and foreign notifications, nothing else,
//! and passes the foreign ones through `foreign.rs` (seed-format messages
//! reassembled, in order). Here: `options.rs` (how it behaves), `waiting.rs` (reading the log, and
//! becoming the listener writers wake), `progress.rs` (the position, stored
//! for a named listener).
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
use tokio::sync::{mpsc, watch};

use crate::channel::Channel;
use crate::cursor::Cursor;
use crate::db::Config;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::event_log::LogConn;
use crate::stats::Stats;
use crate::tail::Tail;

mod foreign;
mod options;
mod progress;
mod reader;
mod waiting;

use foreign::Foreign;
pub use options::{ConnectionState, ListenerOptions};
use progress::Progress;
use reader::{Command, Outputs, Reader};
use waiting::{Waiting, Wake};

/// A stream of events from one or more channels; see the module docs.
pub struct Listener {
    tail: Tail,
    log: Arc<LogConn>,
    stats: Arc<Stats>,
    state: watch::Receiver<ConnectionState>,
    wake: Arc<Wake>,
    foreign: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
    channels: Vec<Channel>,
    options: ListenerOptions,
    /// The subscriber's position, stored for a named listener.
    progress: Progress,
    /// Events of the last page not yet handed over.
    ready: VecDeque<Event>,
    /// With row-level authorization: events read and not yet decided (kept
    /// here until they are, so a cancelled `recv` loses nothing).
    unseen: Vec<Arc<crate::hub::Shared>>,
    /// The reading role's class, with [`ListenerOptions::row_views`].
    class: Option<Arc<crate::views::Class>>,
    /// Where the cursor stands once `ready` is handed over.
    page_end: Option<Cursor>,
    /// Read the log before waiting again.
    due: bool,
    waiting: Waiting,
    /// Pause before the next read while writers are in flight.
    pause: Duration,
    /// The next read waits until then (see [`ListenerOptions::linger`]).
    not_before: Option<Instant>,
    /// Delay before the next read after a failure.
    retry: crate::Backoff,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("channels", &self.channels)
            .field("cursor", &self.progress.cursor())
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
        let log = Arc::new(LogConn::new(config.clone(), options.deaf_after).for_reading());
        let stats = Arc::new(Stats::default());
        let (foreign_tx, foreign) = mpsc::channel(options.buffer.max(1));
        let (state_tx, state) = watch::channel(ConnectionState::Listening);
        let (commands, commands_rx) = mpsc::channel(64);
        let wake = Arc::new(Wake::default());
        let fence_channel = Channel::new(format!("pgpubsub_fence_{}", random_suffix()))?;
        let names = (!channels.is_empty()).then(|| channels.iter().map(|c| c.as_str().to_string()).collect());
        let limits = options.page_limits();

        let stored = match &options.name {
            Some(name) => log.load_cursor(name).await?,
            None => None,
        };
        // Taken before LISTEN: "from now" starts here.
        let tail = match stored.or(options.since) {
            Some(from) => Tail::new(from, names, limits, stats.clone()),
            None => Tail::from_now(&log, names, limits, stats.clone()).await?,
        };
        let foreign_tx = Foreign::new(options.limits.clone(), stats.clone(), foreign_tx);
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

        let progress = Progress::new(tail.position(), options.name.clone(), stored.unwrap_or_default());
        let mut listener = Listener {
            tail,
            log,
            stats,
            state,
            wake,
            foreign,
            commands,
            channels: channels.to_vec(),
            progress,
            ready: VecDeque::new(),
            unseen: Vec::new(),
            class: options.row_views.then(crate::views::Class::itself),
            page_end: None,
            due: true,
            waiting: Waiting::No,
            pause: options.poll_min,
            not_before: None,
            retry: crate::Backoff::new(options.backoff_min, options.backoff_max),
            options,
        };
        if stored.is_none() && listener.options.name.is_some() {
            listener.save().await?;
        }
        Ok(listener)
    }

    /// The cursor stored under `name` (a durable listener's), if any:
    /// whether a listener of that name would resume or begin.
    ///
    /// # Errors
    /// When the database cannot be read.
    pub async fn stored(config: &Config, name: &str) -> Result<Option<Cursor>> {
        LogConn::new(crate::db::tuned(config), std::time::Duration::from_secs(10)).load_cursor(name).await
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
            if !self.unseen.is_empty() {
                if let Err(e) = self.decide().await {
                    if let Some(out) = self.back_off("deciding what this role may see", e).await {
                        return out;
                    }
                    continue;
                }
            }
            if let Some(event) = self.ready.pop_front() {
                if self.ready.is_empty() {
                    self.progress.hand_over(self.page_end.take());
                }
                Stats::bump(&self.stats.events);
                return Some(Ok(event));
            }
            if let Some(end) = self.page_end.take() {
                self.progress.advance(end);
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
                    Ok(()) => self.retry.reset(),
                    Err(e @ Error::ResyncNeeded { .. }) => return Some(Err(e)),
                    Err(e) => {
                        // Still holding the lock on a connection that lives
                        // on (a statement failed, the session did not): the
                        // next read gives it back. Taking it again would
                        // count it twice, and one unlock would leave it held.
                        if !matches!(self.waiting, Waiting::Mine(g) if g == self.log.generation()) {
                            self.waiting = Waiting::No;
                        }
                        self.wake.mark_others();
                        if let Some(out) = self.back_off("reading the log", e).await {
                            return out;
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
                    self.wake.mark_others();
                }
            }
            self.due = true;
        }
    }

    /// After `e` while `doing` something: waits the next retry delay; a
    /// foreign notification that comes meanwhile is what `recv` returns
    /// (`Some`), else `None` and `recv` tries again.
    async fn back_off(&mut self, doing: &str, e: Error) -> Option<Option<Result<Event>>> {
        let delay = self.retry.next_delay();
        tracing::warn!(error = %e, retry_in = ?delay, "{doing} failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(delay) => None,
            e = self.foreign.recv() => Some(e.map(Ok)),
        }
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
        self.progress.cursor()
    }

    /// Acknowledges the last event and stores the cursor (named listeners);
    /// call before exiting.
    ///
    /// # Errors
    /// When the cursor cannot be stored.
    pub async fn close(mut self) -> Result<()> {
        self.progress.acknowledge();
        if let Waiting::Mine(_) = self.waiting {
            let _ = self.log.stop_waiting().await;
        }
        self.save().await
    }

    async fn acknowledge(&mut self) {
        self.progress.acknowledge();
        if self.options.autosave {
            self.progress.autosave(&self.log, self.options.heartbeat).await;
        }
    }

    /// Stores the cursor of a named listener now (nothing for an anonymous
    /// one, or when it has not moved). Everything returned before the last
    /// `recv` call counts as handled.
    ///
    /// # Errors
    /// When the database cannot be written.
    pub async fn save(&mut self) -> Result<()> {
        self.progress.save(&self.log).await
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
