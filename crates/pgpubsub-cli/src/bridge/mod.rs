//! `pgpubsub bridge`: copies every committed event of some channels (all,
//! when none is given) into a NATS JetStream stream, once, in order, through
//! crashes and outages.
//!
//! - Input: a durable named [`Listener`] (cursor `bridge:<name>` in
//!   `pubsub.cursors`), with autosave off: the bridge stores the cursor only
//!   when JetStream has acknowledged every event returned before it (see
//!   [`pump`]).
//! - Output: [`outbox::Outbox`], many publishes in flight, each event with a
//!   `Nats-Msg-Id` so that what a crash re-sends is dropped by JetStream,
//!   and chained so that nothing is stored out of order.
//! - One active bridge per name: [`lock::Lock`]. Others wait as standbys.

pub mod bench;
mod lock;
mod metrics;
mod outbox;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream;
use pgpubsub::db::Config;
use pgpubsub::{Channel, Listener, ListenerOptions};
use tokio::sync::watch;

use self::lock::Lock;
use self::metrics::BridgeStats;
use self::outbox::{Outbox, Prepared, Window};

/// The cursor is stored at most this often (and whenever the bridge idles
/// or stops with everything acknowledged).
const SAVE_EVERY: Duration = Duration::from_millis(250);

/// While a cursor store is owed, the bridge looks for new events this often
/// instead of blocking in `recv`...
const OWED_POLL: Duration = Duration::from_millis(2);

/// ...for at most this long (two listener heartbeats: a fence normally
/// lets the cursor cover everything acknowledged well before).
const OWED_MAX: Duration = Duration::from_secs(2);

/// Events the listener reads from the log per catch-up query.
const CATCH_UP_ROWS: i64 = 5000;

/// How long a stopping bridge waits for its unacknowledged events.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Options of `bridge`.
#[derive(Debug, clap::Args)]
pub struct BridgeArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "PGPUBSUB_NATS_URL", default_value = "nats://127.0.0.1:4222", value_name = "URL")]
    pub nats: String,
    /// Channels to copy (repeat, or separate with commas); none: every
    /// channel of the log, those that appear later included.
    #[arg(long = "channel", short = 'c', value_delimiter = ',', value_name = "CHANNEL")]
    pub channels: Vec<Channel>,
    /// The bridge's name: its cursor (`bridge:<NAME>` in pubsub.cursors) and
    /// its lock. Bridges started with the same name: one copies, the others
    /// wait and take over.
    #[arg(long, env = "PGPUBSUB_BRIDGE_NAME", value_name = "NAME")]
    pub name: String,
    /// The JetStream stream (created if missing). Give each bridge a stream
    /// of its own.
    #[arg(long, env = "PGPUBSUB_STREAM", default_value = "PGPUBSUB", value_parser = parse_stream)]
    pub stream: String,
    /// Subjects are `<PREFIX>.<channel>`; a created stream takes `<PREFIX>.>`.
    #[arg(long, env = "PGPUBSUB_SUBJECT_PREFIX", default_value = "pgpubsub", value_parser = parse_prefix)]
    pub subject_prefix: String,
    /// Created stream: drop messages older than this (default: keep).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_age: Option<Duration>,
    /// Created stream: keep at most this many bytes (default: no limit).
    #[arg(long, value_name = "BYTES")]
    pub max_bytes: Option<i64>,
    /// Created stream: replicas (a JetStream cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Created stream: how long JetStream remembers a `Nats-Msg-Id`. Must
    /// cover the re-send after a crash: from an event's first publish to
    /// the restarted (or standby) bridge sending it again.
    #[arg(long, default_value = "2m", value_name = "DURATION", value_parser = parse_duration)]
    pub duplicate_window: Duration,
    /// Most events published and not yet acknowledged.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_in_flight: usize,
    /// Most bytes published and not yet acknowledged.
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    pub max_in_flight_bytes: usize,
    /// How long an acknowledgement (or a JetStream request) may take before
    /// it counts as failed and is retried.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// The first part of every `Nats-Msg-Id` (`<SOURCE>:<seq>`). Default:
    /// the database's identity, `<system_identifier>-<database oid>`.
    #[arg(long, value_name = "SOURCE")]
    pub source_id: Option<String>,
    /// Skip (and count) events larger than the NATS server's max_payload
    /// instead of stopping with an error.
    #[arg(long)]
    pub skip_oversize: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, env = "PGPUBSUB_METRICS_BIND", value_name = "ADDR")]
    pub metrics_bind: Option<String>,
    /// How often a standby tries the lock, and the active bridge proves it
    /// still holds it.
    #[arg(long, default_value = "500ms", value_name = "DURATION", value_parser = parse_duration)]
    pub lock_poll: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 2m, 30s, 500ms, 7d)"))
}

/// A stream name: what JetStream accepts in its API subjects.
fn parse_stream(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 255
        || s.chars().any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err("a stream name is 1 to 255 characters, without whitespace, '.', '*', '>', '/' or '\\'".into());
    }
    Ok(s.to_string())
}

/// A subject prefix: one or more literal tokens.
fn parse_prefix(s: &str) -> Result<String, String> {
    let bad = |t: &str| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>');
    if s.split('.').any(bad) {
        return Err("a subject prefix is dot-separated tokens without whitespace or wildcards (e.g. pgpubsub)".into());
    }
    Ok(s.to_string())
}

/// Why active copying ended.
enum Exit {
    /// SIGTERM or Ctrl-C.
    Stopped,
    /// The lock's session is gone: another bridge may be active.
    LockLost,
}

/// An error that retrying cannot fix.
#[derive(Debug)]
struct Fatal(String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// What the active bridge works with.
struct Ctx<'a> {
    config: &'a Config,
    args: &'a BridgeArgs,
    client: async_nats::Client,
    /// Bumped whenever the NATS connection is lost.
    disconnections: watch::Receiver<u64>,
    js: jetstream::Context,
    stats: Arc<BridgeStats>,
    stop: watch::Receiver<bool>,
}

/// Runs until SIGTERM or Ctrl-C: waits for the lock, copies while it holds
/// it, and goes back to waiting when it loses it.
pub async fn run(config: &Config, args: &BridgeArgs) -> anyhow::Result<()> {
    if args.duplicate_window.is_zero() {
        bail!("--duplicate-window must be positive: it is what drops events sent again");
    }
    let (stop_tx, stop) = watch::channel(false);
    let signal = crate::cmd::listen::shutdown_signal();
    tokio::spawn(async move {
        signal.await;
        let _ = stop_tx.send(true);
    });
    let stats = Arc::new(BridgeStats::default());
    let me = format!("pgpubsub bridge {}:{}", hostname(), std::process::id());
    if let Some(bind) = &args.metrics_bind {
        metrics::serve(bind, args.name.clone(), stats.clone())
            .await
            .with_context(|| format!("serving metrics on {bind}"))?;
    }
    let (client, disconnections) = connect_nats(args, &me).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(args.ack_timeout)
        .ack_timeout(args.ack_timeout)
        .max_ack_inflight(args.max_in_flight.max(1) * 8)
        .build(client.clone());
    let ctx = Ctx { config, args, client, disconnections, js, stats: stats.clone(), stop: stop.clone() };
    tracing::info!(name = %args.name, stream = %args.stream, prefix = %args.subject_prefix,
        channels = ?args.channels.iter().map(Channel::as_str).collect::<Vec<_>>(), "bridge starting");

    loop {
        let acquire = Lock::acquire(config, &args.name, &me, args.lock_poll, Duration::from_secs(5), &stats);
        let lock = tokio::select! {
            lock = acquire => lock,
            () = stopped(&stop) => return Ok(()),
        };
        BridgeStats::bump(&stats.activations);
        BridgeStats::set(&stats.active, 1);
        stats.set_holder(&me);
        tracing::info!(name = %args.name, holder = %me, "active: this bridge holds the lock and copies");
        let outcome = active(&ctx, &lock).await;
        BridgeStats::set(&stats.active, 0);
        if let Ok(mut l) = stats.listener.lock() {
            *l = None;
        }
        drop(lock);
        match outcome {
            Ok(Exit::Stopped) => {
                tracing::info!("stopped");
                return Ok(());
            }
            Ok(Exit::LockLost) => {
                tracing::warn!(name = %args.name, "lost the lock's session: stopped copying; standing by");
            }
            Err(e) if e.is::<Fatal>() => return Err(e),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "copying stopped; standing by to try again");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stopped(&stop) => return Ok(()),
                }
            }
        }
        if *stop.borrow() {
            return Ok(());
        }
    }
}

/// The NATS client: connects in the background (the bridge starts while NATS
/// is down) and reconnects forever, at most 2 s apart. With it, a count of
/// its disconnections.
async fn connect_nats(args: &BridgeArgs, me: &str) -> anyhow::Result<(async_nats::Client, watch::Receiver<u64>)> {
    let (lost, disconnections) = watch::channel(0u64);
    let lost = Arc::new(lost);
    let options = async_nats::ConnectOptions::new()
        .name(me)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .request_timeout(Some(args.ack_timeout))
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis(50u64.saturating_mul(1 << attempt.min(6) as u64)).min(Duration::from_secs(2))
        })
        .event_callback(move |event| {
            let lost = lost.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => {
                        lost.send_modify(|n| *n += 1);
                        tracing::warn!("NATS disconnected; reconnecting");
                    }
                    other => tracing::info!(event = %other, "NATS"),
                }
            }
        });
    let servers: Vec<async_nats::ServerAddr> = args
        .nats
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>().with_context(|| format!("invalid NATS URL {s:?}")))
        .collect::<anyhow::Result<_>>()?;
    let client = options.connect(servers).await.context("connecting to NATS")?;
    Ok((client, disconnections))
}

/// One active period: from taking the lock to losing it, stopping, or an
/// error.
async fn active(ctx: &Ctx<'_>, lock: &Lock) -> anyhow::Result<Exit> {
    let args = ctx.args;
    let source = match &args.source_id {
        Some(s) => s.clone(),
        None => source_id(lock.client()).await,
    };
    let stream = tokio::select! {
        s = ensure_stream(ctx) => s?,
        () = lock.lost() => return Ok(Exit::LockLost),
        () = stopped(&ctx.stop) => return Ok(Exit::Stopped),
    };
    let window = Window { messages: args.max_in_flight.max(1), bytes: args.max_in_flight_bytes.max(1) };
    let outbox = tokio::select! {
        o = Outbox::open(ctx.js.clone(), ctx.client.clone(), ctx.disconnections.clone(), stream, window, ctx.stats.clone()) => o,
        () = lock.lost() => return Ok(Exit::LockLost),
        () = stopped(&ctx.stop) => return Ok(Exit::Stopped),
    };
    let mut options = ListenerOptions::default().name(format!("bridge:{}", args.name));
    options.autosave = false;
    // Larger catch-up pages: the bridge publishes a page before the
    // listener reads the next one, so each page costs a round trip to both.
    options.page_rows = CATCH_UP_ROWS;
    let listener = tokio::select! {
        l = Listener::connect(ctx.config, &args.channels, options) => l.context("starting the listener")?,
        () = lock.lost() => return Ok(Exit::LockLost),
        () = stopped(&ctx.stop) => return Ok(Exit::Stopped),
    };
    if let Ok(mut l) = ctx.stats.listener.lock() {
        *l = Some(listener.stats());
    }
    tracing::info!(%source, cursor = %listener.cursor(), "copying");
    pump(ctx, lock, listener, outbox, &source).await
}

/// The events' identity: `<system_identifier>-<database oid>`. The log's seq
/// is unique within one database, so `<this>:<seq>` names one event for
/// good: the same after a failover to a physical replica (same identifier
/// and oid, same log), never the same for two databases bridged into one
/// stream (where a bare seq would make JetStream drop one database's event
/// as the other's duplicate: a loss).
async fn source_id(client: &tokio_postgres::Client) -> String {
    let sql = "SELECT (SELECT system_identifier FROM pg_control_system())::text || '-' \
               || (SELECT oid FROM pg_database WHERE datname = current_database())::text";
    match client.query_one(sql, &[]).await {
        Ok(row) => row.get(0),
        Err(e) => {
            let name = client.query_one("SELECT current_database()::text", &[]).await.map(|r| r.get(0));
            let name: String = name.unwrap_or_else(|_| "pgpubsub".into());
            tracing::warn!(error = %e, source = %name, "cannot read the database's identity; using its name");
            name
        }
    }
}

/// The stream, created if missing; retried while NATS is unreachable.
async fn ensure_stream(ctx: &Ctx<'_>) -> anyhow::Result<jetstream::stream::Stream> {
    let args = ctx.args;
    let wanted = jetstream::stream::Config {
        name: args.stream.clone(),
        subjects: vec![format!("{}.>", args.subject_prefix)],
        max_age: args.max_age.unwrap_or_default(),
        max_bytes: args.max_bytes.unwrap_or(-1),
        num_replicas: args.replicas.max(1),
        duplicate_window: args.duplicate_window,
        storage: jetstream::stream::StorageType::File,
        description: Some("pgpubsub bridge: the PostgreSQL event log".into()),
        ..Default::default()
    };
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    let mut stream = loop {
        match ctx.js.get_or_create_stream(wanted.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                attempt += 1;
                if attempt == 1 || attempt % 20 == 0 {
                    tracing::warn!(error = %e, stream = %args.stream, "cannot open or create the stream; retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let info = stream.info().await.context("reading the stream's configuration")?;
    let every = [format!("{}.>", args.subject_prefix)];
    let subjects: Vec<String> = match args.channels.as_slice() {
        [] => every.to_vec(),
        some => some.iter().map(|c| format!("{}.{c}", args.subject_prefix)).collect(),
    };
    for subject in subjects {
        if !info.config.subjects.iter().any(|pattern| subject_matches(pattern, &subject)) {
            return Err(Fatal(format!(
                "stream {} does not take subject {subject} (its subjects: {:?}); choose another --stream or --subject-prefix",
                args.stream, info.config.subjects
            ))
            .into());
        }
    }
    if info.config.duplicate_window < args.duplicate_window {
        tracing::warn!(stream = %args.stream, has = ?info.config.duplicate_window, wanted = ?args.duplicate_window,
            "the existing stream's duplicate window is shorter than --duplicate-window: events re-sent after it are stored twice");
    }
    Ok(stream)
}

/// Whether a NATS subject pattern (`*` one token, `>` the rest) matches.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Copies events until the lock is lost or the bridge is told to stop.
///
/// The cursor. `Listener::save` stores a position that counts as handled
/// every event returned before the last `recv`/`try_recv` call. So the
/// bridge may call `save` only at a moment when *every* event returned so
/// far is acknowledged by JetStream, and it makes such moments: it reads
/// events only while there is room in the window, and it saves only with
/// nothing in flight. With events in flight it may read on (the cursor
/// moves in memory) but never saves; when a store falls due (every
/// `SAVE_EVERY`, if the cursor moved) it stops reading until the window is
/// empty, then saves. While JetStream does not acknowledge, the bridge
/// waits on the oldest event and reads nothing more.
///
/// A store is owed while some acknowledged event lies above the stored
/// cursor. With nothing in flight and nothing ready, the bridge then saves
/// at once if the listener's cursor already covers every acknowledged
/// event (one store settles it: the end of a catch-up page, or a burst
/// followed by a fence), else every `SAVE_EVERY` as the cursor moves;
/// meanwhile it polls with `try_recv` rather than block in `recv`, so that
/// the store is not left waiting for the next event. The listener's cursor
/// moves on its fences (about once a second), which `try_recv` processes.
/// But `try_recv` does not read the log: when the listener has been
/// reading the log (its `polls` or `resyncs` counters moved since the last
/// blocking `recv`) and one store does not settle the debt, the bridge
/// stores what it can and blocks in `recv` at once, so the next page is
/// read; it also gives up polling after `OWED_MAX` (a transaction held open
/// keeps the cursor back). So an idle bridge's stored cursor normally
/// covers everything acknowledged within about a heartbeat. The exception:
/// a catch-up that ends exactly on a full page leaves its last event
/// covered only in memory until the next event arrives.
///
/// A crash therefore re-sends what was returned after the stored cursor:
/// up to `SAVE_EVERY` plus about a heartbeat of events (more behind a long
/// transaction). JetStream drops them by their `Nats-Msg-Id` as long as
/// they were first sent within the duplicate window.
async fn pump(
    ctx: &Ctx<'_>,
    lock: &Lock,
    mut listener: Listener,
    mut outbox: Outbox,
    source: &str,
) -> anyhow::Result<Exit> {
    let mut saved = listener.cursor();
    let mut acked = saved;
    let mut last_save = Instant::now();
    let stats = listener.stats();
    // Gaps and replayed events as of the last blocking `recv`; more since:
    // the listener is (or was) reading the log, which `try_recv` does not.
    let reading_log = |s: pgpubsub::StatsSnapshot| (s.polls, s.resyncs);
    let mut seen = reading_log(stats.snapshot());
    let mut polling_since: Option<Instant> = None;
    let mut stopping: Option<Instant> = None;
    let mut take_state = TakeState::default();
    loop {
        if lock.is_lost() {
            return Ok(Exit::LockLost);
        }
        if stopping.is_none() && *ctx.stop.borrow() {
            stopping = Some(Instant::now() + STOP_GRACE);
        }
        let owed = acked > saved;
        let save_due = owed && last_save.elapsed() >= SAVE_EVERY && listener.cursor() > saved;
        // 1. Take what is ready now, while there is room.
        if !save_due && stopping.is_none() {
            while outbox.has_room() {
                let Some(item) = listener.try_recv() else { break };
                take(ctx, &mut outbox, Some(item), source, &mut take_state).await?;
            }
        }
        // 2. Wait for the oldest acknowledgement.
        if outbox.in_flight() > 0 {
            let confirmed = match stopping {
                None => tokio::select! {
                    confirmed = outbox.confirm_oldest() => confirmed,
                    () = lock.lost() => return Ok(Exit::LockLost),
                    () = stopped(&ctx.stop) => Vec::new(),
                },
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, outbox.confirm_oldest()).await {
                        Ok(confirmed) => confirmed,
                        Err(_) => {
                            tracing::warn!(
                                in_flight = outbox.in_flight(),
                                "stopping with events unacknowledged; the next bridge sends them again"
                            );
                            return Ok(Exit::Stopped);
                        }
                    }
                }
            };
            acked = confirmed.into_iter().fold(acked, Ord::max);
            continue;
        }
        // 3. Nothing in flight: every event returned so far is in JetStream.
        if stopping.is_some() {
            BridgeStats::bump(&ctx.stats.saves);
            listener.close().await.context("storing the cursor")?;
            return Ok(Exit::Stopped);
        }
        if owed {
            let cursor = listener.cursor();
            let settles = cursor >= acked;
            let catch_up_waits = reading_log(stats.snapshot()) != seen;
            let polled_enough = polling_since.get_or_insert_with(Instant::now).elapsed() >= OWED_MAX;
            let give_up = catch_up_waits || polled_enough;
            let mut failed = false;
            // Between catch-up pages a store is only made when due.
            if cursor > saved && (settles || polled_enough || last_save.elapsed() >= SAVE_EVERY) {
                if lock.is_lost() {
                    return Ok(Exit::LockLost);
                }
                match listener.save().await {
                    Ok(()) => {
                        BridgeStats::bump(&ctx.stats.saves);
                        saved = cursor;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not store the cursor; will retry");
                        failed = true;
                    }
                }
                last_save = Instant::now();
            }
            if failed || (!settles && !give_up) {
                tokio::select! {
                    () = tokio::time::sleep(if failed { SAVE_EVERY } else { OWED_POLL }) => {}
                    () = lock.lost() => return Ok(Exit::LockLost),
                    () = stopped(&ctx.stop) => {}
                }
                continue;
            }
            if settles {
                continue;
            }
        }
        // 4. Nothing in flight, nothing ready, nothing owed (or a catch-up
        // waits, or polling gave up): wait for the next event. Everything
        // returned so far is acknowledged, so while it waits the listener
        // may store its cursor by itself (its position moves as it reads).
        listener.set_autosave(true);
        let item = tokio::select! {
            item = listener.recv() => item,
            () = lock.lost() => return Ok(Exit::LockLost),
            () = stopped(&ctx.stop) => continue,
        };
        listener.set_autosave(false);
        seen = reading_log(stats.snapshot());
        polling_since = None;
        take(ctx, &mut outbox, item, source, &mut take_state).await?;
    }
}

/// What [`take`] remembers between events.
#[derive(Default)]
struct TakeState {
    warned_foreign: bool,
    /// The server's max_payload, read again after each disconnection (the
    /// client may be on another server).
    max_payload: Option<(u64, usize)>,
}

/// Publishes one item from the listener (or counts why not).
async fn take(
    ctx: &Ctx<'_>,
    outbox: &mut Outbox,
    item: Option<pgpubsub::Result<pgpubsub::Event>>,
    source: &str,
    state: &mut TakeState,
) -> anyhow::Result<()> {
    let event = match item {
        None => bail!("the listener stopped"),
        Some(Ok(event)) => event,
        Some(Err(pgpubsub::Error::ResyncNeeded { cursor, pruned })) => {
            BridgeStats::bump(&ctx.stats.resyncs);
            tracing::error!(%cursor, %pruned,
                "RESYNC NEEDED: events were pruned from the log before the bridge copied them; going on from the oldest kept");
            return Ok(());
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "listener reported an error; going on");
            return Ok(());
        }
    };
    let Some(msg) = Prepared::new(&event, &ctx.args.subject_prefix, source) else {
        BridgeStats::bump(&ctx.stats.skipped_foreign);
        if !state.warned_foreign {
            tracing::warn!(channel = %event.channel,
                "a foreign notification (not in the log, no seq) is not copied; counted in pgpubsub_bridge_skipped_foreign_total");
            state.warned_foreign = true;
        }
        return Ok(());
    };
    let connection = *ctx.disconnections.borrow();
    let max_payload = match state.max_payload {
        Some((on, max)) if on == connection && max > 0 => max,
        _ => {
            let max = ctx.client.server_info().max_payload;
            state.max_payload = Some((connection, max));
            max
        }
    };
    if max_payload > 0 && msg.size > max_payload {
        if ctx.args.skip_oversize {
            BridgeStats::bump(&ctx.stats.skipped_oversize);
            tracing::warn!(seq = msg.seq, bytes = msg.size, max_payload, "event larger than NATS max_payload skipped");
            return Ok(());
        }
        return Err(Fatal(format!(
            "event {} is {} bytes, more than the NATS server's max_payload ({max_payload}); \
             raise max_payload on the server or run with --skip-oversize",
            msg.seq, msg.size
        ))
        .into());
    }
    outbox.publish(msg).await;
    Ok(())
}

/// Resolves once a stop was asked for.
async fn stopped(stop: &watch::Receiver<bool>) {
    let mut stop = stop.clone();
    let _ = stop.wait_for(|s| *s).await;
}

/// This machine's name, for telling bridges apart in logs and metrics.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("pgpubsub.>", "pgpubsub.orders"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(subject_matches(">", "x.y"));
        assert!(!subject_matches("pgpubsub.>", "pgpubsub"));
        assert!(!subject_matches("other.>", "pgpubsub.orders"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.b", "a.b"));
    }

    #[test]
    fn names_are_checked() {
        assert!(parse_prefix("pgpubsub").is_ok() && parse_prefix("app.events").is_ok());
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a", "a."] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
        assert!(parse_stream("PGPUBSUB").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>"] {
            assert!(parse_stream(bad).is_err(), "{bad}");
        }
    }
}
