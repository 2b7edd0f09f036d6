//! Dead peers: the gateway's WebSocket heartbeat (a ping and a message a
//! page can see), and connections that go silent behind a proxy that stops
//! forwarding (no FIN, no RST, as after a NAT timeout) being closed and
//! counted within `--heartbeat-timeout`, so the open connections return to
//! what they were.
//!
//! Shown able to fail: without the check of the client's silence the
//! WebSocket test fails (the connection stays open); the SSE test fails
//! with both the write-stall timeout and `TCP_USER_TIMEOUT` removed, and
//! passes with either one alone (behind this proxy the window closes, and
//! the kernel gives up on a zero window past the user timeout too).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, TestDb, WAIT};
use crate::proxy::Proxy;
use crate::serve::{curl_get, serve};

const SHORT: [&str; 4] = ["--heartbeat", "1s", "--heartbeat-timeout", "3s"];

/// A metric's value now (`name` with its labels, as rendered).
fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, text) = curl_get(&format!("http://{addr}/metrics"));
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until `name` passes `ok`; its value then.
async fn metric_until(addr: &str, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(addr, name);
        if let Some(v) = value.filter(|v| ok(*v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} never passed, last {value:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const OPEN: &str = "pgpubsub_open_connections";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_gets_pings_and_heartbeats_and_a_silent_one_is_dropped_and_counted() {
    let db = TestDb::new().await;
    let ch = common::channel("beat");
    let server = serve(&db, ch.as_str(), &SHORT);
    let proxy = Proxy::start(server.addr.clone()).await;
    let url = format!("ws://127.0.0.1:{}/ws", proxy.port);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    ws.send(Message::text(json!({"channels": [ch.as_str()], "ack": true}).to_string())).await.unwrap();
    let (mut pings, mut beats) = (0, 0);
    while pings < 2 || beats < 2 {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Ping(_) => pings += 1,
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("heartbeat") => beats += 1,
                    Some("subscribed") => {}
                    other => panic!("unexpected {other:?}: {t}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // This subscriber's connection and the scrape's own.
    let open = metric_until(&server.addr, OPEN, |v| v >= 2.0).await;
    let silent = r#"pgpubsub_dead_connections_total{reason="silent"}"#;
    let before = metric(&server.addr, silent).unwrap_or(0.0);
    proxy.cut();
    metric_until(&server.addr, OPEN, |v| v < open).await;
    metric_until(&server.addr, silent, |v| v > before).await;
    metric_until(&server.addr, "pgpubsub_subscribers", |v| v == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_whose_writes_back_up_is_dropped() {
    let db = TestDb::new().await;
    let ch = common::channel("stall");
    let server = serve(&db, ch.as_str(), &SHORT);
    let proxy = Proxy::start(server.addr.clone()).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let head = format!("GET /events?channel={ch} HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The stream's hello, then a keep-alive comment every second.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(": keep-alive") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let open = metric_until(&server.addr, OPEN, |v| v >= 2.0).await;
    proxy.cut();
    // An SSE client sends nothing the server could miss: the stream is given
    // up once its writes back up for the timeout. Write until they do.
    let client = db.client().await;
    let deadline = Instant::now() + WAIT;
    while metric(&server.addr, OPEN).is_none_or(|v| v >= open) {
        assert!(Instant::now() < deadline, "the stalled stream was never dropped");
        let sql = "SELECT pubsub.publish($1, repeat('x', 65536)) FROM generate_series(1, 16)";
        client.execute(sql, &[&ch.as_str()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    metric_until(&server.addr, "pgpubsub_subscribers", |v| v == 0.0).await;
    drop(tcp);
}

#[test]
fn a_heartbeat_timeout_not_longer_than_the_heartbeat_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgpubsub"))
        .args(["serve", "--bind", "127.0.0.1:0", "--heartbeat", "10s", "--heartbeat-timeout", "5s"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--heartbeat-timeout") && err.contains("longer than --heartbeat"), "{err}");
}
