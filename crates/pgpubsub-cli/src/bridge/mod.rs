//! `pgpubsub bridge`: copies every committed event of some channels (all,
//! when none is given) into a NATS JetStream stream, once, in order, through
//! crashes and outages.
//!
//! - Input: a durable named [`Listener`] (cursor `bridge:<name>` in
//!   `pubsub.cursors`), with autosave off: the bridge stores the cursor only
//!   when JetStream has acknowledged every event returned before it (see
//!   [`pump::pump`]).
//! - Output: [`outbox::Outbox`], many publishes in flight, each event with a
//!   `Nats-Msg-Id` so that what a crash re-sends is dropped by JetStream,
//!   and chained so that nothing is stored out of order.
//! - One active bridge per name: [`lock::Lock`]. Others wait as standbys.

mod args;
mod lock;
mod metrics;
mod outbox;
mod pump;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream;
use pgpubsub::db::Config;
use pgpubsub::{Channel, Listener, ListenerOptions};
use tokio::sync::watch;

pub use self::args::BridgeArgs;
use self::lock::Lock;
use self::metrics::BridgeStats;
use self::outbox::{Outbox, Window};
use self::pump::pump;
use self::stream::{ensure_stream, source_id};

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
    let signal = crate::shutdown::signal();
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
        // A silent NATS is dropped after three pings (docs/delivery.md).
        .ping_interval(crate::serve::NATS_PING)
        .request_timeout(Some(args.ack_timeout))
        .reconnect_delay_callback(|attempt| {
            pgpubsub::Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).nth(attempt)
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
    let mut options = ListenerOptions::default().name(format!("bridge:{}", args.name)).row_views(false);
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
