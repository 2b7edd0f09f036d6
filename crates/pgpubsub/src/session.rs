//! The reading task of a listener: owns the LISTEN connection, reconnects it,
//! proves it alive, and turns notifications into items for the subscriber.
//!
//! It never waits for the subscriber: when the subscriber's queue is full,
//! live events are dropped (they are in the log) and a [`Item::Gap`] is
//! queued as soon as there is room, so the subscriber catches up from the
//! log. The same happens after a reconnect, or when a chunked event cannot be
//! completed. Postgres' notification queue is therefore drained at the rate
//! the network allows, whatever the subscriber does.
//!
//! Every `heartbeat` it sends a fence (see [`LogConn::fence`]) through its
//! own channel; a fence that does not come back within `deaf_after` means the
//! connection is deaf (open, delivering nothing) and it is replaced.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::channel::Channel;
use crate::db::Config;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::listener::{ConnectionState, ListenerOptions};
use crate::log::{LogConn, Logged, Unreadable};
use crate::reassembly::Reassembler;
use crate::stats::Stats;
use crate::wire::{self, Frame};

/// Notifications read from the socket but not yet decoded.
const NOTIFY_QUEUE: usize = 4096;

/// References being read from the log at once, at most (one statement
/// each, pipelined on the log connection: the database reads the next while
/// this side renders and hands over the last).
const MAX_FETCHES: usize = 16;
/// ... and at most this many bytes of them, unless it is just one.
const MAX_FETCH_BYTES: u64 = 8 << 20;

/// One step of work in arrival order.
enum Step {
    /// An item to hand over as it is.
    Ready(Item),
    /// A referenced event read from the log.
    Fetched { channel: String, seq: i64, bytes: u64, found: Result<Option<Logged>> },
}

type Pending = Pin<Box<dyn Future<Output = Step> + Send>>;

/// What the reading task hands the subscriber side.
#[derive(Debug)]
pub(crate) enum Item {
    /// A live event.
    Event(Event),
    /// Every event of a transaction older than `xmin` has been queued before
    /// this.
    Fence { xmin: u64 },
    /// Something may have been missed here: catch up from the log.
    Gap,
}

/// Why the pump stopped.
enum Stop {
    Shutdown,
    Lost(String),
}

pub(crate) struct Session {
    config: Config,
    channels: Vec<Channel>,
    fence_channel: Channel,
    options: ListenerOptions,
    log: Arc<LogConn>,
    stats: Arc<Stats>,
    reassembler: Reassembler,
    out: mpsc::Sender<Item>,
    state: watch::Sender<ConnectionState>,
    /// Something was dropped; a Gap must reach the subscriber before more.
    gap_pending: bool,
    /// The fence in flight: (token, xmin, when sent).
    fence: Option<(String, u64, Instant)>,
    fence_counter: u64,
    last_fence_ok: Instant,
    /// Fetches under way, and anything that arrived after the first of
    /// them: handed over in the order the notifications came.
    inflight: FuturesOrdered<Pending>,
    /// Bytes of the references in `inflight`.
    inflight_bytes: u64,
}

/// An open LISTEN connection: its client (keeps the LISTENs alive) and its
/// notifications.
pub(crate) struct Live {
    _client: Client,
    notifications: mpsc::Receiver<Result<Notification, String>>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        channels: Vec<Channel>,
        fence_channel: Channel,
        options: ListenerOptions,
        log: Arc<LogConn>,
        stats: Arc<Stats>,
        out: mpsc::Sender<Item>,
        state: watch::Sender<ConnectionState>,
    ) -> Self {
        let reassembler = Reassembler::new(options.limits.clone(), stats.clone());
        Session {
            config,
            channels,
            fence_channel,
            options,
            log,
            stats,
            reassembler,
            out,
            state,
            gap_pending: false,
            fence: None,
            fence_counter: 0,
            last_fence_ok: Instant::now(),
            inflight: FuturesOrdered::new(),
            inflight_bytes: 0,
        }
    }

    /// Connects and LISTENs on every channel and the fence channel.
    ///
    /// # Errors
    /// Connection failures, a read replica, a refused LISTEN.
    /// (`&mut`: a session is `Send`, not `Sync`, for its fetches in flight.)
    pub async fn open(&mut self) -> Result<Live> {
        let connect = crate::db::open(&self.config);
        let (client, mut connection) = tokio::time::timeout(self.options.deaf_after, connect)
            .await
            .map_err(|_| Error::ConnectionLost(format!("connecting took over {:?}", self.options.deaf_after)))??;
        let (tx, notifications) = mpsc::channel(NOTIFY_QUEUE);
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    () = tx.closed() => break,
                };
                let item = match next {
                    Some(Ok(AsyncMessage::Notification(n))) => Ok(n),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("server closed the connection".to_string()),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        let recovering: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| Error::db("checking the server", e))?
            .get(0);
        if recovering {
            return Err(Error::ReadReplica(crate::db::describe(&self.config)));
        }
        let sql: String = self
            .channels
            .iter()
            .chain(std::iter::once(&self.fence_channel))
            .map(|c| format!("LISTEN {};", c.quoted()))
            .collect();
        client.batch_execute(&sql).await.map_err(|e| Error::db("LISTEN", e))?;
        Ok(Live { _client: client, notifications })
    }

    /// Waits until a fence goes round trip on a new connection: proof that
    /// notifications reach us (a transaction pooler accepts LISTEN and then
    /// delivers nothing). Events arriving meanwhile are queued as usual.
    ///
    /// # Errors
    /// [`Error::NotifyUnavailable`] when the fence does not return in time.
    pub async fn prove(&mut self, live: &mut Live) -> Result<()> {
        self.send_fence().await?;
        let deadline = tokio::time::Instant::now() + self.options.deaf_after;
        while self.fence.is_some() {
            let n = match tokio::time::timeout_at(deadline, live.notifications.recv()).await {
                Ok(Some(Ok(n))) => n,
                Ok(Some(Err(e))) => return Err(Error::ConnectionLost(e)),
                Ok(None) => return Err(Error::ConnectionLost("listening connection closed".into())),
                Err(_) => return Err(Error::NotifyUnavailable(crate::db::describe(&self.config))),
            };
            self.on_notification(&n);
        }
        tracing::info!(target = %crate::db::describe(&self.config), channels = ?self.channels, "listening");
        Ok(())
    }

    /// Runs until the subscriber goes away: pumps, and reconnects with capped
    /// exponential backoff whenever the connection is lost or deaf.
    pub async fn run(mut self, mut live: Live) {
        let mut backoff = self.options.backoff_min;
        let mut attempt = 0u32;
        loop {
            self.set_state(ConnectionState::Listening);
            match self.pump(&mut live).await {
                Stop::Shutdown => return,
                Stop::Lost(reason) => {
                    // Owed from this moment: anything queued after this
                    // point (the new connection's proving fence included)
                    // must come after the Gap, or the subscriber's cursor
                    // would move past what was missed.
                    self.gap_pending = true;
                    tracing::warn!(%reason, "listening connection lost; reconnecting");
                    self.set_state(ConnectionState::Reconnecting { attempt: 0, error: reason });
                }
            }
            // Whatever was in flight is gone; the log has it.
            self.inflight = FuturesOrdered::new();
            self.inflight_bytes = 0;
            self.reassembler.clear();
            self.reassembler.take_losses();
            self.fence = None;
            live = loop {
                let opened = match self.open().await {
                    Ok(mut l) => self.prove(&mut l).await.map(|()| l),
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(l) => break l,
                    Err(e) => {
                        attempt += 1;
                        tracing::warn!(error = %e, attempt, retry_in = ?backoff, "reconnect failed");
                        self.set_state(ConnectionState::Reconnecting { attempt, error: e.to_string() });
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = self.out.closed() => return,
                        }
                        backoff = (backoff * 2).min(self.options.backoff_max);
                    }
                }
            };
            Stats::bump(&self.stats.reconnects);
            tracing::info!(attempt, "reconnected; catching up from the log");
            backoff = self.options.backoff_min;
            attempt = 0;
        }
    }

    /// Publishes a state only when it differs, so watchers see transitions.
    fn set_state(&self, state: ConnectionState) {
        self.state.send_if_modified(|now| {
            let changed = *now != state;
            *now = state;
            changed
        });
    }

    async fn pump(&mut self, live: &mut Live) -> Stop {
        /// What woke the pump; handled after the select so that handlers may
        /// borrow the session mutably.
        enum Wake {
            Notification(Option<Result<Notification, String>>),
            Step(Option<Step>),
            Room(bool),
            Tick,
            Closed,
        }
        let mut tick = tokio::time::interval(self.options.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.last_fence_ok = Instant::now();
        loop {
            let room = self.inflight.len() < MAX_FETCHES && self.inflight_bytes < MAX_FETCH_BYTES;
            let wake = tokio::select! {
                step = self.inflight.next(), if !self.inflight.is_empty() => Wake::Step(step),
                n = live.notifications.recv(), if room => Wake::Notification(n),
                permit = self.out.reserve(), if self.gap_pending => match permit {
                    Ok(p) => {
                        p.send(Item::Gap);
                        Wake::Room(true)
                    }
                    Err(_) => Wake::Room(false),
                },
                _ = tick.tick() => Wake::Tick,
                () = self.out.closed() => Wake::Closed,
            };
            match wake {
                Wake::Notification(Some(Ok(n))) => self.on_notification(&n),
                Wake::Step(Some(Step::Ready(item))) => self.push(item),
                Wake::Step(Some(Step::Fetched { channel, seq, bytes, found })) => {
                    self.inflight_bytes -= bytes;
                    if let Some(event) = self.fetched(&channel, seq, bytes, found) {
                        self.push(Item::Event(event));
                    }
                }
                Wake::Step(None) => {}
                Wake::Notification(Some(Err(e))) => return Stop::Lost(e),
                Wake::Notification(None) => return Stop::Lost("listening connection closed".into()),
                Wake::Room(true) => self.gap_pending = false,
                Wake::Room(false) | Wake::Closed => return Stop::Shutdown,
                Wake::Tick => {
                    if let Some(stop) = self.on_tick().await {
                        return stop;
                    }
                }
            }
        }
    }

    async fn on_tick(&mut self) -> Option<Stop> {
        if self.reassembler.expire(Instant::now()) > 0 {
            self.reassembler.take_losses();
            self.gap_pending = true;
        }
        if let Some((_, _, sent)) = &self.fence {
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
        self.fence = Some((token, info.xmin, Instant::now()));
        Ok(())
    }

    fn on_notification(&mut self, n: &Notification) {
        if n.channel() == self.fence_channel.as_str() {
            if let Some((token, xmin, sent)) = self.fence.take() {
                if token == n.payload() {
                    if self.reassembler.pending() > 0 {
                        // A chunked event is still incomplete: the cursor
                        // must not pass it, so catch up (from the log) first.
                        self.gap_pending = true;
                    }
                    self.last_fence_ok = Instant::now();
                    self.stats.set_heartbeat_rtt(sent.elapsed());
                    self.emit(Item::Fence { xmin });
                } else {
                    self.fence = Some((token, xmin, sent));
                }
            }
            return;
        }
        Stats::bump(&self.stats.notifications);
        if let Some(event) = self.decode(n.channel(), n.payload()) {
            self.emit(Item::Event(event));
        }
    }

    /// Hands `item` over now, or after the fetches before it.
    fn emit(&mut self, item: Item) {
        if self.inflight.is_empty() {
            self.push(item);
        } else {
            self.inflight.push_back(Box::pin(std::future::ready(Step::Ready(item))));
        }
    }

    /// Queues an item without waiting. When the subscriber's queue is full
    /// the item is dropped and a Gap is owed (events are in the log).
    fn push(&mut self, item: Item) {
        use mpsc::error::TrySendError;
        if self.gap_pending {
            match self.out.try_send(Item::Gap) {
                Ok(()) => self.gap_pending = false,
                Err(TrySendError::Full(_)) => {
                    if matches!(item, Item::Event(_)) {
                        Stats::bump(&self.stats.lagged);
                    }
                    return;
                }
                Err(TrySendError::Closed(_)) => return,
            }
        }
        match self.out.try_send(item) {
            Ok(()) => {}
            Err(TrySendError::Full(item)) => {
                if matches!(item, Item::Event(_)) {
                    Stats::bump(&self.stats.lagged);
                    if !self.gap_pending {
                        tracing::warn!("subscriber is behind; dropping live events and catching up from the log");
                    }
                }
                self.gap_pending = true;
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Turns one payload into an event, or `None` for a chunk still waiting
    /// for others, or bad input (warned and counted; a Gap is owed when the
    /// log may hold what was lost).
    fn decode(&mut self, channel: &str, payload: &str) -> Option<Event> {
        let now = Instant::now();
        let text = match wire::parse(payload) {
            Ok(Frame::Whole(text)) => Some(text.to_string()),
            Ok(Frame::Chunk(c)) => self.reassembler.push_chunk(channel, &c, now),
            Ok(Frame::SeedPart { id, offset, data }) => self.reassembler.push_seed_part(channel, id, offset, data, now),
            Ok(Frame::SeedEof { id }) => self.reassembler.push_seed_eof(channel, id, now),
            Ok(Frame::Ref { seq, bytes }) => {
                self.fetch(channel, seq, bytes);
                None
            }
            Err(e) => {
                Stats::bump(&self.stats.malformed);
                tracing::warn!(channel, error = %e, len = payload.len(), "malformed notification skipped");
                None
            }
        };
        if self.reassembler.take_losses() > 0 {
            // An event of ours may have been lost on the way: the log has it.
            self.gap_pending = true;
        }
        match Event::decode(channel, text?) {
            Ok(event) => Some(event),
            Err(e) => {
                Stats::bump(&self.stats.not_json);
                tracing::warn!(channel, error = %e, "notification is not JSON; skipped");
                None
            }
        }
    }

    /// Starts reading a referenced event from the log.
    fn fetch(&mut self, channel: &str, seq: i64, bytes: u64) {
        if bytes > self.options.limits.max_event_bytes {
            Stats::bump(&self.stats.oversize);
            tracing::warn!(channel, seq, bytes, "referenced event over max_event_bytes; dropped");
            return;
        }
        let (log, channel) = (self.log.clone(), channel.to_string());
        self.inflight_bytes += bytes;
        self.inflight.push_back(Box::pin(async move {
            let found = log.fetch(&channel, seq).await;
            Step::Fetched { channel, seq, bytes, found }
        }));
    }

    /// The event a finished fetch read, if it is whole and fits.
    fn fetched(&mut self, channel: &str, seq: i64, bytes: u64, found: Result<Option<Logged>>) -> Option<Event> {
        match found {
            Ok(Some(logged)) if logged.stored_len() == bytes => {
                match logged.into_event(channel, self.options.limits.max_event_bytes) {
                    Ok(event) => {
                        Stats::bump(&self.stats.fetched);
                        Some(event)
                    }
                    Err(Unreadable::TooLarge(json)) => {
                        Stats::bump(&self.stats.oversize);
                        tracing::warn!(channel, seq, bytes, json, "referenced event over max_event_bytes; dropped");
                        None
                    }
                    Err(Unreadable::NotAnEvent) => {
                        Stats::bump(&self.stats.not_json);
                        tracing::warn!(channel, seq, "referenced event is not an event of ours; skipped");
                        None
                    }
                }
            }
            Ok(found) => {
                Stats::bump(&self.stats.fetch_failed);
                let found = found.map(|b| b.stored_len());
                tracing::warn!(channel, seq, bytes, ?found, "referenced event missing from the log or of another size");
                None
            }
            Err(e) => {
                Stats::bump(&self.stats.fetch_failed);
                tracing::warn!(channel, seq, error = %e, "could not read referenced event; will catch up");
                self.gap_pending = true;
                None
            }
        }
    }
}
