//! `serve --source nats URL`: the gateway fed from the JetStream stream that
//! `pgpubsub bridge` writes, instead of from PostgreSQL. N gateways on N
//! machines then serve subscribers while PostgreSQL sees one bridge.
//! Publishing and the store still go to PostgreSQL: the log stays the source
//! of truth, and the bridge brings what is published back through the stream.
//!
//! Positions are the stream's: an event's id is `0:<stream sequence>` (the
//! cursor form, with transaction 0, which no PostgreSQL transaction has), the
//! same on every gateway of the stream, so a client resumes on any of them.
//!
//! - The hub is fed by one ordered consumer on `<prefix>.>`, from the
//!   stream's end at start, re-created from where it was after an outage
//!   ([`feed_hub`]).
//! - A resuming subscriber reads the stream from its position up to where
//!   the hub stood when it subscribed, then goes on live from the hub, with
//!   nothing missed or repeated ([`StreamFeed`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures_util::StreamExt;
use pgpubsub::hub::{Delivery, Shared, Subscription};
use pgpubsub::{ConnectionState, Cursor, Event, FeedItem as Item, Filter, Hub, Stats};
use tokio::sync::watch;

/// How long a read of the stream may wait before it is given up.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The stream the gateway reads.
pub struct Source {
    stream: jetstream::stream::Stream,
    /// Subjects are `<prefix>.<channel>`.
    prefix: String,
    /// The stream's last sequence when the gateway started: the hub has
    /// everything after it.
    start: u64,
    /// The NATS server, for the log line.
    pub url: String,
}

/// The position of a stream message, as a cursor (transaction 0).
pub fn position(stream_sequence: u64) -> Cursor {
    Cursor { txid: 0, seq: i64::try_from(stream_sequence).unwrap_or(i64::MAX) }
}

impl Source {
    /// Connects to NATS and finds the stream (written by `pgpubsub bridge`).
    ///
    /// # Errors
    /// When NATS does not answer or the stream does not exist.
    pub async fn connect(url: &str, stream: &str, prefix: &str) -> anyhow::Result<Source> {
        let options = async_nats::ConnectOptions::new()
            .name("pgpubsub serve")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5));
        let client = tokio::time::timeout(Duration::from_secs(10), options.connect(url))
            .await
            .map_err(|_| anyhow::anyhow!("NATS at {url} did not answer within 10 s"))?
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let js = jetstream::new(client);
        let mut stream = js
            .get_stream(stream)
            .await
            .with_context(|| format!("stream {stream} (start `pgpubsub bridge` first: it creates it)"))?;
        let start = stream.info().await.context("reading the stream's state")?.state.last_sequence;
        Ok(Source { stream, prefix: prefix.to_string(), start, url: url.to_string() })
    }

    /// An ordered consumer from `from` on, on one channel or all.
    async fn read_from(
        &self,
        from: u64,
        channel: Option<&str>,
    ) -> anyhow::Result<jetstream::consumer::Consumer<OrderedConfig>> {
        let filter_subject = match channel {
            Some(c) => format!("{}.{c}", self.prefix),
            None => format!("{}.>", self.prefix),
        };
        let config = OrderedConfig {
            filter_subject,
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from.max(1) },
            ..OrderedConfig::default()
        };
        self.stream.create_consumer(config).await.context("reading the stream")
    }

    /// A stream message as an event and its position; `None` for one that
    /// is not an event of ours (counted).
    fn event(&self, message: &jetstream::Message, stats: &Stats) -> Option<(Event, u64)> {
        let seq = message.info().ok()?.stream_sequence;
        let channel = message.subject.as_str().strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let text = std::str::from_utf8(&message.payload).ok().map(str::to_string);
        match text.map(|t| Event::decode(channel, t)) {
            Some(Ok(event)) if event.seq.is_some() => Some((event, seq)),
            _ => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(seq, subject = %message.subject, "a stream message that is not a pgpubsub event: skipped");
                None
            }
        }
    }
}

/// Feeds the hub from the stream, from its end at start on, until every
/// handle to the hub's server is gone. Outages are retried, going on from
/// the last message read.
pub async fn feed_hub(hub: Hub, source: Arc<Source>, state: watch::Sender<ConnectionState>, stats: Arc<Stats>) {
    let mut last = source.start;
    let mut attempt = 0u32;
    loop {
        let failure = match source.read_from(last + 1, None).await {
            Err(e) => e,
            Ok(consumer) => match consumer.messages().await {
                Err(e) => anyhow::Error::new(e).context("reading the stream"),
                Ok(mut messages) => {
                    attempt = 0;
                    state.send_replace(ConnectionState::Listening);
                    loop {
                        match messages.next().await {
                            Some(Ok(message)) => {
                                let Some((event, seq)) = source.event(&message, &stats) else { continue };
                                if seq <= last {
                                    continue;
                                }
                                last = seq;
                                stats.events.fetch_add(1, Ordering::Relaxed);
                                hub.publish_at(event, position(seq));
                            }
                            Some(Err(e)) => break anyhow::Error::new(e).context("reading the stream"),
                            None => break anyhow::anyhow!("the stream's consumer ended"),
                        }
                        if state.is_closed() {
                            return;
                        }
                    }
                }
            },
        };
        if state.is_closed() {
            return;
        }
        attempt += 1;
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %format!("{failure:#}"), attempt, "the NATS source failed; retrying");
        state.send_replace(ConnectionState::Reconnecting { attempt, error: format!("{failure:#}") });
        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10)))).await;
    }
}

/// A subscriber's feed from the stream: what came after its position, read
/// from the stream, then the hub's live events.
pub struct StreamFeed {
    filter: Filter,
    sub: Subscription,
    /// Reading the stream; `None` once caught up.
    replay: Option<futures_util::stream::BoxStream<'static, anyhow::Result<(Event, u64, u64)>>>,
    /// The last stream sequence the replay covers: the hub has the rest.
    upto: u64,
    backlog: VecDeque<Item>,
    position: Cursor,
}

impl StreamFeed {
    /// Subscribes to `hub` now; with `since`, first reads the stream after
    /// it.
    ///
    /// # Errors
    /// When the stream cannot be read.
    pub async fn new(source: &Arc<Source>, hub: &Hub, filter: Filter, since: Option<Cursor>) -> anyhow::Result<Self> {
        let (sub, at) = hub.subscribe_at(filter.clone());
        // Until the hub's first event its position is 0: the stream's end at
        // start is where the hub begins.
        let upto = u64::try_from(at.seq).unwrap_or(0).max(source.start);
        let mut feed =
            StreamFeed { filter, sub, replay: None, upto, backlog: VecDeque::new(), position: position(upto) };
        let Some(since) = since else { return Ok(feed) };
        if since.txid != 0 {
            // A position in PostgreSQL's log (from a gateway fed by it): the
            // stream cannot say where that is. Reload, then live.
            feed.backlog.push_back(Item::Resync { cursor: since, pruned: position(upto) });
            return Ok(feed);
        }
        let from = u64::try_from(since.seq).unwrap_or(0) + 1;
        feed.position = since;
        if from > upto {
            return Ok(feed);
        }
        let first = source.stream.clone().info().await.context("reading the stream's state")?.state.first_sequence;
        if from < first {
            // Gone from the stream (its max age or size): say so, go on
            // from the oldest kept.
            feed.backlog.push_back(Item::Resync { cursor: since, pruned: position(first.saturating_sub(1)) });
        }
        let channel = match feed.filter.channels.as_slice() {
            [one] => Some(one.as_str()),
            _ => None,
        };
        let consumer = source.read_from(from.max(first), channel).await?;
        let pending = consumer.cached_info().num_pending;
        if pending == 0 {
            return Ok(feed);
        }
        let messages = consumer.messages().await.context("reading the stream")?;
        let source = source.clone();
        let stats = Arc::new(Stats::default());
        let replay = messages.filter_map(move |m| {
            let out = match m {
                Err(e) => Some(Err(anyhow::Error::new(e).context("reading the stream"))),
                Ok(message) => {
                    let pending = message.info().map(|i| i.pending).unwrap_or(0);
                    source.event(&message, &stats).map(|(event, seq)| Ok((event, seq, pending)))
                }
            };
            std::future::ready(out)
        });
        feed.replay = Some(replay.boxed());
        Ok(feed)
    }

    /// The position of the last item handed out.
    pub fn position(&self) -> Cursor {
        self.position
    }

    /// The next item; `None` when the hub is gone. Cancel-safe.
    ///
    /// # Errors
    /// When the stream cannot be read.
    pub async fn next(&mut self) -> anyhow::Result<Option<Item>> {
        loop {
            if let Some(item) = self.pop_backlog() {
                return Ok(Some(item));
            }
            if let Some(replay) = &mut self.replay {
                let next = tokio::time::timeout(READ_TIMEOUT, replay.next()).await;
                match next {
                    Err(_) => {
                        self.replay = None;
                        anyhow::bail!("the stream did not answer within {READ_TIMEOUT:?}");
                    }
                    Ok(None) => self.replay = None,
                    Ok(Some(Err(e))) => {
                        self.replay = None;
                        return Err(e);
                    }
                    Ok(Some(Ok((event, seq, pending)))) => self.replayed(event, seq, pending),
                }
                continue;
            }
            let Some(d) = self.sub.recv().await else { return Ok(None) };
            if let Some(item) = self.on_delivery(d) {
                return Ok(Some(item));
            }
        }
    }

    /// The next item if one is ready without waiting (never during a
    /// catch-up).
    pub fn try_next(&mut self) -> Option<Item> {
        if let Some(item) = self.pop_backlog() {
            return Some(item);
        }
        if self.replay.is_some() {
            return None;
        }
        loop {
            let d = self.sub.try_recv()?;
            if let Some(item) = self.on_delivery(d) {
                return Some(item);
            }
        }
    }

    fn replayed(&mut self, event: Event, seq: u64, pending: u64) {
        if seq > self.upto {
            // The hub has it, and everything after.
            self.replay = None;
            return;
        }
        let shared = Arc::new(Shared::new(event, position(seq)));
        if self.filter.matches(&shared) {
            self.backlog.push_back(Item::Event { position: position(seq), shared });
        } else {
            self.position = self.position.max(position(seq));
        }
        if pending == 0 || seq == self.upto {
            self.replay = None;
        }
    }

    fn pop_backlog(&mut self) -> Option<Item> {
        let item = self.backlog.pop_front()?;
        if let Item::Event { position, .. } = &item {
            self.position = *position;
        }
        Some(item)
    }

    fn on_delivery(&mut self, d: Delivery) -> Option<Item> {
        match d {
            Delivery::Event(shared) => {
                self.position = self.position.max(shared.position);
                Some(Item::Event { position: self.position, shared })
            }
            Delivery::Lagged { missed, .. } => Some(Item::Lagged { missed, position: self.position }),
            _ => None,
        }
    }
}
