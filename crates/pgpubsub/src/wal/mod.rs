//! Capture from the WAL: events of tables watched with `pubsub.watch_wal`
//! and messages of `pubsub.publish_wal`, read from a logical replication
//! slot (pgoutput) instead of the event log. No trigger runs in the
//! writer's transaction, so writers are not slowed by being watched
//! (docs/performance.md).
//!
//! Needs `wal_level = logical` and a role with `REPLICATION` (or superuser).
//! A [`WalListener`] streams its slot through pgwire-replication and renders
//! each change as an [`Event`] whose `lsn` is its transaction's commit LSN:
//!
//! - **Privileges.** The slot streams every table of the publication; a
//!   reader gets a table's changes only while its role may `SELECT` it,
//!   and messages only while it may `SELECT pubsub.wal_messages`.
//! - **Position.** A named reader ([`WalOptions::name`]) has a slot of its
//!   own, `pgpubsub_<name>`, kept by the server: it resumes after a restart
//!   from the last transaction it finished, and the server keeps the WAL
//!   it has not confirmed (mind `max_slot_wal_keep_size`). A transaction
//!   counts as finished when [`WalListener::recv`] is called again after
//!   its last event. An unnamed reader uses a temporary slot, gone with its
//!   connection: after a reconnect it goes on from the present, and counts
//!   the gap in [`Stats::resyncs`].
//! - **Order.** Transactions in commit order, each one's events in order.
//!   After a reconnect, transactions already delivered are skipped.

mod decode;
pub(crate) mod pgoutput;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio_postgres::config::Host;
use tokio_postgres::Client;

use self::decode::{Decoder, Txn};
use crate::channel::Channel;
use crate::db::{Config, RootCert, SslMode};
use crate::error::{Error, Result};
use crate::event::{Event, WalPosition};
use crate::stats::Stats;

/// The publications a reader streams: watched tables (and
/// pubsub.wal_watches), and messages.
const PUBLICATIONS: [&str; 2] = ["pgpubsub", "pgpubsub_messages"];

/// How a [`WalListener`] reads.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WalOptions {
    /// A durable reader's name: its slot is `pgpubsub_<name>`, created on
    /// first use and kept. Lowercase letters, digits and `_`, at most 54.
    /// `None`: a temporary slot.
    pub name: Option<String>,
    /// Channels to deliver; empty: every channel.
    pub channels: Vec<Channel>,
    /// How often the position is confirmed to the server.
    pub status_interval: Duration,
    /// Once caught up, how long to let the next changes gather before
    /// reading them (default 2 ms). The server sends every change as its
    /// own message; read one by one, each costs this process a wake-up.
    /// Lingering lets them pile up and arrive in one read: about half the
    /// CPU per event (docs/performance.md), at up to this much latency.
    pub linger: Duration,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            name: None,
            channels: Vec::new(),
            status_interval: Duration::from_secs(1),
            linger: Duration::from_millis(2),
        }
    }
}

impl WalOptions {
    /// A reader of `channels` (empty: all), named or not.
    pub fn new(name: Option<String>, channels: Vec<Channel>) -> Self {
        WalOptions { name, channels, ..WalOptions::default() }
    }
}

/// What the queue holds: events, and the end of each transaction, which is
/// confirmed to the server once the caller comes back for more after it.
enum Item {
    Event(Box<Event>),
    Commit(Lsn),
}

/// A reader of events from the WAL. See the [module](self) documentation.
pub struct WalListener {
    config: Config,
    repl: ReplicationConfig,
    temporary: bool,
    stream: ReplicationClient,
    side: Client,
    decoder: Decoder,
    queue: VecDeque<Item>,
    /// The transaction being read.
    txn: Option<Txn>,
    /// A message taken from the stream and not yet fully handled: kept
    /// here while its handling awaits (a privilege query), so that a `recv`
    /// cancelled then (by a `select!`) loses nothing; the next call handles
    /// it again.
    pending: Option<ReplicationEvent>,
    /// The place of the last event returned: after a reconnect the server
    /// sends again what was not confirmed, and every event at or before it
    /// is skipped (an event's place is the same every time it is read).
    returned: Option<WalPosition>,
    /// The end of the last transaction `try_recv` returned all of: confirmed
    /// by the next `recv`.
    unconfirmed: Option<Lsn>,
    /// The highest end confirmed (sent to the server within
    /// `status_interval`, or by `close`).
    confirmed: Option<Lsn>,
    linger: Duration,
    stats: Arc<Stats>,
}

/// The slot of a durable reader `name`.
fn slot_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 54
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(Error::Config(format!(
            "invalid WAL reader name {:?}: use 1 to 54 lowercase letters, digits or _ (it names a replication slot)",
            name.chars().take(64).collect::<String>()
        )));
    }
    Ok(format!("pgpubsub_{name}"))
}

/// The replication connection's settings, from the connection string.
fn replication_config(config: &Config, slot: &str, status_interval: Duration) -> Result<ReplicationConfig> {
    let pg = config.pg();
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".to_string(),
    };
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(&user).to_string();
    let root = || match &config.tls().root_cert {
        Some(RootCert::File(p)) => Some(p.clone()),
        Some(RootCert::System) | None => None,
    };
    let tls = match config.tls().mode {
        SslMode::Disable | SslMode::Allow => TlsConfig::disabled(),
        // TLS when the server offers it, as libpq's prefer (and the
        // statement connections) do.
        SslMode::Prefer => TlsConfig { mode: pgwire_replication::SslMode::Prefer, ..TlsConfig::disabled() },
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(root()),
        SslMode::VerifyFull => TlsConfig::verify_full(root()),
    };
    let tls = match (&config.tls().cert, &config.tls().key) {
        (Some(cert), Some(key)) => tls.with_client_cert(cert.clone(), key.clone()),
        _ => tls,
    };
    let publications: Vec<String> = PUBLICATIONS.iter().map(|p| p.to_string()).collect();
    Ok(ReplicationConfig::new(host, user, password, database, slot, publications)
        .with_port(pg.get_ports().first().copied().unwrap_or(5432))
        .with_tls(tls)
        .with_status_interval(status_interval)
        .with_application_name("pgpubsub wal")
        // Values are rendered by the server's output functions: make dates
        // ISO 8601 in UTC whatever the server's defaults (pgoutput.rs).
        .with_options("-c datestyle=ISO -c timezone=UTC"))
}

/// A replication error as ours, with the hint a user needs.
fn wal_error(context: &str, e: pgwire_replication::PgWireError) -> Error {
    let text = e.to_string();
    let hint = if text.contains("wal_level") {
        " (set wal_level = logical in postgresql.conf and restart the server)"
    } else if text.contains("replication role") || text.contains("permission denied to start WAL sender") {
        " (the role needs REPLICATION: ALTER ROLE … REPLICATION)"
    } else {
        ""
    };
    Error::Wal(format!("{context}: {text}{hint}"))
}

impl WalListener {
    /// Connects, creates the slot if it does not exist (a temporary one when
    /// unnamed), and starts streaming from it.
    ///
    /// # Errors
    /// [`Error::Wal`] when the server cannot stream (wal_level is not
    /// logical, the role lacks REPLICATION, the slot is in use);
    /// [`Error::Connect`] or [`Error::NotMigrated`] from the ordinary
    /// connection that checks privileges.
    pub async fn connect(config: &Config, options: WalOptions) -> Result<WalListener> {
        let (slot, temporary) = match &options.name {
            Some(name) => (slot_name(name)?, false),
            None => (format!("pgpubsub_tmp_{}_{:x}", std::process::id(), rand_suffix()), true),
        };
        let repl = replication_config(config, &slot, options.status_interval)?;
        // A small buffer: while this reader lingers, the replication task
        // stops reading once it is full, so the server's messages gather in
        // the socket instead of waking this process one by one.
        let repl = repl.with_buffer_size(16);
        let side = crate::db::connect(config).await?;
        // Fails early (and clearly) without the schema.
        channels(&side).await?;
        let wanted = options.channels.iter().map(|c| c.as_str().to_string()).collect();
        let stream = start(&repl, temporary).await?;
        // Read once the slot exists: a watch made since is in its stream.
        let channels = channels(&side).await?;
        tracing::info!(target = %crate::db::describe(config), slot = %repl.slot, "listening from the WAL");
        Ok(WalListener {
            config: config.clone(),
            repl,
            temporary,
            stream,
            side,
            decoder: Decoder::new(channels, wanted),
            queue: VecDeque::new(),
            txn: None,
            pending: None,
            returned: None,
            unconfirmed: None,
            confirmed: None,
            linger: options.linger,
            stats: Arc::new(Stats::default()),
        })
    }

    /// The counters of this reader: `events`, `malformed` (WAL messages
    /// that did not parse), `reconnects`, `resyncs` (gaps of an unnamed
    /// reader).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The replication slot this reader streams.
    pub fn slot(&self) -> &str {
        &self.repl.slot
    }

    /// The next event. Calling it again confirms the events before it
    /// (whole transactions) to the server. Reconnects by itself when the
    /// connection is lost; `None` never happens while the server is there.
    pub async fn recv(&mut self) -> Option<Result<Event>> {
        if let Some(end) = self.unconfirmed.take() {
            self.confirm(end);
        }
        loop {
            match self.queue.pop_front() {
                Some(Item::Event(e)) => return Some(Ok(self.returning(*e))),
                Some(Item::Commit(end)) => {
                    self.confirm(end);
                    continue;
                }
                None => {}
            }
            if let Some(ev) = self.pending.clone() {
                match self.handle(ev).await {
                    Ok(()) => self.pending = None,
                    Err(e) => {
                        // Never confirm a transaction that was not read whole:
                        // start again from the slot.
                        self.reconnect(&format!("reading a change failed: {e}")).await;
                    }
                }
                continue;
            }
            let ready = match tokio::time::timeout(Duration::ZERO, self.stream.recv()).await {
                Ok(r) => r,
                Err(_) => {
                    // Caught up: let the next changes gather (see `linger`).
                    if !self.linger.is_zero() {
                        tokio::time::sleep(self.linger).await;
                    }
                    self.stream.recv().await
                }
            };
            match ready {
                Ok(Some(ev)) => self.pending = Some(ev),
                Ok(None) => self.reconnect("the server ended the stream").await,
                Err(e) => self.reconnect(&e.to_string()).await,
            }
        }
    }

    /// Notes `event` as returned (see `returned`) and counts it.
    fn returning(&mut self, event: Event) -> Event {
        Stats::bump(&self.stats.events);
        self.returned = self.returned.max(event.wal);
        event
    }

    /// Stops streaming. A named reader's slot is first confirmed up to the
    /// last transaction whose events were all returned, so a reader that
    /// stops after its last `recv` resumes after it.
    ///
    /// # Errors
    /// [`Error::Db`] when the slot cannot be moved (the events after its
    /// last confirmed position will come again).
    pub async fn close(mut self) -> Result<()> {
        if let Some(end) = self.unconfirmed.take() {
            self.confirm(end);
        }
        // The last transaction returned may not have its end read yet: read
        // on (briefly) until it ends, unless more of it comes, which the
        // caller never saw.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            while let Some(Item::Commit(lsn)) = self.queue.front() {
                let lsn = *lsn;
                self.queue.pop_front();
                self.confirm(lsn);
            }
            if !self.queue.is_empty() || self.txn.is_none() {
                break;
            }
            let next = match self.pending.take() {
                Some(ev) => Ok(Ok(Some(ev))),
                None => tokio::time::timeout_at(deadline, self.stream.recv()).await,
            };
            match next {
                Ok(Ok(Some(ev))) => {
                    if self.handle(ev).await.is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        let _ = self.stream.shutdown().await;
        let (Some(end), false) = (self.confirmed, self.temporary) else { return Ok(()) };
        // The server lets the slot go a moment after the stream ends.
        for attempt in 0..40 {
            let moved = self
                .side
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn) \
                     FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
                    &[&self.repl.slot, &end.to_pg_string()],
                )
                .await;
            match moved {
                Ok(_) => return Ok(()),
                Err(e) if attempt < 39 && e.as_db_error().is_some_and(|d| d.code().code() == "55006") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(Error::db("confirming the WAL reader's position", e)),
            }
        }
        Ok(())
    }

    /// Confirms every transaction ending at or before `end`.
    fn confirm(&mut self, end: Lsn) {
        self.stream.update_applied_lsn(end);
        self.confirmed = self.confirmed.max(Some(end));
    }

    /// An event that is ready now, without waiting. Confirms nothing: the
    /// transactions it returned all of are confirmed by the next
    /// [`recv`](Self::recv), so a caller can write out what it has, then
    /// call `recv`.
    pub fn try_recv(&mut self) -> Option<Event> {
        loop {
            match self.queue.pop_front()? {
                Item::Event(e) => return Some(self.returning(*e)),
                Item::Commit(end) => self.unconfirmed = Some(end),
            }
        }
    }

    /// Handles one message of the stream. Changes no state before its only
    /// await (in `Decoder::message`), so it can be called again with the
    /// same message after being cancelled.
    async fn handle(&mut self, ev: ReplicationEvent) -> Result<()> {
        match ev {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                self.txn = Some(Txn { lsn: final_lsn.as_u64(), xid, time_us: commit_time_micros, next_index: 0 });
            }
            ReplicationEvent::XLogData { data, .. } => {
                let mut out = Vec::new();
                // Outside a transaction only relations are learnt.
                let txn = self.txn.unwrap_or(Txn { lsn: 0, xid: 0, time_us: 0, next_index: 0 });
                let rows = self.decoder.message(&self.side, &self.stats, &txn, &data, &mut out).await?;
                if let Some(t) = self.txn.as_mut() {
                    t.next_index += rows;
                    let returned = self.returned;
                    let new = out.into_iter().filter(|e| e.wal > returned);
                    self.queue.extend(new.map(|e| Item::Event(Box::new(e))));
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } if self.txn.take().is_some() => {
                self.queue.push_back(Item::Commit(end_lsn));
            }
            // Nothing in flight: everything the server decoded before
            // wal_end was delivered, so the slot may move past WAL that held
            // none of our tables (else it would keep it forever).
            ReplicationEvent::KeepAlive { wal_end, .. }
                if self.queue.is_empty() && self.txn.is_none() && wal_end.as_u64() > 0 =>
            {
                self.confirm(wal_end);
            }
            _ => {}
        }
        Ok(())
    }

    /// Replaces a lost stream, retrying with backoff until it is back.
    async fn reconnect(&mut self, why: &str) {
        tracing::warn!(reason = why, slot = %self.repl.slot, "WAL stream lost; reconnecting");
        Stats::bump(&self.stats.reconnects);
        // What was not returned comes again from the slot (it is not
        // confirmed); what was is skipped by its place.
        self.queue.clear();
        self.txn = None;
        self.pending = None;
        // The old stream may still hold the slot (when what failed was a
        // privilege check): end it first.
        if tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await.is_err() {
            self.stream.abort();
        }
        let mut delay = Duration::from_millis(100);
        loop {
            tokio::time::sleep(delay).await;
            let side = match crate::db::connect(&self.config).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "reconnecting to the database");
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            match start(&self.repl, self.temporary).await {
                Ok(stream) => {
                    if self.temporary {
                        Stats::bump(&self.stats.resyncs);
                        tracing::warn!("an unnamed WAL reader's temporary slot went with its connection: \
                                        changes made while it was down are not delivered (name the reader to keep them)");
                    }
                    match channels(&side).await {
                        Ok(c) => self.decoder.set_channels(c),
                        Err(e) => tracing::warn!(error = %e, "reading the watched tables again"),
                    }
                    self.stream = stream;
                    self.side = side;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reconnecting the WAL stream");
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Every WAL-watched table and its channel.
async fn channels(side: &Client) -> Result<HashMap<u32, String>> {
    let rows = side
        .query("SELECT source, channel FROM pubsub.wal_watches", &[])
        .await
        .map_err(|e| Error::db("reading the tables watched through the WAL", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Opens the replication connection, creates the slot if needed, and
/// starts streaming.
async fn start(repl: &ReplicationConfig, temporary: bool) -> Result<ReplicationClient> {
    let mut client = ReplicationClient::connect_gated(repl.clone())
        .await
        .map_err(|e| wal_error("opening the replication connection", e))?;
    let slot = &repl.slot;
    let exists = if temporary {
        false
    } else {
        let rows = client
            .simple_query(&format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}'"))
            .await
            .map_err(|e| wal_error("looking up the slot", e))?;
        !rows.is_empty()
    };
    if !exists {
        let temp = if temporary { " TEMPORARY" } else { "" };
        client
            .simple_query(&format!("CREATE_REPLICATION_SLOT {slot}{temp} LOGICAL pgoutput"))
            .await
            .map_err(|e| wal_error("creating the replication slot", e))?;
    }
    client.start().await.map_err(|e| wal_error("starting replication", e))?;
    client.wait_started().await.map_err(|e| wal_error("starting replication", e))?;
    Ok(client)
}

/// A few random bits for a temporary slot's name (two readers of one
/// process must not collide).
fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn reader_names_make_valid_slot_names() {
        assert_eq!(super::slot_name("orders_2").unwrap(), "pgpubsub_orders_2");
        for bad in ["", "Orders", "a-b", "a b", "x'; DROP", &"a".repeat(55)] {
            assert!(super::slot_name(bad).is_err(), "{bad}");
        }
    }
}
