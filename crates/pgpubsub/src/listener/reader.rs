//! The listener's reading task: owns the LISTEN connection, reconnects it,
//! proves it hears, and sorts what arrives.
//!
//! No event data of ours travels here: the log is the only data path. A
//! notification is one of
//! - a wake-up (`pubsub_wake`, an empty payload, or anything shaped like one
//!   of our events or frames, which `watch --inline` tables send and anyone
//!   can forge): the listener reads the log once more. Wake-ups coalesce into
//!   one pending read, so a flood of them costs at most one read at a time;
//! - a heartbeat on the listener's own fence channel;
//! - anything else: a foreign notification (a plain `pg_notify`, the seed's
//!   JSON, seed-004 chunk frames reassembled), handed over as an event of
//!   kind `notify`, never deduplicated against or mixed into log events,
//!   through `foreign.rs`, told where each batch (what was read together) ends.
//!
//! Every `heartbeat` it sends a fence through its own channel; one that does
//! not come back within `deaf_after` means the connection is deaf (open,
//! delivering nothing) and it is replaced. After any reconnect it wakes the
//! listener, since wake-ups may have been missed meanwhile.

use std::sync::Arc;
use std::time::Instant;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::db::Config;

use super::foreign::Foreign;
use super::{ConnectionState, ListenerOptions};
use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::event_log::{LogConn, CAPTURE_WAKE, WAKE_CHANNEL};
use crate::stats::Stats;
use crate::wire::{self, Frame};

/// Notifications read from the socket but not yet sorted.
const NOTIFY_QUEUE: usize = 4096;

/// What the connection's task passes on.
enum Incoming {
    Notification(Notification),
    /// Nothing more is ready on the socket: the notifications since the last
    /// pause arrived together.
    Pause,
}

/// A change to the set of channels, from the listener.
#[derive(Debug)]
pub(crate) enum Command {
    Listen(Channel),
    Unlisten(Channel),
}

/// What the reading task shares with the listener.
pub(crate) struct Outputs {
    /// Raised on every wake-up (coalescing).
    pub wake: Arc<super::waiting::Wake>,
    /// Foreign notifications, decoded.
    pub foreign: Foreign,
    pub state: watch::Sender<ConnectionState>,
}

/// Why the pump stopped.
enum Stop {
    Shutdown,
    Lost(String),
}

pub(crate) struct Reader {
    config: Config,
    channels: Vec<Channel>,
    fence_channel: Channel,
    options: ListenerOptions,
    log: Arc<LogConn>,
    stats: Arc<Stats>,
    out: Outputs,
    commands: mpsc::Receiver<Command>,
    /// The fence in flight: (token, when sent).
    fence: Option<(String, Instant)>,
    fence_counter: u64,
    last_fence_ok: Instant,
}

/// An open LISTEN connection: its client (keeps the LISTENs alive) and its
/// notifications.
pub(crate) struct Live {
    client: Client,
    notifications: mpsc::Receiver<Result<Incoming, String>>,
}

impl Reader {
    pub fn new(
        config: Config,
        channels: Vec<Channel>,
        fence_channel: Channel,
        (options, log, stats): (ListenerOptions, Arc<LogConn>, Arc<Stats>),
        out: Outputs,
        commands: mpsc::Receiver<Command>,
    ) -> Self {
        Reader {
            config,
            channels,
            fence_channel,
            options,
            log,
            stats,
            out,
            commands,
            fence: None,
            fence_counter: 0,
            last_fence_ok: Instant::now(),
        }
    }

    /// Connects and LISTENs on the wake channel, every channel and the fence
    /// channel.
    ///
    /// # Errors
    /// Connection failures, a read replica, a refused LISTEN.
    pub async fn open(&mut self) -> Result<Live> {
        let connect = crate::db::open(&self.config);
        let (client, mut connection) = tokio::time::timeout(self.options.deaf_after, connect)
            .await
            .map_err(|_| Error::ConnectionLost(format!("connecting took over {:?}", self.options.deaf_after)))??;
        let (tx, notifications) = mpsc::channel(NOTIFY_QUEUE);
        // Unconstrained by tokio's cooperative budget, so that a poll that
        // finds nothing ready means the socket has nothing, not that the
        // task has used its budget: that is when a batch ends. It still
        // yields whenever the socket is empty or the queue is full.
        tokio::spawn(tokio::task::unconstrained(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            // Whether notifications were passed on since the last pause.
            let mut since_pause = false;
            loop {
                let next = match messages.next().now_or_never() {
                    Some(next) => next,
                    None => {
                        if std::mem::take(&mut since_pause) && tx.send(Ok(Incoming::Pause)).await.is_err() {
                            break;
                        }
                        tokio::select! {
                            next = messages.next() => next,
                            () = tx.closed() => break,
                        }
                    }
                };
                let item = match next {
                    Some(Ok(AsyncMessage::Notification(n))) => Ok(Incoming::Notification(n)),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("server closed the connection".to_string()),
                };
                since_pause |= item.is_ok();
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        }));
        let recovering: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| Error::db("checking the server", e))?
            .get(0);
        if recovering {
            return Err(Error::ReadReplica(crate::db::describe(&self.config)));
        }
        let wake = Channel::new(WAKE_CHANNEL)?;
        let sql: String = self
            .channels
            .iter()
            .chain([&self.fence_channel, &wake])
            .map(|c| format!("LISTEN {};", c.quoted()))
            .collect();
        client.batch_execute(&sql).await.map_err(|e| Error::db("LISTEN", e))?;
        Ok(Live { client, notifications })
    }

    /// Waits until a fence goes round trip on a new connection: proof that
    /// notifications reach us (a transaction pooler accepts LISTEN and then
    /// delivers nothing).
    ///
    /// # Errors
    /// [`Error::NotifyUnavailable`] when the fence does not return in time.
    pub async fn prove(&mut self, live: &mut Live) -> Result<()> {
        self.send_fence().await?;
        let deadline = tokio::time::Instant::now() + self.options.deaf_after;
        while self.fence.is_some() {
            match tokio::time::timeout_at(deadline, live.notifications.recv()).await {
                Ok(Some(Ok(incoming))) => self.on_incoming(&incoming),
                Ok(Some(Err(e))) => return Err(Error::ConnectionLost(e)),
                Ok(None) => return Err(Error::ConnectionLost("listening connection closed".into())),
                Err(_) => return Err(Error::NotifyUnavailable(crate::db::describe(&self.config))),
            }
        }
        tracing::info!(target = %crate::db::describe(&self.config), channels = ?self.channels, "listening");
        Ok(())
    }

    /// Runs until the listener goes away: pumps, and reconnects with capped
    /// exponential backoff whenever the connection is lost or deaf.
    pub async fn run(mut self, mut live: Live) {
        let mut backoff = crate::Backoff::new(self.options.backoff_min, self.options.backoff_max);
        loop {
            self.set_state(ConnectionState::Listening);
            match self.pump(&mut live).await {
                Stop::Shutdown => return,
                Stop::Lost(reason) => {
                    tracing::warn!(%reason, "listening connection lost; reconnecting");
                    self.set_state(ConnectionState::Reconnecting { attempt: 0, error: reason });
                }
            }
            self.out.foreign.connection_lost();
            self.fence = None;
            live = loop {
                let opened = match self.open().await {
                    Ok(mut l) => self.prove(&mut l).await.map(|()| l),
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(l) => break l,
                    Err(e) => {
                        let delay = backoff.next_delay();
                        let attempt = backoff.attempt();
                        tracing::warn!(error = %e, attempt, retry_in = ?delay, "reconnect failed");
                        self.set_state(ConnectionState::Reconnecting { attempt, error: e.to_string() });
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = self.out.foreign.closed() => return,
                        }
                    }
                }
            };
            Stats::bump(&self.stats.reconnects);
            tracing::info!(attempt = backoff.attempt(), "reconnected");
            // Wake-ups sent while we were away are lost: read the log.
            self.out.wake.raise(false);
            backoff.reset();
        }
    }

    /// Publishes a state only when it differs, so watchers see transitions.
    fn set_state(&self, state: ConnectionState) {
        self.out.state.send_if_modified(|now| {
            let changed = *now != state;
            *now = state;
            changed
        });
    }

    async fn pump(&mut self, live: &mut Live) -> Stop {
        let mut tick = tokio::time::interval(self.options.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.last_fence_ok = Instant::now();
        loop {
            tokio::select! {
                n = live.notifications.recv() => match n {
                    Some(Ok(incoming)) => self.on_incoming(&incoming),
                    Some(Err(e)) => return Stop::Lost(e),
                    None => return Stop::Lost("listening connection closed".into()),
                },
                command = self.commands.recv() => match command {
                    Some(c) => {
                        if let Err(e) = self.on_command(&live.client, c).await {
                            return Stop::Lost(e.to_string());
                        }
                    }
                    None => return Stop::Shutdown,
                },
                _ = tick.tick() => {
                    if let Some(stop) = self.on_tick().await {
                        return stop;
                    }
                }
                () = self.out.foreign.closed() => return Stop::Shutdown,
            }
        }
    }

    /// LISTEN or UNLISTEN on the open connection; the channel list is what a
    /// reconnect listens to.
    async fn on_command(&mut self, client: &Client, command: Command) -> Result<()> {
        // The wake and fence channels are the listener's own: never changed
        // by a caller's add or remove.
        if matches!(&command, Command::Listen(c) | Command::Unlisten(c) if c.is_reserved()) {
            return Ok(());
        }
        let sql = match command {
            Command::Listen(c) => {
                if self.channels.contains(&c) {
                    return Ok(());
                }
                let sql = format!("LISTEN {}", c.quoted());
                self.channels.push(c);
                sql
            }
            Command::Unlisten(c) => {
                self.channels.retain(|x| *x != c);
                format!("UNLISTEN {}", c.quoted())
            }
        };
        client.batch_execute(&sql).await.map_err(|e| Error::db("LISTEN", e))
    }

    async fn on_tick(&mut self) -> Option<Stop> {
        self.out.foreign.expire();
        if let Some((_, sent)) = &self.fence {
            let waited = sent.elapsed();
            if waited >= self.options.deaf_after {
                return Some(Stop::Lost(format!("heartbeat not back after {waited:?}: the connection is deaf")));
            }
            return None;
        }
        if let Err(e) = self.send_fence().await {
            tracing::warn!(error = %e, "heartbeat failed");
            if self.last_fence_ok.elapsed() >= self.options.deaf_after {
                return Some(Stop::Lost(format!("no heartbeat for {:?}: {e}", self.last_fence_ok.elapsed())));
            }
        }
        None
    }

    async fn send_fence(&mut self) -> Result<()> {
        self.fence_counter += 1;
        let token = self.fence_counter.to_string();
        let info = self.log.fence(self.fence_channel.as_str(), &token).await?;
        self.stats.set_queue_usage(info.queue_usage);
        if info.queue_usage >= self.options.queue_warn {
            tracing::warn!(
                usage = format!("{:.1}%", info.queue_usage * 100.0),
                "the NOTIFY queue is filling: a listener somewhere is not reading, or a session sits idle in \
                 a transaction; at 100% every NOTIFY in the cluster fails"
            );
        }
        self.fence = Some((token, Instant::now()));
        Ok(())
    }

    fn on_incoming(&mut self, incoming: &Incoming) {
        match incoming {
            Incoming::Notification(n) => self.on_notification(n),
            Incoming::Pause => self.out.foreign.end_batch(),
        }
    }

    fn on_notification(&mut self, n: &Notification) {
        let channel = n.channel();
        if channel == self.fence_channel.as_str() {
            if let Some((token, sent)) = self.fence.take() {
                if token == n.payload() {
                    self.last_fence_ok = Instant::now();
                    self.stats.set_heartbeat_rtt(sent.elapsed());
                } else {
                    self.fence = Some((token, sent));
                }
            }
            return;
        }
        Stats::bump(&self.stats.notifications);
        if channel == WAKE_CHANNEL {
            self.wake(n.payload().starts_with(CAPTURE_WAKE));
            return;
        }
        self.sort(channel, n.payload());
    }

    /// A wake-up; `capturer`: the capturer's, after an append.
    fn wake(&self, capturer: bool) {
        Stats::bump(&self.stats.wakeups);
        self.out.wake.raise(capturer);
    }

    /// Hands a foreign notification on, wakes the listener, or counts bad
    /// input.
    fn sort(&mut self, channel: &str, payload: &str) {
        match wire::parse(payload) {
            Ok(Frame::Whole(text)) => {
                if text.is_empty() || Event::is_ours(channel, text) {
                    // An inline watch's event (or one shaped like it): the
                    // log has the real one.
                    self.wake(false);
                } else {
                    self.out.foreign.text(channel, text);
                }
            }
            Ok(Frame::Chunk(_) | Frame::Ref { .. }) => self.wake(false),
            Ok(Frame::SeedPart { id, offset, data }) => self.out.foreign.seed_part(channel, id, offset, data),
            Ok(Frame::SeedEof { id }) => self.out.foreign.seed_eof(channel, id),
            Err(e) => {
                Stats::bump(&self.stats.malformed);
                tracing::warn!(channel, error = %e, len = payload.len(), "malformed notification skipped");
            }
        }
    }
}
