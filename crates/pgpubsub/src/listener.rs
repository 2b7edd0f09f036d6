//! The listener: one dedicated connection that LISTENs on every channel,
//! decodes each notification, reassembles chunks, fetches references from the
//! log, and hands typed [`Event`]s to its subscriber.
//!
//! Two tasks run per listener:
//! - the *driver* polls the connection and forwards notifications into a
//!   bounded queue (`NOTIFY_QUEUE`); when that is full it stops reading the
//!   socket, so the backlog waits in Postgres' own notification queue, not in
//!   our memory;
//! - the *decoder* turns notifications into events and sends them to the
//!   subscriber through a bounded queue (`ListenerOptions::buffer`). It reads
//!   referenced events over a second, lazily opened connection, because a
//!   query on the listening connection could wait behind the very
//!   notifications it is meant to make room for.
//!
//! Both end when the [`Listener`] is dropped or the connection is lost; the
//! latter is reported as a last [`Error::ConnectionLost`] item.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Notification};

use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::reassembly::{Limits, Reassembler};
use crate::stats::Stats;
use crate::wire::{self, Frame};

/// Notifications read from the socket but not yet decoded.
const NOTIFY_QUEUE: usize = 4096;

/// How a listener behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ListenerOptions {
    /// Bounds on chunk reassembly.
    pub limits: Limits,
    /// Events decoded but not yet taken by the subscriber. When full, the
    /// listener waits (and Postgres queues) rather than grow.
    pub buffer: usize,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            limits: Limits::default(),
            buffer: 1024,
        }
    }
}

impl ListenerOptions {
    /// Sets the reassembly bounds.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the subscriber buffer (at least 1).
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.max(1);
        self
    }
}

/// A stream of events from one or more channels.
///
/// Yields `Ok(event)` for each event in arrival (commit) order per channel,
/// and a final `Err(Error::ConnectionLost)` if the connection dies.
pub struct Listener {
    events: mpsc::Receiver<Result<Event>>,
    stats: Arc<Stats>,
    channels: Vec<Channel>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Connects, LISTENs on `channels` and starts delivering.
    ///
    /// Returns once every LISTEN is in place: whatever commits after this
    /// returns is received.
    ///
    /// # Errors
    /// [`Error::Connect`] when the database cannot be reached;
    /// [`Error::Db`] when LISTEN is refused.
    pub async fn connect(
        config: &Config,
        channels: &[Channel],
        options: ListenerOptions,
    ) -> Result<Listener> {
        let (client, mut connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| Error::Connect {
                    target: crate::db::describe(config),
                    source,
                })?;

        let (notify_tx, notify_rx) = mpsc::channel::<Result<Notification, String>>(NOTIFY_QUEUE);
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    () = notify_tx.closed() => break,
                };
                let item = match next {
                    Some(Ok(AsyncMessage::Notification(n))) => Ok(n),
                    Some(Ok(AsyncMessage::Notice(n))) => {
                        tracing::debug!(notice = %n.message(), "notice on listening connection");
                        continue;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("server closed the connection".to_string()),
                };
                let failed = item.is_err();
                if notify_tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });

        let sql: String = channels
            .iter()
            .map(|c| format!("LISTEN {};", c.quoted()))
            .collect();
        if !sql.is_empty() {
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| Error::db("LISTEN", e))?;
        }
        tracing::info!(target = %crate::db::describe(config), channels = ?channels, "listening");

        let stats = Arc::new(Stats::default());
        let (events_tx, events) = mpsc::channel(options.buffer.max(1));
        let decoder = Decoder {
            _client: client,
            config: config.clone(),
            log: None,
            reassembler: Reassembler::new(options.limits.clone(), stats.clone()),
            max_event_bytes: options.limits.max_event_bytes,
            stats: stats.clone(),
            out: events_tx,
        };
        tokio::spawn(decoder.run(notify_rx));
        Ok(Listener {
            events,
            stats,
            channels: channels.to_vec(),
        })
    }

    /// The next event; `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<Result<Event>> {
        self.events.recv().await
    }

    /// The next event if one is ready now, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Event>> {
        self.events.try_recv().ok()
    }

    /// This listener's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The channels listened on.
    pub fn channels(&self) -> &[Channel] {
        &self.channels
    }
}

impl Stream for Listener {
    type Item = Result<Event>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

/// The decoding task's state.
struct Decoder {
    /// Keeps the listening connection (and its LISTENs) alive.
    _client: Client,
    config: Config,
    /// Connection for reading referenced events, opened on first use.
    log: Option<Client>,
    reassembler: Reassembler,
    max_event_bytes: u64,
    stats: Arc<Stats>,
    out: mpsc::Sender<Result<Event>>,
}

impl Decoder {
    async fn run(mut self, mut notifications: mpsc::Receiver<Result<Notification, String>>) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let item = tokio::select! {
                item = notifications.recv() => item,
                _ = sweep.tick() => {
                    self.reassembler.expire(Instant::now());
                    continue;
                }
                () = self.out.closed() => return,
            };
            let n = match item {
                Some(Ok(n)) => n,
                Some(Err(reason)) => {
                    tracing::warn!(%reason, "listening connection lost");
                    let _ = self.out.send(Err(Error::ConnectionLost(reason))).await;
                    return;
                }
                None => return,
            };
            Stats::bump(&self.stats.notifications);
            if let Some(event) = self.handle(n.channel(), n.payload()).await {
                Stats::bump(&self.stats.events);
                if self.out.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Turns one notification into an event, or `None` when it is a chunk
    /// still waiting for others, or bad input (warned and counted).
    async fn handle(&mut self, channel: &str, payload: &str) -> Option<Event> {
        let now = Instant::now();
        let text = match wire::parse(payload) {
            Ok(Frame::Whole(text)) => text.to_string(),
            Ok(Frame::Chunk(c)) => self.reassembler.push_chunk(channel, &c, now)?,
            Ok(Frame::SeedPart { id, offset, data }) => self
                .reassembler
                .push_seed_part(channel, id, offset, data, now)?,
            Ok(Frame::SeedEof { id }) => self.reassembler.push_seed_eof(channel, id, now)?,
            Ok(Frame::Ref { seq, bytes }) => self.fetch(channel, seq, bytes).await?,
            Err(e) => {
                Stats::bump(&self.stats.malformed);
                tracing::warn!(channel, error = %e, len = payload.len(), "malformed notification skipped");
                return None;
            }
        };
        match Event::decode(channel, text) {
            Ok(event) => Some(event),
            Err(e) => {
                Stats::bump(&self.stats.not_json);
                tracing::warn!(channel, error = %e, "notification is not JSON; skipped");
                None
            }
        }
    }

    /// Reads a referenced event from the log.
    async fn fetch(&mut self, channel: &str, seq: i64, bytes: u64) -> Option<String> {
        if bytes > self.max_event_bytes {
            Stats::bump(&self.stats.oversize);
            tracing::warn!(
                channel,
                seq,
                bytes,
                "referenced event over max_event_bytes; dropped"
            );
            return None;
        }
        match self.read_log(channel, seq).await {
            Ok(Some(body)) if body.len() as u64 == bytes => {
                Stats::bump(&self.stats.fetched);
                Some(body)
            }
            Ok(found) => {
                Stats::bump(&self.stats.fetch_failed);
                let found = found.map(|b| b.len());
                tracing::warn!(
                    channel,
                    seq,
                    bytes,
                    ?found,
                    "referenced event missing from the log or of another size"
                );
                None
            }
            Err(e) => {
                Stats::bump(&self.stats.fetch_failed);
                tracing::warn!(channel, seq, error = %e, "could not read referenced event");
                self.log = None;
                None
            }
        }
    }

    async fn read_log(&mut self, channel: &str, seq: i64) -> Result<Option<String>> {
        if self.log.as_ref().is_none_or(Client::is_closed) {
            self.log = Some(crate::db::connect(&self.config).await?);
        }
        let Some(log) = &self.log else {
            return Ok(None);
        };
        let row = log
            .query_opt(
                "SELECT body FROM pubsub.events WHERE seq = $1 AND channel = $2",
                &[&seq, &channel],
            )
            .await
            .map_err(|e| Error::db("reading a referenced event", e))?;
        Ok(row.map(|r| r.get(0)))
    }
}
