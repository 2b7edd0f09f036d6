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
//! - A dead NATS is noticed at once when its connection closes, and within
//!   [`NATS_PING`] × 3 when it goes silent (the client pings; two pings
//!   unanswered when the third is due drop the connection). Meanwhile the
//!   source is `Reconnecting` and `/readyz` answers 503; once the client is
//!   connected again the consumer is re-created at once from where it was.
//! - A resuming subscriber reads the stream from its position up to where
//!   the hub stood when it subscribed, then goes on live from the hub, with
//!   nothing missed or repeated ([`StreamReplay`], in the library's
//!   [`pgpubsub::Feed`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures_util::StreamExt;
use pgpubsub::hub::Shared;
use pgpubsub::{ConnectionState, Cursor, Event, Hub, Replay, ReplayPage, Replayed, Stats};
use tokio::sync::watch;

/// How long a read of the stream may wait before it is given up.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the NATS client pings the server: a server silent for three
/// pings is taken as gone (async-nats allows two outstanding).
pub const NATS_PING: Duration = Duration::from_secs(2);

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
    /// Signalled when the client has (re)connected: the hub's consumer is
    /// re-created from where it was, not left to notice by itself.
    connected: Arc<tokio::sync::Notify>,
}

/// The position of a stream message, as a cursor (transaction 0).
pub fn position(stream_sequence: u64) -> Cursor {
    Cursor { txid: 0, seq: i64::try_from(stream_sequence).unwrap_or(i64::MAX) }
}

impl Source {
    /// Connects to NATS and finds the stream (written by `pgpubsub bridge`).
    /// `state` turns `Reconnecting` as soon as the client loses NATS.
    ///
    /// # Errors
    /// When NATS does not answer or the stream does not exist.
    pub async fn connect(
        url: &str,
        stream: &str,
        prefix: &str,
        state: Arc<watch::Sender<ConnectionState>>,
    ) -> anyhow::Result<Source> {
        let connected = Arc::new(tokio::sync::Notify::new());
        let on_event = connected.clone();
        let options = async_nats::ConnectOptions::new()
            .name("pgpubsub serve")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(NATS_PING)
            .reconnect_delay_callback(|attempt| {
                pgpubsub::Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).nth(attempt)
            })
            .event_callback(move |event| {
                let (state, connected) = (state.clone(), on_event.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => connected.notify_one(),
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS disconnected; reconnecting");
                            let error = "NATS disconnected".to_string();
                            state.send_replace(ConnectionState::Reconnecting { attempt: 0, error });
                        }
                        other => tracing::info!(event = %other, "NATS"),
                    }
                }
            });
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
        Ok(Source { stream, prefix: prefix.to_string(), start, url: url.to_string(), connected })
    }

    /// The stream's last sequence when the gateway started.
    pub fn start(&self) -> u64 {
        self.start
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

    /// The stream message at `seq` as an event; `None` for one that is not
    /// an event of ours (counted, and said).
    fn event(&self, message: &jetstream::Message, seq: u64, stats: &Stats) -> Option<Event> {
        let channel = message.subject.as_str().strip_prefix(&self.prefix).and_then(|c| c.strip_prefix('.'));
        let text = std::str::from_utf8(&message.payload).ok().map(str::to_string);
        match channel.zip(text).map(|(channel, text)| Event::decode(channel, text)) {
            Some(Ok(event)) if event.seq.is_some() => Some(event),
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
/// the last message read; a reconnected client re-creates the consumer at
/// once.
pub async fn feed_hub(hub: Hub, source: Arc<Source>, state: Arc<watch::Sender<ConnectionState>>, stats: Arc<Stats>) {
    let mut last = source.start;
    let mut attempt = 0u32;
    loop {
        let failure = tokio::select! {
            failure = follow(&hub, &source, &state, &stats, &mut last, &mut attempt) => failure,
            () = source.connected.notified() => {
                // From where it was, without waiting for the old consumer
                // to notice that its connection went away.
                attempt = 0;
                continue;
            }
        };
        let Some(failure) = failure else { return };
        if state.is_closed() {
            return;
        }
        attempt += 1;
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %format!("{failure:#}"), attempt, "the NATS source failed; retrying");
        state.send_replace(ConnectionState::Reconnecting { attempt, error: format!("{failure:#}") });
        let retry = pgpubsub::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        tokio::time::sleep(retry.nth(attempt.saturating_sub(1) as usize)).await;
    }
}

/// Reads the stream after `last` into the hub until it fails (the error) or
/// the server is gone (`None`).
async fn follow(
    hub: &Hub,
    source: &Source,
    state: &watch::Sender<ConnectionState>,
    stats: &Stats,
    last: &mut u64,
    attempt: &mut u32,
) -> Option<anyhow::Error> {
    let consumer = match source.read_from(*last + 1, None).await {
        Ok(consumer) => consumer,
        Err(e) => return Some(e),
    };
    let mut messages = match consumer.messages().await {
        Ok(messages) => messages,
        Err(e) => return Some(anyhow::Error::new(e).context("reading the stream")),
    };
    *attempt = 0;
    state.send_replace(ConnectionState::Listening);
    loop {
        match messages.next().await {
            Some(Ok(message)) => {
                let seq = message.info().map_or(0, |i| i.stream_sequence);
                if seq <= *last {
                    continue;
                }
                // Past it, even when it is not an event (counted once).
                *last = seq;
                let Some(event) = source.event(&message, seq, stats) else { continue };
                stats.events.fetch_add(1, Ordering::Relaxed);
                super::ops::observe_delivery(&event);
                hub.publish_at(event, position(seq));
            }
            Some(Err(e)) => return Some(anyhow::Error::new(e).context("reading the stream")),
            None => return Some(anyhow::anyhow!("the stream's consumer ended")),
        }
        if state.is_closed() {
            return None;
        }
    }
}

/// What a resuming subscriber missed, read from the stream up to where the
/// hub stood when it subscribed (the hub has the rest): the library's
/// [`pgpubsub::Feed`] replays it, then goes on live.
pub struct StreamReplay {
    source: Arc<Source>,
    /// The position to resume after.
    since: Cursor,
    /// One channel's subject, when the subscriber asked for one.
    channel: Option<String>,
    /// Whether the first page (where to start) was read.
    opened: bool,
    reading: Option<Reading>,
    stats: Arc<Stats>,
}

/// An open read of the stream.
struct Reading {
    messages: futures_util::stream::BoxStream<'static, anyhow::Result<jetstream::Message>>,
    /// The last stream sequence to replay.
    upto: u64,
}

impl StreamReplay {
    /// A replay of `channels` (all when empty) after `since`; messages that
    /// are not events are counted in `stats`.
    pub fn new(source: Arc<Source>, since: Cursor, channels: &[String], stats: Arc<Stats>) -> StreamReplay {
        let channel = match channels {
            [one] => Some(one.clone()),
            _ => None,
        };
        StreamReplay { source, since, channel, opened: false, reading: None, stats }
    }

    /// The first page: where the replay starts, what is gone.
    async fn open(&mut self, live_from: Cursor) -> anyhow::Result<ReplayPage> {
        // Until the hub's first event its position is 0: the stream's end at
        // start is where the hub begins.
        let upto = u64::try_from(live_from.seq).unwrap_or(0).max(self.source.start);
        let caught_up = ReplayPage { position: position(upto), caught_up: true, ..ReplayPage::default() };
        // `since` is a stream position below (txid 0): the page's positions
        // never go back past it.
        if self.since.txid != 0 {
            // A position in PostgreSQL's log (from a gateway fed by it): the
            // stream cannot say where that is. Reload, then live.
            return Ok(ReplayPage { gone: Some((self.since, position(upto))), ..caught_up });
        }
        let from = u64::try_from(self.since.seq).unwrap_or(0) + 1;
        if from > upto {
            return Ok(caught_up);
        }
        let mut stream = self.source.stream.clone();
        let first = stream.info().await.context("reading the stream's state")?.state.first_sequence;
        // Gone from the stream (its max age or size): say so, go on from
        // the oldest kept.
        let gone = (from < first).then(|| (self.since, position(first.saturating_sub(1))));
        let consumer = self.source.read_from(from.max(first), self.channel.as_deref()).await?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(ReplayPage { gone, ..caught_up });
        }
        let messages = consumer.messages().await.context("reading the stream")?;
        let messages = messages.map(|m| m.map_err(|e| anyhow::Error::new(e).context("reading the stream")));
        self.reading = Some(Reading { messages: messages.boxed(), upto });
        Ok(ReplayPage { gone, position: self.since.max(position(first.saturating_sub(1))), ..ReplayPage::default() })
    }

    /// The next page: the messages ready now (at least one), up to `upto`.
    async fn read(&mut self) -> anyhow::Result<ReplayPage> {
        let Some(reading) = &mut self.reading else {
            return Ok(ReplayPage { caught_up: true, ..ReplayPage::default() });
        };
        let mut page = ReplayPage::default();
        let mut first = true;
        loop {
            let next = match std::mem::replace(&mut first, false) {
                // Wait for the first message of a page...
                true => tokio::time::timeout(READ_TIMEOUT, reading.messages.next())
                    .await
                    .map_err(|_| anyhow::anyhow!("the stream did not answer within {READ_TIMEOUT:?}"))?,
                // ...then take what is ready.
                false => match futures_util::FutureExt::now_or_never(reading.messages.next()) {
                    Some(next) => next,
                    None => return Ok(page),
                },
            };
            let message = next.context("the stream's consumer ended")??;
            let info = message.info().map_err(|e| anyhow::anyhow!("a stream message without its metadata: {e}"))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > reading.upto {
                // The hub has it, and everything after.
                page.caught_up = true;
                return Ok(page);
            }
            page.position = position(seq);
            if let Some(event) = self.source.event(&message, seq, &self.stats) {
                let shared = Arc::new(Shared::new(event, position(seq)));
                page.events.push(Replayed { shared, comes_live: false });
            }
            if pending == 0 || seq == reading.upto || page.events.len() >= 500 {
                page.caught_up = pending == 0 || seq == reading.upto;
                return Ok(page);
            }
        }
    }
}

impl Replay for StreamReplay {
    fn next_page(
        &mut self,
        live_from: Cursor,
    ) -> Pin<Box<dyn Future<Output = pgpubsub::Result<ReplayPage>> + Send + '_>> {
        Box::pin(async move {
            let page = if !self.opened {
                // Cancel-safe: `open` changes nothing before it succeeds, and
                // it is marked done only then (a cancelled or failed open is
                // tried again; skipping it would skip the replay).
                let page = self.open(live_from).await;
                self.opened = page.is_ok();
                page
            } else {
                self.read().await
            };
            page.map_err(|e| pgpubsub::Error::Replay(e.into()))
        })
    }
}
