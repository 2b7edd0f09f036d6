//! `pgpubsub serve`: the HTTP gateway. One LISTEN connection feeds a hub;
//! browsers and services subscribe over Server-Sent Events (`/events`) or
//! WebSocket (`/ws`), resume from the log after a disconnect, and publish
//! with `POST /publish/{channel}`. `/livez`, `/readyz` (`/healthz`) and
//! `/metrics` for operators.
//!
//! Safe to expose (docs/deploying.md): every channel or an allow-list of
//! patterns (`access.rs`), the cookie only from trusted origins, bodies read
//! only once the token allows them and never past the limit, bad input as a
//! 4xx, capped connections and header timeouts (`server.rs`), a publish
//! rate (`caps.rs`).
//!
//! The event-sourced store is there too: `PUT/GET/DELETE
//! /store/{bucket}/{id}` and `GET /store/{bucket}/{id}/history`.
//!
//! Authentication (JWT, `auth.rs`) is off unless a secret or key is given,
//! and the server says which at start.

mod access;
mod api;
mod auth;
mod caps;
mod capture_metrics;
mod error;
mod feed;
mod listening;
mod nats;
mod ops;
mod request;
mod server;
mod shape;
mod stream;
mod writes;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgpubsub::db::Config;
use pgpubsub::{ConnectionState, Hub, Listener, ListenerOptions, LogConn, Stats};
use tokio::sync::{mpsc, oneshot, watch};

pub use api::documented as openapi;
pub use nats::NATS_PING;

/// Options of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "PGPUBSUB_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// The channels served: names or patterns (`orders`, `tenant_*`; `*`
    /// any run of characters, `?` one), repeated or comma-separated. None:
    /// every channel (a client still needs a token's claims, with auth on).
    #[arg(
        long = "channel",
        short = 'c',
        env = "PGPUBSUB_SERVE_CHANNELS",
        value_delimiter = ',',
        value_name = "CHANNEL|PATTERN"
    )]
    pub channels: Vec<String>,
    /// Origins whose pages may use the `pgpubsub_token` cookie and get CORS
    /// headers (comma-separated, `https://app.example`; `*`: CORS for every
    /// origin, bearer tokens only). The gateway's own origin always may.
    #[arg(long, env = "PGPUBSUB_ALLOWED_ORIGINS", value_delimiter = ',', value_name = "ORIGINS")]
    pub allowed_origins: Vec<String>,
    /// Connections open at once (each SSE or WebSocket subscriber is one);
    /// past it, 503, except the probes and /metrics.
    #[arg(long, env = "PGPUBSUB_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Time a client has to send a request's head, and the longest a
    /// kept-alive connection may idle between requests (e.g. 10s).
    #[arg(long, env = "PGPUBSUB_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// How often every WebSocket gets a ping and a `{"type":"heartbeat"}`
    /// message, and every SSE stream a keep-alive comment (e.g. 15s), so
    /// that clients, proxies and the gateway can tell a quiet connection
    /// from a dead one.
    #[arg(long, env = "PGPUBSUB_HEARTBEAT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// A WebSocket whose client has sent nothing (not even a pong) for this
    /// long, or any connection whose writes have waited this long for the
    /// peer, is closed and counted (`pgpubsub_dead_connections_total`).
    /// Longer than --heartbeat.
    #[arg(long, env = "PGPUBSUB_HEARTBEAT_TIMEOUT", default_value = "45s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,
    /// Publishes (and store writes) per second per token, or per client
    /// address without one, with bursts of twice that; past it, 429. 0: no limit.
    #[arg(long, env = "PGPUBSUB_PUBLISH_RATE", default_value_t = 0.0)]
    pub publish_rate: f64,
    /// PostgreSQL connections for publishes, store requests and replays
    /// (opened when first needed), besides the listener's two.
    #[arg(long, env = "PGPUBSUB_DB_CONNECTIONS", default_value_t = 4)]
    pub db_connections: usize,
    /// Deliveries queued per subscriber before it is told it lagged.
    #[arg(long, env = "PGPUBSUB_SUBSCRIBER_QUEUE", default_value_t = 1024)]
    pub queue: usize,
    /// Largest message accepted by POST /publish, in bytes.
    #[arg(long, env = "PGPUBSUB_MAX_EVENT_BYTES", default_value_t = 64 << 20)]
    pub max_event_bytes: usize,
    /// HTTPS: the certificate chain (PEM) the gateway presents; with
    /// --tls-key. Without both, plain HTTP (a proxy in front may do TLS).
    #[arg(long, env = "PGPUBSUB_TLS_CERT", requires = "tls_key", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// HTTPS: the private key (PEM) of --tls-cert.
    #[arg(long, env = "PGPUBSUB_TLS_KEY", requires = "tls_cert", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Where events come from: `pg` (the default: this gateway reads the
    /// log) or `nats [URL]` (the JetStream stream `pgpubsub bridge` writes;
    /// URL defaults to PGPUBSUB_NATS_URL or nats://127.0.0.1:4222). Publishing
    /// and the store always go to PostgreSQL.
    #[arg(long, num_args = 1..=2, value_names = ["pg|nats", "URL"], default_value = "pg")]
    pub source: Vec<String>,
    /// With `--source nats`: the stream, as given to `pgpubsub bridge`.
    #[arg(long, env = "PGPUBSUB_STREAM", default_value = "PGPUBSUB")]
    pub stream: String,
    /// With `--source nats`: the subjects' prefix, as given to `pgpubsub bridge`.
    #[arg(long, env = "PGPUBSUB_SUBJECT_PREFIX", default_value = "pgpubsub")]
    pub subject_prefix: String,
    /// Every resume reads the log for itself instead of sharing reads with
    /// resumes from the same position (to measure what sharing saves).
    #[arg(long, hide = true)]
    pub replay_alone: bool,
    /// Who may read and write what (off unless a secret or key is given).
    #[command(flatten)]
    pub auth: auth::AuthArgs,
    /// Also run the capturer in this process (tables watched with `watch
    /// --wal` appended to the log from the WAL), for a single-process
    /// deployment; its counters join /metrics. Needs wal_level = logical and
    /// a role with REPLICATION. `pgpubsub capture` runs it on its own.
    #[arg(long, env = "PGPUBSUB_CAPTURE")]
    pub capture: bool,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    /// Connections for publishes, store requests and replays.
    pub db: Arc<Pool>,
    /// Resumes from one position share one read of the log.
    pub replays: Arc<pgpubsub::SharedReplays>,
    /// Row-level authorization: one class per role and claims in use.
    pub views: Arc<pgpubsub::Views>,
    /// Where shapes' snapshots are read.
    pub snapshots: Arc<shape::Snapshots>,
    /// The channels served.
    pub served: Arc<access::Served>,
    /// Origins trusted with the cookie.
    pub origins: Arc<access::Origins>,
    /// The channels LISTENed to for subscribers (foreign notifications).
    pub listening: Arc<listening::Listening>,
    /// Fed from NATS (`--source nats`) rather than PostgreSQL.
    pub source: Option<Arc<nats::Source>>,
    /// Open connections.
    pub places: server::Places,
    /// Publishes per second per client.
    pub rate: Arc<caps::Rate>,
    pub listener_stats: Arc<Stats>,
    pub listener_state: watch::Receiver<ConnectionState>,
    /// The capturer's counters, with `--capture`.
    pub capture: Option<Arc<pgpubsub::capture::CaptureStats>>,
    pub max_event_bytes: usize,
    pub auth: auth::Auth,
    /// WebSocket heartbeats, and the silence after which a client is dead.
    pub heartbeat: Heartbeat,
    /// Becomes true on SIGTERM / Ctrl-C: every feed ends, so streams close
    /// and graceful shutdown can finish.
    pub shutdown: watch::Receiver<bool>,
    /// Held by every clone of the state, so by every WebSocket task: the
    /// server exits once all are dropped (axum's graceful shutdown does not
    /// wait for upgraded connections, which would lose their close frames).
    pub _alive: tokio::sync::mpsc::Sender<()>,
}

/// The heartbeat of subscriber connections (`--heartbeat`,
/// `--heartbeat-timeout`).
#[derive(Clone, Debug)]
pub struct Heartbeat {
    /// How often a WebSocket gets a ping and a heartbeat message, and an SSE
    /// stream a keep-alive comment.
    pub every: Duration,
    /// A WebSocket client silent this long is dead (checked at each beat, so
    /// it is closed within `timeout + every`).
    pub timeout: Duration,
    /// WebSockets closed so far because their client fell silent.
    pub silent: Arc<std::sync::atomic::AtomicU64>,
}

/// Runs the gateway until SIGTERM or Ctrl-C, then stops accepting and lets
/// open streams end.
pub async fn run(config: &Config, args: &ServeArgs) -> anyhow::Result<()> {
    run_until(config, args, crate::shutdown::signal(), None).await
}

/// Runs the gateway until `stop` resolves; tells `ready` the address it
/// serves on once it accepts connections (tests bind port 0).
pub async fn run_until(
    config: &Config,
    args: &ServeArgs,
    stop: impl Future<Output = ()> + Send + 'static,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let (stop_tx, shutdown) = watch::channel(false);
    let (alive, mut drained) = tokio::sync::mpsc::channel::<()>(1);
    let auth = auth::Auth::new(&args.auth).context("configuring authentication")?;
    let served = access::Served::parse(&args.channels)?;
    let origins = access::Origins::parse(&args.allowed_origins)?;
    anyhow::ensure!(args.max_connections > 0, "--max-connections must be at least 1");
    anyhow::ensure!(args.db_connections > 0, "--db-connections must be at least 1");
    anyhow::ensure!(args.publish_rate >= 0.0, "--publish-rate must be 0 (no limit) or more");
    anyhow::ensure!(!args.heartbeat.is_zero(), "--heartbeat must be longer than 0");
    anyhow::ensure!(
        args.heartbeat_timeout > args.heartbeat,
        "--heartbeat-timeout ({:?}) must be longer than --heartbeat ({:?}): a client answers a heartbeat only after it came",
        args.heartbeat_timeout,
        args.heartbeat
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(server::tls_acceptor(cert, key)?),
        _ => None,
    };
    ops::install_metrics();
    let (capture_task, capture) = crate::cmd::capture::beside(config, args.capture)?.unzip();
    // Plain names: the listener reads only those. Patterns or none: every
    // channel of the log, filtered per subscriber.
    let listened = served.names().unwrap_or_default();
    let hub = Hub::new(args.queue);
    let (listening, changes) = listening::Listening::new(&listened);
    let views = Arc::new(pgpubsub::Views::new());
    let (source, listener_stats, listener_state) = match source_of(args)? {
        None => {
            let listener = Listener::connect(config, &listened, ListenerOptions::default().row_views(false))
                .await
                .context("starting the listener")?;
            let (stats, state) = (listener.stats(), listener.state());
            let ahead =
                Ahead { views: views.clone(), log: LogConn::new(pgpubsub::db::tuned(config), Duration::from_secs(10)) };
            tokio::spawn(feed_hub(hub.clone(), listener, changes, ahead));
            (None, stats, state)
        }
        Some(url) => {
            let (state_tx, state_rx) =
                watch::channel(ConnectionState::Reconnecting { attempt: 0, error: "starting".into() });
            let state_tx = Arc::new(state_tx);
            let source =
                Arc::new(nats::Source::connect(&url, &args.stream, &args.subject_prefix, state_tx.clone()).await?);
            let stats = Arc::new(Stats::default());
            tokio::spawn(nats::feed_hub(hub.clone(), source.clone(), state_tx, stats.clone()));
            tracing::info!(nats = %source.url, stream = %args.stream, "events come from NATS; publishes go to PostgreSQL");
            (Some(source), stats, state_rx)
        }
    };
    let state = AppState {
        hub: hub.clone(),
        db: Arc::new(Pool::new(config, args.db_connections)),
        replays: Arc::new(
            pgpubsub::SharedReplays::new(&pgpubsub::Limits {
                max_event_bytes: args.max_event_bytes as u64,
                ..pgpubsub::Limits::default()
            })
            .sharing(!args.replay_alone),
        ),
        views,
        snapshots: Arc::new(shape::Snapshots::new(config)),
        served: Arc::new(served.clone()),
        origins: Arc::new(origins),
        listening,
        places: server::Places::new(args.max_connections),
        rate: Arc::new(caps::Rate::new(args.publish_rate)),
        source,
        listener_stats,
        listener_state,
        capture,
        max_event_bytes: args.max_event_bytes,
        auth: auth.clone(),
        heartbeat: Heartbeat { every: args.heartbeat, timeout: args.heartbeat_timeout, silent: Arc::default() },
        shutdown: shutdown.clone(),
        _alive: alive,
    };

    let socket = tokio::net::TcpListener::bind(&args.bind).await.with_context(|| format!("binding {}", args.bind))?;
    let addr = socket.local_addr()?;
    if auth.enabled() {
        tracing::info!("authentication is on: tokens' read and write claims decide who may do what");
    } else {
        tracing::warn!("authentication is off: every client may read and publish on {}", served.describe());
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, channels = %served.describe(), "serving on {scheme}://{addr}");
    if let Some(ready) = ready {
        let _ = ready.send(addr);
    }
    tokio::spawn(async move {
        stop.await;
        tracing::info!("shutting down: closing streams");
        let _ = stop_tx.send(true);
    });
    let mut stopped = shutdown;
    let until_stopped = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let places = state.places.clone();
    let options = server::Options { header_timeout: args.header_timeout, tls, write_timeout: args.heartbeat_timeout };
    let capture_failed = crate::cmd::capture::ended(capture_task);
    tokio::select! {
        () = server::serve(socket, api::router(state), places, options, until_stopped) => {}
        e = capture_failed => return e,
    }
    // The router and its state are gone; wait for the sockets still closing.
    if tokio::time::timeout(Duration::from_secs(5), drained.recv()).await.is_err() {
        tracing::warn!("some WebSocket sessions did not close within 5 s");
    }
    tracing::info!("stopped");
    Ok(())
}

/// `--source`: `None` for PostgreSQL, the NATS URL for NATS.
fn source_of(args: &ServeArgs) -> anyhow::Result<Option<String>> {
    match args.source.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["pg"] | ["postgres"] | [] => Ok(None),
        ["nats"] => Ok(Some(std::env::var("PGPUBSUB_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()))),
        ["nats", url] => Ok(Some(url.to_string())),
        other => anyhow::bail!("--source {}: expected `pg` or `nats [URL]`", other.join(" ")),
    }
}

/// Row changes decided ahead for the classes of subscribers in use
/// (row-level authorization), before the hub hands them out.
struct Ahead {
    views: Arc<pgpubsub::Views>,
    /// A connection of its own: deciding ahead waits for no replay.
    log: LogConn,
}

/// Events decided ahead at most this long: past it, they go out anyway
/// and each subscriber's reader decides them.
const AHEAD_WAIT: Duration = Duration::from_secs(1);

/// Events taken from the listener at once (what is ready without waiting).
const AHEAD_BATCH: usize = 512;

/// Batches of events on their way from the listener to the hub, at most.
const AHEAD_QUEUE: usize = 64;

/// Feeds the hub from the listener, and has it LISTEN on the channels
/// subscribers ask for and UNLISTEN those they left (foreign `pg_notify`
/// payloads are heard only on channels LISTENed to). Ends once every handle
/// to the server is gone.
async fn feed_hub(
    hub: Hub,
    mut listener: Listener,
    mut changes: mpsc::UnboundedReceiver<listening::Change>,
    ahead: Ahead,
) {
    // One lives on the stack per turn of the loop: boxing the event would
    // cost an allocation per event instead.
    #[allow(clippy::large_enum_variant)]
    enum Step {
        Change(Option<listening::Change>),
        Event(Option<pgpubsub::Result<pgpubsub::Event>>),
    }
    // The listener's events go to the hub through a task that decides them
    // ahead: the listener reads on meanwhile, and what comes while one
    // statement runs goes into the next (the batches grow with the load).
    let (to_hub, batches) = mpsc::channel::<Vec<Arc<pgpubsub::hub::Shared>>>(AHEAD_QUEUE);
    let publisher = tokio::spawn(publish_decided(hub, batches, ahead));
    loop {
        // A change interrupts a `recv` that is waiting: nothing is lost (its
        // state moves only once a read is back), and `add_channel` has it
        // read the log again at once. Not biased: subscribers coming and
        // going in a flood cannot starve the events.
        let step = tokio::select! {
            c = changes.recv() => Step::Change(c),
            e = listener.recv() => Step::Event(e),
        };
        match step {
            Step::Change(Some(listening::Change::Listen(channel))) => listener.add_channel(channel).await,
            Step::Change(Some(listening::Change::Unlisten(channel))) => listener.remove_channel(&channel).await,
            Step::Change(None) | Step::Event(None) => break,
            Step::Event(Some(Ok(event))) => {
                // With every event ready now, each with its position.
                let mut batch = vec![Arc::new(pgpubsub::hub::Shared::new(event, listener.cursor()))];
                while batch.len() < AHEAD_BATCH {
                    match listener.try_recv() {
                        Some(Ok(event)) => batch.push(Arc::new(pgpubsub::hub::Shared::new(event, listener.cursor()))),
                        Some(Err(e)) => tracing::warn!(error = %e, "the listener reported an error"),
                        None => break,
                    }
                }
                if to_hub.send(batch).await.is_err() {
                    break;
                }
            }
            Step::Event(Some(Err(e))) => tracing::warn!(error = %e, "the listener reported an error"),
        }
    }
    drop(to_hub);
    let _ = publisher.await;
}

/// Hands the listener's batches to the hub in order, each decided ahead
/// for the classes in use (all the batches waiting in one go).
async fn publish_decided(hub: Hub, mut batches: mpsc::Receiver<Vec<Arc<pgpubsub::hub::Shared>>>, ahead: Ahead) {
    while let Some(mut events) = batches.recv().await {
        while events.len() < 8 * AHEAD_BATCH {
            let Ok(more) = batches.try_recv() else { break };
            events.extend(more);
        }
        // Nothing (and no statement) while no subscriber has a role.
        match tokio::time::timeout(AHEAD_WAIT, ahead.views.decide_ahead(&ahead.log, &events)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "deciding row-level authorization ahead failed; subscribers decide")
            }
            Err(_) => tracing::warn!("deciding row-level authorization ahead took over 1 s; subscribers decide"),
        }
        for shared in events {
            ops::observe_delivery(&shared.event);
            hub.publish_shared(shared);
        }
    }
}

/// A few connections, taken in turn: one large or slow statement does not
/// hold up every other request. Each is opened when first needed, and
/// replaced after a failure.
pub struct Pool {
    conns: Vec<Arc<LogConn>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Pool {
    fn new(config: &Config, n: usize) -> Pool {
        let conns = (0..n).map(|_| Arc::new(LogConn::new(pgpubsub::db::tuned(config), Duration::from_secs(10))));
        Pool { conns: conns.collect(), next: std::sync::atomic::AtomicUsize::new(0) }
    }

    /// The next connection in turn.
    pub fn pick(&self) -> Arc<LogConn> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }
}
