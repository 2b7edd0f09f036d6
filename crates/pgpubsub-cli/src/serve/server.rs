//! The HTTP server loop (hyper, HTTP/1.1 with upgrades for WebSocket), in
//! place of `axum::serve` for what that does not offer:
//!
//! - a cap on open connections: past `--max-connections`, a connection is
//!   answered once (503 with a JSON body, then closed), except the probes
//!   and `/metrics`, which still answer; past a tenth more (plus 16), a
//!   connection is closed at once;
//! - a header read timeout (`--header-timeout`): a client that does not send
//!   a whole request head in time, or idles that long between requests on a
//!   kept-alive connection, is disconnected (slowloris);
//! - `TCP_NODELAY` on every socket, the client's address for handlers
//!   ([`ConnectInfo`]), and graceful shutdown;
//! - HTTPS (`--tls-cert`, `--tls-key`, rustls), the handshake held to the
//!   same timeout as a request head;
//! - dead peers dropped (`--heartbeat-timeout`): a write that cannot go out
//!   for that long fails the connection (counted), and the kernel gives up on
//!   data unacknowledged that long (`TCP_USER_TIMEOUT`), so a client gone
//!   silent (a NAT timeout, a sleeping laptop) does not keep its socket and
//!   queue for the 15 minutes of TCP's own retries.
//!
//! A connection keeps its place while it is upgraded to a WebSocket: the
//! place belongs to the socket.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use super::error::ApiError;

/// Limits of the server loop.
#[derive(Clone)]
pub struct Options {
    /// Time to send a request head (and to idle between requests), and to
    /// finish a TLS handshake.
    pub header_timeout: Duration,
    /// HTTPS, when given.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The longest a write may wait for the peer before the connection is
    /// given up (`--heartbeat-timeout`).
    pub write_timeout: Duration,
}

/// The TLS acceptor for a certificate chain and its key (PEM files).
///
/// # Errors
/// When a file cannot be read or holds no certificate or key, or the key
/// does not fit the certificate.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading --tls-cert {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading --tls-cert {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "--tls-cert {} holds no PEM certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading --tls-key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("--tls-key does not fit --tls-cert")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The open connections, for `/metrics`.
#[derive(Clone)]
pub struct Places {
    sem: Arc<Semaphore>,
    max: usize,
    /// Connections over the cap being answered (503, or a probe): bounded
    /// too, so a flood of them costs at most this many sockets (and TLS
    /// handshakes); past it, a connection is closed at once.
    over: Arc<Semaphore>,
    /// Connections given up because a write stalled past the timeout.
    stalled: Arc<AtomicU64>,
}

impl Places {
    /// `max` places, and room to answer `max / 10 + 16` connections over it.
    pub fn new(max: usize) -> Places {
        let over = Arc::new(Semaphore::new(max / 10 + 16));
        Places { sem: Arc::new(Semaphore::new(max)), max, over, stalled: Arc::default() }
    }

    /// Connections given up so far because a write stalled past the timeout.
    pub fn stalled(&self) -> u64 {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn used(&self) -> usize {
        self.max - self.sem.available_permits()
    }
}

/// A socket holding its place until it is closed, whose writes fail once
/// they have waited for the peer longer than the timeout.
struct Placed {
    tcp: TcpStream,
    _place: Option<OwnedSemaphorePermit>,
    stall: Stall,
}

/// The write-stall watch of a socket: armed when a write finds the socket
/// full, disarmed by the next write that goes through.
struct Stall {
    timeout: Duration,
    /// The deadline of the write waiting now; allocated on the first stall.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    counter: Arc<AtomicU64>,
}

impl Stall {
    /// After a write returned `Pending`: still pending, or an error once the
    /// socket has been full for the whole timeout (the peer reads nothing,
    /// or its network is gone).
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            self.armed = true;
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(timeout = ?self.timeout, "a write stalled past --heartbeat-timeout: connection dropped");
                let message = format!("no write went through for {:?} (--heartbeat-timeout)", self.timeout);
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message)))
            }
        }
    }

    /// After a write went through (or failed): its outcome, the watch
    /// disarmed.
    fn done<T>(&mut self, outcome: std::io::Result<T>) -> Poll<std::io::Result<T>> {
        self.armed = false;
        Poll::Ready(outcome)
    }
}

impl AsyncRead for Placed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Placed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_write(cx, buf) {
            Poll::Pending => this.stall.pending(cx),
            Poll::Ready(outcome) => this.stall.done(outcome),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.stall.pending(cx),
            Poll::Ready(outcome) => this.stall.done(outcome),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Whether a path still answers on a connection over the cap.
fn always_served(path: &str) -> bool {
    matches!(path, "/livez" | "/readyz" | "/healthz" | "/metrics")
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open
/// connections finish (streams end with the server's own shutdown signal).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    places: Places,
    options: Options,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; all gone = all closed.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait, do not spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // No Nagle: a socket's batched flush is one write already, and Nagle
        // held small frames for the client's delayed ACK (a 40 ms tail).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        // Data the peer has not acknowledged within the timeout (its network
        // is gone): the kernel closes the socket, and the next write fails.
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(options.write_timeout)) {
            tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
        }
        let place = places.sem.clone().try_acquire_owned().ok();
        let full = place.is_none();
        let place = match place {
            Some(p) => Some(p),
            None => match places.over.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    tracing::debug!(%peer, "over the connection cap and its overflow: closed");
                    continue;
                }
            },
        };
        let stall =
            Stall { timeout: options.write_timeout, timer: None, armed: false, counter: places.stalled.clone() };
        let placed = Placed { tcp, _place: place, stall };
        let conn = Conn { app: app.clone(), peer, full, max: places.max, header_timeout: options.header_timeout };
        let stop = stop_rx.clone();
        let open = open_tx.clone();
        let tls = options.tls.clone();
        tokio::spawn(async move {
            match tls {
                None => conn.serve(placed, stop).await,
                Some(acceptor) => match tokio::time::timeout(conn.header_timeout, acceptor.accept(placed)).await {
                    Ok(Ok(stream)) => conn.serve(stream, stop).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
}

/// One accepted connection, and what serving it needs.
struct Conn {
    app: Router,
    peer: std::net::SocketAddr,
    /// Over the connection cap: answered once, then closed.
    full: bool,
    max: usize,
    header_timeout: Duration,
}

impl Conn {
    /// Serves HTTP/1.1 (with upgrades) on `io` until it closes, or until
    /// `stop`, then gracefully.
    async fn serve<I>(self, io: I, mut stop: watch::Receiver<bool>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn { app, peer, full, max, header_timeout } = self;
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            async move {
                if full && !always_served(req.uri().path()) {
                    let busy = ApiError::Busy(format!(
                        "the gateway is at its limit of {max} open connections (--max-connections); retry later"
                    ));
                    return Ok::<Response, Infallible>(busy.into_response());
                }
                app.oneshot(req).await
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(!full);
        let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(error = %e, "connection ended");
                }
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => {
                conn.as_mut().graceful_shutdown();
                if let Err(e) = conn.await {
                    tracing::trace!(error = %e, "connection ended");
                }
            }
        }
    }
}
