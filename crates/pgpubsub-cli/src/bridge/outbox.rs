//! The JetStream side of the bridge: events published in order with many in
//! flight, each confirmed only once JetStream acknowledged it, and retried,
//! never skipped, when anything fails.
//!
//! Two headers make re-sending safe:
//! - `Nats-Msg-Id` (the event's identity, see [`Prepared::new`]): JetStream
//!   drops a message whose id it stored within the stream's duplicate
//!   window, so an event sent again after a crash is stored once.
//! - `Nats-Expected-Last-Sequence`: each message says which stream sequence
//!   must be the last one when it is stored. Message k of a pipelined run
//!   can therefore only be stored right after message k-1. Without it, a
//!   connection lost mid-run can drop message k-1 while message k, still in
//!   the client's buffer, is sent on the new connection and stored: the
//!   retry of k-1 would then land after k, out of order. With it, k is
//!   refused instead, and the retry sends k-1, then k. JetStream checks the
//!   id first, so a duplicate is acknowledged as one whatever it expected.
//!
//! The second header assumes the bridge is the stream's only writer. Another
//! writer only costs retries (its messages move the last sequence), but it
//! could fill the place of a lost message and let the next one through: give
//! each bridge a stream of its own.
//!
//! After a failure the outbox reads the stream's last sequence and the
//! `Nats-Msg-Id` of its last message. When that message is one in flight,
//! stored by this outbox's chained send, everything before it is stored too
//! (the chain guarantees a prefix), so it is confirmed without being sent
//! again, whatever the duplicate window. The rest is sent again, chained
//! from the real last sequence.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::header::{NATS_EXPECTED_LAST_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::{jetstream, HeaderMap};
use bytes::Bytes;
use pgpubsub::{Cursor, Event};
use tokio::sync::watch;

use super::metrics::BridgeStats;

/// One event, ready to publish.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub subject: String,
    /// Every header but `Nats-Expected-Last-Sequence`, which depends on when
    /// it is sent.
    pub headers: HeaderMap,
    pub payload: Bytes,
    pub msg_id: String,
    pub seq: i64,
    /// The event's place in the log.
    pub at: Cursor,
    /// Bytes on the wire: payload and headers.
    pub size: usize,
}

impl Prepared {
    /// The message for `event` (`None` for a foreign notification, which has
    /// no place in the log and so no identity):
    /// - subject `<prefix>.<channel>` (channels are identifiers, so always a
    ///   valid single subject token);
    /// - payload: the event's JSON exactly as `pgpubsub listen --json`
    ///   prints it (without the newline);
    /// - `Nats-Msg-Id: <source>:<seq>`; headers `Pgpubsub-Seq`,
    ///   `Pgpubsub-Txid`, `Pgpubsub-Kind`, `Pgpubsub-Channel`, and for row
    ///   changes `Pgpubsub-Table` (schema.table) and `Pgpubsub-Op`.
    ///
    /// An event captured from the WAL also has the header `Pgpubsub-Lsn`
    /// (`X/Y:index`, its place in the source's WAL).
    pub fn new(event: &Event, prefix: &str, source: &str) -> Option<Prepared> {
        let seq = event.seq?;
        let at = Cursor { txid: event.txid.unwrap_or_default(), seq };
        let msg_id = format!("{source}:{seq}");
        let mut fields: Vec<(&str, String)> = vec![
            ("Pgpubsub-Seq", seq.to_string()),
            ("Pgpubsub-Kind", event.kind().to_string()),
            ("Pgpubsub-Channel", event.channel.clone()),
        ];
        if let Some(wal) = event.wal {
            fields.push(("Pgpubsub-Lsn", wal.to_string()));
        }
        if let Some(txid) = event.txid {
            fields.push(("Pgpubsub-Txid", txid.to_string()));
        }
        if let Some(change) = event.change() {
            fields.push(("Pgpubsub-Table", format!("{}.{}", change.schema, change.table)));
            fields.push(("Pgpubsub-Op", change.op.as_str().to_string()));
        }
        // "NATS/1.0\r\n", each "Name: value\r\n", the final "\r\n", and the
        // expected-sequence header added when sent.
        let mut header_bytes = 12 + "Nats-Msg-Id".len() + msg_id.len() + 4 + 56;
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, msg_id.as_str());
        for (name, value) in fields {
            header_bytes += name.len() + value.len() + 4;
            headers.insert(name, value);
        }
        let payload = Bytes::copy_from_slice(event.json().as_bytes());
        let size = payload.len() + header_bytes;
        Some(Prepared { subject: format!("{prefix}.{}", event.channel), headers, payload, msg_id, seq, at, size })
    }
}

/// How much may be in flight at once.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub messages: usize,
    pub bytes: usize,
}

/// An acknowledgement to wait for; its timeout starts when first polled.
type Ack = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

struct InFlight {
    msg: Prepared,
    /// The client's connection count when it was sent: if the connection is
    /// lost after that, its acknowledgement is likely lost with it.
    connection: u64,
    /// The last sequence it expected when last sent: stored by that send,
    /// it is at `expected + 1`.
    expected: u64,
    /// `None` when sending failed: handled as a failed acknowledgement.
    /// Polled in place (never taken out), so that a caller giving up on
    /// [`Outbox::confirm_oldest`] loses nothing.
    ack: Option<Ack>,
}

/// Publishes into one stream; see the module docs.
pub struct Outbox {
    js: jetstream::Context,
    client: async_nats::Client,
    /// Bumped on every disconnection of the client.
    disconnections: watch::Receiver<u64>,
    stream: jetstream::stream::Stream,
    /// The last sequence the stream will have when everything in flight is
    /// stored: what the next message expects.
    next_expected: u64,
    in_flight: VecDeque<InFlight>,
    bytes: usize,
    window: Window,
    stats: Arc<BridgeStats>,
    /// Since when publishing has been failing (for one warning per outage).
    failing_since: Option<Instant>,
}

impl Outbox {
    /// An outbox on `stream`, retrying until the stream can be read.
    pub async fn open(
        js: jetstream::Context,
        client: async_nats::Client,
        disconnections: watch::Receiver<u64>,
        stream: jetstream::stream::Stream,
        window: Window,
        stats: Arc<BridgeStats>,
    ) -> Outbox {
        let mut outbox = Outbox {
            js,
            client,
            disconnections,
            stream,
            next_expected: 0,
            in_flight: VecDeque::new(),
            bytes: 0,
            window,
            stats,
            failing_since: None,
        };
        let (last, _) = outbox.tail_until_read().await;
        outbox.next_expected = last;
        outbox
    }

    /// Whether another message may be sent now (always when none is in
    /// flight, whatever its size).
    pub fn has_room(&self) -> bool {
        self.in_flight.is_empty() || (self.in_flight.len() < self.window.messages && self.bytes < self.window.bytes)
    }

    /// Messages sent and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends `msg` after everything in flight; [`confirm_oldest`](Self::confirm_oldest)
    /// reports when it is stored.
    pub async fn publish(&mut self, msg: Prepared) {
        let expected = self.next_expected;
        let connection = *self.disconnections.borrow();
        let ack = self.send(&msg, expected).await;
        self.next_expected += 1;
        self.bytes += msg.size;
        self.in_flight.push_back(InFlight { msg, connection, expected, ack });
        BridgeStats::set(&self.stats.in_flight, self.in_flight.len() as u64);
    }

    async fn send(&self, msg: &Prepared, expected: u64) -> Option<Ack> {
        let mut headers = msg.headers.clone();
        headers.insert(NATS_EXPECTED_LAST_SEQUENCE, expected.to_string());
        match self.js.publish_with_headers(msg.subject.clone(), headers, msg.payload.clone()).await {
            Ok(ack) => Some(ack.into_future()),
            Err(e) => {
                tracing::debug!(seq = msg.seq, error = %e, "could not send");
                None
            }
        }
    }

    /// Waits until the oldest message in flight is stored, retrying as long
    /// as it takes. Returns the log positions of the events confirmed (empty
    /// when nothing was in flight).
    pub async fn confirm_oldest(&mut self) -> Vec<Cursor> {
        loop {
            let Some(head) = self.in_flight.front_mut() else { return Vec::new() };
            let sent_on = head.connection;
            let outcome = match head.ack.as_mut() {
                // An acknowledgement owed by a connection that is gone will
                // not come: fail now rather than after the ack timeout.
                Some(ack) => {
                    let mut disconnections = self.disconnections.clone();
                    tokio::select! {
                        biased;
                        outcome = ack => outcome,
                        _ = disconnections.wait_for(|n| *n != sent_on) =>
                            Err(PublishError::new(PublishErrorKind::BrokenPipe)),
                    }
                }
                None => Err(PublishError::new(PublishErrorKind::Other)),
            };
            match outcome {
                Ok(ack) => {
                    if ack.duplicate {
                        // The stream did not grow: what follows expected one
                        // too many and is refused, then sent again (below).
                        BridgeStats::bump(&self.stats.duplicates);
                    } else {
                        BridgeStats::bump(&self.stats.published);
                    }
                    let at = self.pop();
                    if let Some(since) = self.failing_since.take() {
                        tracing::info!(after = ?since.elapsed(), "JetStream accepts events again");
                    }
                    return vec![at];
                }
                Err(e) => {
                    let refused_in_turn = matches!(e.kind(), PublishErrorKind::WrongLastSequence);
                    if !refused_in_turn && self.failing_since.is_none() {
                        tracing::warn!(error = %e, in_flight = self.in_flight.len(),
                            "publishing to JetStream failed; sending the unacknowledged events again until it works");
                        self.failing_since = Some(Instant::now());
                    } else {
                        tracing::debug!(error = %e, "publish refused or failed; sending again");
                    }
                    BridgeStats::bump(&self.stats.retries);
                    let confirmed = self.resend().await;
                    if !confirmed.is_empty() {
                        return confirmed;
                    }
                }
            }
        }
    }

    fn pop(&mut self) -> Cursor {
        let Some(done) = self.in_flight.pop_front().map(|f| f.msg) else { return Cursor::default() };
        self.bytes = self.bytes.saturating_sub(done.size);
        BridgeStats::set(&self.stats.in_flight, self.in_flight.len() as u64);
        BridgeStats::set(&self.stats.last_seq, done.seq.max(0) as u64);
        done.at
    }

    /// After a failure: confirms what the stream already holds, sends the
    /// rest again chained from the stream's real last sequence. Returns the
    /// positions of the events confirmed without sending.
    async fn resend(&mut self) -> Vec<Cursor> {
        // Acknowledgements still pending may belong to messages the retry
        // sends again; the tail read below tells what is stored.
        for f in self.in_flight.iter_mut() {
            f.ack = None;
        }
        let (last, last_id) = self.tail_until_read().await;
        let mut confirmed = Vec::new();
        if let Some(id) = last_id {
            // Stored by our own chained send (not an earlier copy, say from
            // before a restart, which proves nothing about the others): then
            // everything before it in flight is stored too.
            let ours = |f: &InFlight| f.msg.msg_id == id && f.expected + 1 == last;
            if let Some(at) = self.in_flight.iter().position(ours) {
                for _ in 0..=at {
                    BridgeStats::bump(&self.stats.published);
                    confirmed.push(self.pop());
                }
            }
        }
        self.next_expected = last;
        let mut queue = std::mem::take(&mut self.in_flight);
        for f in queue.iter_mut() {
            f.connection = *self.disconnections.borrow();
            f.expected = self.next_expected;
            f.ack = self.send(&f.msg, f.expected).await;
            self.next_expected += 1;
        }
        self.in_flight = queue;
        confirmed
    }

    /// The stream's last sequence and its last message's `Nats-Msg-Id`,
    /// retried with capped backoff until read.
    async fn tail_until_read(&mut self) -> (u64, Option<String>) {
        let mut backoff = pgpubsub::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            // Nothing answers while disconnected: wait for the client to be
            // back rather than for a request to time out.
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.client.connection_state() != async_nats::connection::State::Connected
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match self.tail().await {
                Ok(tail) => return tail,
                Err(e) => {
                    let delay = backoff.next_delay();
                    let attempt = backoff.attempt();
                    if attempt == 1 || attempt % 20 == 0 {
                        tracing::warn!(error = %e, attempt, "cannot read the stream's state; retrying");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn tail(&mut self) -> Result<(u64, Option<String>), async_nats::Error> {
        let last = self.stream.info().await?.state.last_sequence;
        if last == 0 {
            return Ok((0, None));
        }
        match self.stream.get_raw_message(last).await {
            Ok(m) => Ok((last, m.headers.get(NATS_MESSAGE_ID).map(|v| v.as_str().to_string()))),
            // Deleted, purged or expired: nothing to recognise.
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok((last, None)),
            Err(e) => Err(e.into()),
        }
    }
}
