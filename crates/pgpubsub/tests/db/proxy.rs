//! A TCP proxy on 127.0.0.1 in front of PostgreSQL, for network faults:
//! - `cut()`: every open connection goes silent — nothing forwarded either
//!   way, no FIN, no RST — as when a network path drops packets;
//! - `refuse(true)`: new connections are closed as soon as accepted;
//! - `swallow_notifications(true)`: NotificationResponse messages from the
//!   server are dropped, as behind a transaction pooler.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct State {
    generation: AtomicU64,
    refuse: AtomicBool,
    swallow: AtomicBool,
}

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (host:port).
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let generation = st.generation.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, st.clone(), generation, false));
                tokio::spawn(pump(sr, cw, st.clone(), generation, true));
            }
        });
        Proxy { port, state }
    }

    /// A connection string to database `db` through the proxy.
    pub fn config(&self, db: &str) -> pgpubsub::db::Config {
        format!("postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable", self.port).parse().unwrap()
    }

    /// Silences every connection open now.
    pub fn cut(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }

    pub fn swallow_notifications(&self, on: bool) {
        self.state.swallow.store(on, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
    generation: u64,
    from_server: bool,
) {
    let mut buf = vec![0u8; 64 << 10];
    // Server-to-client bytes not yet forming a whole message.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if state.generation.load(Ordering::SeqCst) != generation {
            // Silent: hold both sockets open and forward nothing, ever.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        let out: Vec<u8> = if from_server && state.swallow.load(Ordering::SeqCst) {
            pending.extend_from_slice(&buf[..n]);
            let mut kept = Vec::new();
            // Messages: type byte, then a length that counts itself.
            while pending.len() >= 5 {
                let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]) as usize + 1;
                if pending.len() < len {
                    break;
                }
                let msg: Vec<u8> = pending.drain(..len).collect();
                if msg[0] != b'A' {
                    kept.extend_from_slice(&msg);
                }
            }
            kept
        } else {
            if !pending.is_empty() {
                pending.clear();
            }
            buf[..n].to_vec()
        };
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}
