//! `pgpubsub serve`: the HTTP gateway. One LISTEN connection feeds a hub;
//! browsers and services subscribe over Server-Sent Events (`/events`) or
//! WebSocket (`/ws`), resume from the log after a disconnect, and publish
//! with `POST /publish/{channel}`. `/healthz` and `/metrics` for operators.
//!
//! The event-sourced store is there too: `PUT/GET/DELETE
//! /store/{bucket}/{id}` and `GET /store/{bucket}/{id}/history`.
//!
//! Authentication (JWT, `auth.rs`) is off unless a secret or key is given,
//! and the server says which at start.

mod auth;
mod feed;
mod routes;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgpubsub::db::Config;
use pgpubsub::{Channel, ConnectionState, Hub, Listener, ListenerOptions, LogConn, Stats};
use tokio::sync::watch;

/// Options of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "PGPUBSUB_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// The channels served; clients subscribe to any of them.
    #[command(flatten)]
    pub channels: crate::cli::Channels,
    /// Deliveries queued per subscriber before it is told it lagged.
    #[arg(long, env = "PGPUBSUB_SUBSCRIBER_QUEUE", default_value_t = 1024)]
    pub queue: usize,
    /// Largest message accepted by POST /publish, in bytes.
    #[arg(long, env = "PGPUBSUB_MAX_EVENT_BYTES", default_value_t = 64 << 20)]
    pub max_event_bytes: usize,
    /// Who may read and write what (off unless a secret or key is given).
    #[command(flatten)]
    pub auth: auth::AuthArgs,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    pub log: Arc<LogConn>,
    pub channels: Arc<Vec<Channel>>,
    pub listener_stats: Arc<Stats>,
    pub listener_state: watch::Receiver<ConnectionState>,
    pub max_event_bytes: usize,
    pub auth: auth::Auth,
    /// Becomes true on SIGTERM / Ctrl-C: every feed ends, so streams close
    /// and graceful shutdown can finish.
    pub shutdown: watch::Receiver<bool>,
    /// Held by every clone of the state, so by every WebSocket task: the
    /// server exits once all are dropped (axum's graceful shutdown does not
    /// wait for upgraded connections, which would lose their close frames).
    pub _alive: tokio::sync::mpsc::Sender<()>,
}

/// Runs the gateway until SIGTERM or Ctrl-C, then stops accepting and lets
/// open streams end.
pub async fn run(config: &Config, args: &ServeArgs) -> anyhow::Result<()> {
    let signal = crate::cmd::listen::shutdown_signal();
    let (stop_tx, shutdown) = watch::channel(false);
    let (alive, mut drained) = tokio::sync::mpsc::channel::<()>(1);
    let auth = auth::Auth::new(&args.auth).context("configuring authentication")?;
    let listener = Listener::connect(config, &args.channels.list, ListenerOptions::default())
        .await
        .context("starting the listener")?;
    let hub = Hub::new(args.queue);
    let state = AppState {
        hub: hub.clone(),
        log: Arc::new(LogConn::new(pgpubsub::db::tuned(config), Duration::from_secs(10))),
        channels: Arc::new(args.channels.list.clone()),
        listener_stats: listener.stats(),
        listener_state: listener.state(),
        max_event_bytes: args.max_event_bytes,
        auth: auth.clone(),
        shutdown: shutdown.clone(),
        _alive: alive,
    };
    tokio::spawn(hub.run(listener.into_positioned()));

    let socket = tokio::net::TcpListener::bind(&args.bind).await.with_context(|| format!("binding {}", args.bind))?;
    let addr = socket.local_addr()?;
    if auth.enabled() {
        tracing::info!("authentication is on: tokens' read and write claims decide who may do what");
    } else {
        tracing::warn!("authentication is off: every client may read and publish on {:?}", args.channels.list);
    }
    tracing::info!(%addr, channels = ?args.channels.list, "serving on http://{addr}");
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutting down: closing streams");
        let _ = stop_tx.send(true);
    });
    let mut stopped = shutdown;
    let until_stopped = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    // No Nagle: a socket's batched flush is one write already, and Nagle
    // held small frames for the client's delayed ACK (a 40 ms tail).
    let socket = axum::serve::ListenerExt::tap_io(socket, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(socket, routes::router(state)).with_graceful_shutdown(until_stopped).await.context("serving HTTP")?;
    // The router and its state are gone; wait for the sockets still closing.
    if tokio::time::timeout(Duration::from_secs(5), drained.recv()).await.is_err() {
        tracing::warn!("some WebSocket sessions did not close within 5 s");
    }
    tracing::info!("stopped");
    Ok(())
}
