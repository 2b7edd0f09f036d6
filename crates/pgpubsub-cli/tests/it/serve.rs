//! The gateway with real clients: curl for SSE and publish,
//! tokio-tungstenite for WebSocket; the server in the test's process (its
//! own thread and runtime), or as its own process where a test needs one.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, TestDb, WAIT};

/// A running gateway: in this process (its own thread and runtime), or a
/// `pgpubsub serve` process; stopped abruptly on drop, as a crash would.
pub(crate) struct Server {
    pub addr: String,
    run: Run,
}

enum Run {
    InProcess { stop: Option<tokio::sync::oneshot::Sender<()>>, thread: Option<std::thread::JoinHandle<()>> },
    Process(Child),
}

impl Server {
    /// The process serving, when it is one (`serve_process`).
    pub fn child(&mut self) -> &mut Child {
        match &mut self.run {
            Run::Process(child) => child,
            Run::InProcess { .. } => panic!("this server runs in the test's process: use serve_process"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.run {
            Run::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Run::InProcess { stop, thread } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(thread) = thread.take() {
                    let _ = thread.join();
                }
            }
        }
    }
}

pub(crate) fn serve(db: &TestDb, channels: &str, extra: &[&str]) -> Server {
    serve_url(&db.url, channels, extra)
}

/// The gateway's flags as `pgpubsub serve` parses them.
#[derive(clap::Parser)]
struct ServeCommand {
    #[command(flatten)]
    args: pgpubsub_cli::serve::ServeArgs,
}

/// The gateway on the database at `url`, in this process, on a port of its
/// own; `channels` empty: without `--channel` (every channel).
pub(crate) fn serve_url(url: &str, channels: &str, extra: &[&str]) -> Server {
    use clap::Parser;
    let mut argv = vec!["serve", "--bind", "127.0.0.1:0"];
    if !channels.is_empty() {
        argv.extend(["--channel", channels]);
    }
    argv.extend(extra);
    let args = ServeCommand::try_parse_from(argv).unwrap_or_else(|e| panic!("bad serve flags: {e}")).args;
    let config = pgpubsub::db::parse_config(url).unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let (ready, at) = tokio::sync::oneshot::channel();
            let forward = addr_tx.clone();
            tokio::spawn(async move {
                if let Ok(addr) = at.await {
                    let _ = forward.send(Ok(addr));
                }
            });
            let never = std::future::pending::<()>();
            tokio::select! {
                result = pgpubsub_cli::serve::run_until(&config, &args, never, Some(ready)) => {
                    let _ = addr_tx.send(Err(format!("{result:?}")));
                }
                _ = stopped => {}
            }
        });
        // Every connection's task goes with the runtime: a crash, not a
        // graceful stop.
        rt.shutdown_timeout(Duration::from_millis(100));
    });
    let addr = match addr_rx.recv_timeout(WAIT) {
        Ok(Ok(addr)) => addr.to_string(),
        Ok(Err(e)) => panic!("the gateway did not start: {e}"),
        Err(_) => panic!("the gateway did not start in time"),
    };
    Server { addr, run: Run::InProcess { stop: Some(stop), thread: Some(thread) } }
}

/// `pgpubsub serve` as its own process, once it says where it listens (for
/// what a process alone shows: signals, its memory).
pub(crate) fn serve_process(url: &str, channels: &str, extra: &[&str]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
    cmd.env_remove("PUB_SUB_CHANNEL")
        .env_remove("PGPUBSUB_SERVE_CHANNELS")
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn,pgpubsub=info")
        .args(["serve", "--bind", "127.0.0.1:0"]);
    if !channels.is_empty() {
        cmd.args(["--channel", channels]);
    }
    let mut child = cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + WAIT;
    let addr = loop {
        assert!(Instant::now() < deadline, "server did not start");
        let line = lines.next().expect("server exited").unwrap();
        if let Some(rest) = line.split("serving on http").nth(1) {
            let rest = rest.trim_start_matches('s').trim_start_matches("://");
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining its logs so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { addr, run: Run::Process(child) }
}

/// One SSE event as curl delivers it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// `curl -sN` on an SSE URL; events arrive on the returned channel.
pub(crate) fn sse(url: &str, last_event_id: Option<&str>) -> (Child, Receiver<Sse>) {
    sse_with(url, last_event_id, &[])
}

pub(crate) fn sse_with(url: &str, last_event_id: Option<&str>, headers: &[String]) -> (Child, Receiver<Sse>) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sN", url]);
    if let Some(id) = last_event_id {
        cmd.args(["-H", &format!("Last-Event-ID: {id}")]);
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut cur = Sse::default();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.is_empty() {
                if !cur.event.is_empty() || !cur.data.is_empty() {
                    let _ = tx.send(std::mem::take(&mut cur));
                }
            } else if let Some(v) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
                cur.id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
                cur.event = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                cur.data.push_str(v);
            }
        }
    });
    (child, rx)
}

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until the server closes; its close code.
pub(crate) async fn close_code(ws: &mut Ws) -> Option<u16> {
    while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, ws.next()).await {
        if let Message::Close(frame) = m {
            return frame.map(|f| u16::from(f.code));
        }
    }
    None
}

pub(crate) fn next_sse(rx: &Receiver<Sse>) -> Sse {
    rx.recv_timeout(WAIT).expect("no SSE event in time")
}

pub(crate) fn curl_post(url: &str, body: &[u8]) -> (u16, Value) {
    let mut child = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", "--data-binary", "@-", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(json).unwrap_or(Value::Null))
}

pub(crate) fn curl_get(url: &str) -> (u16, String) {
    let out = Command::new("curl").args(["-s", "-o", "-", "-w", "\n%{http_code}", url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

pub(crate) async fn subscribed(server: &Server, channel: &str) {
    // A subscriber is counted once its feed exists.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = curl_get(&format!("http://{}/healthz", server.addr));
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        if v["subscribers"].as_u64().unwrap_or(0) > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no subscriber on {channel}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_subscribe_with_filters_and_http_publish() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY, status text)").await.unwrap();
    let a = common::channel("ssea");
    pgpubsub::watch(&client, "t", Some(&a)).await.unwrap();
    let server = serve(&db, a.as_str(), &[]);
    let base = format!("http://{}", server.addr);
    let (mut all, all_rx) = sse(&format!("{base}/events?channel={a}"), None);
    let (mut upd, upd_rx) = sse(&format!("{base}/events?channel={a}&op=UPDATE&where=status:done"), None);
    subscribed(&server, a.as_str()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    client
        .batch_execute("INSERT INTO t VALUES (1, 'new'); UPDATE t SET status = 'done'; UPDATE t SET status = 'again';")
        .await
        .unwrap();
    let (code, v) = curl_post(&format!("{base}/publish/{a}"), b"from http");
    assert_eq!(code, 200, "{v}");
    assert!(v["seq"].as_i64().unwrap() > 0);

    let got: Vec<Sse> = (0..4).map(|_| next_sse(&all_rx)).collect();
    let kinds: Vec<&str> = got.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["change", "change", "change", "message"]);
    assert!(got.iter().all(|e| e.id.as_deref().is_some_and(|i| i.parse::<pgpubsub::Cursor>().is_ok())));
    let last: Value = serde_json::from_str(&got[3].data).unwrap();
    assert_eq!(last["payload"], "from http");

    let only = next_sse(&upd_rx);
    let v: Value = serde_json::from_str(&only.data).unwrap();
    assert_eq!((v["op"].as_str(), v["new"]["status"].as_str()), (Some("UPDATE"), Some("done")));
    assert!(upd_rx.recv_timeout(Duration::from_millis(500)).is_err(), "the filter let more through");
    let _ = (all.kill(), upd.kill());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_with_last_event_id_even_across_a_server_restart() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("resume");
    let server = serve(&db, ch.as_str(), &[]);
    let (mut first, rx) = sse(&format!("http://{}/events?channel={ch}", server.addr), None);
    subscribed(&server, ch.as_str()).await;
    for i in 0..3 {
        pgpubsub::publish(&client, &ch, &format!("seen {i}")).await.unwrap();
    }
    let seen: Vec<Sse> = (0..3).map(|_| next_sse(&rx)).collect();
    let last_id = seen[2].id.clone().unwrap();
    let _ = first.kill();
    drop(server);

    for i in 0..3 {
        pgpubsub::publish(&client, &ch, &format!("missed {i}")).await.unwrap();
    }
    let server = serve(&db, ch.as_str(), &[]);
    let (mut second, rx) = sse(&format!("http://{}/events?channel={ch}", server.addr), Some(&last_id));
    let mut payloads = Vec::new();
    while payloads.last().map(String::as_str) != Some("missed 2") {
        let e = next_sse(&rx);
        let v: Value = serde_json::from_str(&e.data).unwrap();
        payloads.push(v["payload"].as_str().unwrap().to_string());
    }
    // At least once: earlier ones may repeat; the missed ones all come, in order.
    let missed: Vec<&str> = payloads.iter().map(String::as_str).filter(|p| p.starts_with("missed")).collect();
    assert_eq!(missed, ["missed 0", "missed 1", "missed 2"]);
    let _ = second.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribe_receives_a_5mb_publish_whole() {
    let db = TestDb::new().await;
    let ch = common::channel("wsbig");
    let server = serve(&db, ch.as_str(), &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)).await.unwrap();
    ws.send(Message::Text(json!({"channels": [ch.as_str()]}).to_string().into())).await.unwrap();
    subscribed(&server, ch.as_str()).await;
    let big = "ünïcödé ".repeat(5_000_000 / 12);
    let (code, _) = curl_post(&format!("http://{}/publish/{ch}", server.addr), big.as_bytes());
    assert_eq!(code, 200);
    let frame = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let v: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(v["type"], "event");
    assert!(v["id"].as_str().unwrap().parse::<pgpubsub::Cursor>().is_ok());
    assert!(v["event"]["payload"].as_str() == Some(big.as_str()), "5 MB payload altered");
}

#[tokio::test]
async fn bad_requests_are_refused_clearly() {
    let db = TestDb::new().await;
    let ch = common::channel("refuse");
    let server = serve(&db, ch.as_str(), &[]);
    let base = format!("http://{}", server.addr);
    for (url, code, needle) in [
        (format!("{base}/events?channel=not_served"), 403, "not served"),
        (format!("{base}/events?channel=bad-name"), 400, "invalid channel name"),
        (format!("{base}/events?channel={ch}&op=MERGE"), 400, "expected INSERT"),
        (format!("{base}/events?channel={ch}&bogus=1"), 400, "unknown parameter"),
        (format!("{base}/events?channel={ch}&since=yesterday"), 400, "expected <txid>:<seq>"),
    ] {
        let (got, body) = curl_get(&url);
        assert_eq!(got, code, "{url}: {body}");
        assert!(body.contains(needle), "{url}: {body}");
    }
    let (code, v) = curl_post(&format!("{base}/publish/not_served"), b"x");
    assert_eq!((code, v["error"].as_str().is_some()), (403, true));
    let (code, _) = curl_post(&format!("{base}/publish/{ch}"), &[0xff, 0xfe]);
    assert_eq!(code, 400);

    for request in
        [json!({"channels": ["not_served"]}).to_string(), "not json".to_string(), json!({"nope": 1}).to_string()]
    {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)).await.unwrap();
        ws.send(Message::Text(request.clone().into())).await.unwrap();
        let first = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
        assert_eq!(v["type"], "error", "{request}");
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4400),
            other => panic!("{request}: expected close 4400, got {other:?}"),
        }
    }
}

/// A subscriber that stops reading: once the network buffers are full its
/// queue fills, it gets a lag notice with where to resume, and the stream
/// ends; the others are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_websocket_subscriber_is_told_it_lagged_and_closed() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("slow");
    let server = serve(&db, ch.as_str(), &["--queue", "32"]);
    let url = format!("ws://{}/ws", server.addr);
    let (mut slow, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    slow.send(Message::Text(json!({"channels": [ch.as_str()]}).to_string().into())).await.unwrap();
    let (mut fast, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    fast.send(Message::Text(json!({"channels": [ch.as_str()]}).to_string().into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let n = 600;
    let reader = tokio::spawn(async move {
        let mut count = 0;
        while count < n {
            let m = tokio::time::timeout(WAIT, fast.next()).await.unwrap().unwrap().unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "heartbeat" {
                continue;
            }
            assert_eq!(v["type"], "event", "the fast subscriber lagged: {v}");
            count += 1;
        }
    });
    // 600 × 64 KB: several times what the socket buffers hold for the slow one.
    let pad = "s".repeat(64 << 10);
    for _ in 0..n {
        pgpubsub::publish(&client, &ch, &pad).await.unwrap();
    }
    reader.await.unwrap();

    let mut saw_lag = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, slow.next()).await {
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "lagged" {
                    saw_lag = Some(v);
                }
            }
            Message::Close(frame) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(4000));
                break;
            }
            _ => {}
        }
    }
    let lag = saw_lag.expect("no lag notice");
    assert!(lag["missed"].as_u64().unwrap() > 0 && lag["resume"].as_str().unwrap().parse::<pgpubsub::Cursor>().is_ok());
}

#[tokio::test]
async fn healthz_and_metrics() {
    let db = TestDb::new().await;
    let ch = common::channel("ops");
    let server = serve(&db, ch.as_str(), &[]);
    let (code, body) = curl_get(&format!("http://{}/healthz", server.addr));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["status"].as_str(), v["listener"].as_str()), (Some("ok"), Some("listening")));
    let (code, text) = curl_get(&format!("http://{}/metrics", server.addr));
    assert_eq!(code, 200);
    for name in [
        "pgpubsub_events_in_total",
        "pgpubsub_deliveries_total",
        "pgpubsub_dropped_total",
        "pgpubsub_lag_notices_total",
        "pgpubsub_reconnects_total",
        "pgpubsub_polls_total",
        "pgpubsub_subscribers",
        "pgpubsub_notify_queue_usage",
        "pgpubsub_listener_up 1",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}

pub(crate) fn curl(method: &str, url: &str, body: Option<&str>, headers: &[&str]) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(json).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_store_over_http() {
    let db = TestDb::new().await;
    let server = serve(&db, "pubsub_store", &[]);
    let (mut changes, rx) = sse(&format!("http://{}/events?channel=pubsub_store", server.addr), None);
    subscribed(&server, "pubsub_store").await;
    let item = format!("http://{}/store/todos/{}", server.addr, common::unique("id"));

    assert_eq!(curl("PUT", &item, Some(r#"{"title":"write docs"}"#), &["If-Match: 0"]), (200, json!({"version": 1})));
    assert_eq!(curl("PUT", &item, Some(r#"{"title":"write more docs"}"#), &[]), (200, json!({"version": 2})));
    let (code, v) = curl("PUT", &item, Some(r#"{"title":"stale"}"#), &["If-Match: 1"]);
    assert_eq!(code, 409, "{v}");
    assert_eq!(curl("PUT", &item, Some("not json"), &[]).0, 400);
    assert_eq!(curl("GET", &item, None, &[]), (200, json!({"version": 2, "val": {"title": "write more docs"}})));
    assert_eq!(curl("DELETE", &item, None, &[]), (200, json!({"version": 3})));
    assert_eq!(curl("GET", &item, None, &[]).0, 404);
    assert_eq!(curl("DELETE", &item, None, &[]).0, 404);
    let (code, history) = curl("GET", &format!("{item}/history"), None, &[]);
    assert_eq!(code, 200);
    let kinds: Vec<&str> = history.as_array().unwrap().iter().map(|h| h["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["put", "put", "delete"]);

    // Every write was also an event on pubsub_store.
    let ops: Vec<String> = (0..3)
        .map(|_| serde_json::from_str::<Value>(&next_sse(&rx).data).unwrap()["op"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ops, ["INSERT", "UPDATE", "DELETE"]);
    let _ = changes.kill();
}

/// The fan-out benchmark itself, small, with the gateway fed from
/// PostgreSQL and from NATS (through a bridge): every delivery arrives.
#[cfg(feature = "load")]
#[tokio::test]
async fn the_fanout_benchmark_runs() {
    let nats = std::env::var("PGPUBSUB_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    for source in [None, Some(nats.as_str())] {
        let db = TestDb::new().await;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
        cmd.env("DATABASE_URL", &db.url).env("RUST_LOG", "warn");
        cmd.args(["load-fanout", "--clients", "20", "--events", "20", "--rate", "200", "--json"]);
        if let Some(url) = source {
            cmd.args(["--nats", url]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{source:?}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((v["deliveries"].as_u64(), v["lagged_clients"].as_u64()), (Some(400), Some(0)), "{v}");
        assert!(v["latency_ms"]["p99"].as_f64().unwrap() > 0.0 && v["server_cpu_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(v["source"], if source.is_some() { "nats" } else { "postgres" });
        assert_eq!(v["bridge_cpu_ms"].as_f64().unwrap() > 0.0, source.is_some(), "{v}");
    }
}

pub(crate) const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

pub(crate) fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

pub(crate) fn token(secret: &str, claims: Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).unwrap()
}

fn b64(v: &Value) -> String {
    // base64url without padding, by hand: the test must not trust the
    // library it is testing against to build an `alg: none` token.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = v.to_string().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_refusal_and_what_a_token_allows() {
    let db = TestDb::new().await;
    let ch = common::channel("secure");
    let other = common::channel("other");
    let server = serve(&db, &format!("{ch},{other}"), &["--jwt-secret", SECRET]);
    let base = format!("http://{}", server.addr);
    let events = format!("{base}/events?channel={ch}");
    let later = now_s() + 3600;
    let good = token(SECRET, json!({"exp": later, "read": [ch.as_str()], "write": [ch.as_str()]}));
    let none_alg =
        format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&json!({"exp": later, "read": ["*"]})));

    for (name, header, code) in [
        ("no token", None, 401),
        (
            "bad signature",
            Some(token("another-secret-of-at-least-32-bytes!!", json!({"exp": later, "read": ["*"]}))),
            401,
        ),
        ("alg none", Some(none_alg), 401),
        ("expired", Some(token(SECRET, json!({"exp": now_s() - 3600, "read": ["*"]}))), 401),
        ("not yet valid", Some(token(SECRET, json!({"exp": later, "nbf": later - 60, "read": ["*"]}))), 401),
        ("no exp", Some(token(SECRET, json!({"read": ["*"]}))), 401),
        ("channel not in claims", Some(token(SECRET, json!({"exp": later, "read": [other.as_str()]}))), 403),
    ] {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &events]);
        if let Some(t) = &header {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), code.to_string(), "{name}");
    }
    // Never in the URL.
    assert_eq!(curl_get(&format!("{events}&token={good}")).0, 400);

    // A good token: by header, and by cookie (what EventSource sends).
    let (mut by_header, rx1) = sse_with(&events, None, &[format!("Authorization: Bearer {good}")]);
    let (mut by_cookie, rx2) = sse_with(&events, None, &[format!("Cookie: theme=dark; pgpubsub_token={good}")]);
    subscribed(&server, ch.as_str()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let auth = format!("Authorization: Bearer {good}");
    assert_eq!(curl("POST", &format!("{base}/publish/{ch}"), Some("allowed"), &[auth.as_str()]).0, 200);
    assert_eq!(curl("POST", &format!("{base}/publish/{other}"), Some("denied"), &[auth.as_str()]).0, 403);
    assert_eq!(curl("POST", &format!("{base}/publish/{ch}"), Some("anonymous"), &[]).0, 401);
    for rx in [&rx1, &rx2] {
        let v: Value = serde_json::from_str(&next_sse(rx).data).unwrap();
        assert_eq!(v["payload"], "allowed");
    }
    let _ = (by_header.kill(), by_cookie.kill());

    // WebSocket: the token in the first message; refused ones close with 4401.
    let url = format!("ws://{}/ws", server.addr);
    let bad = token("another-secret-of-at-least-32-bytes!!", json!({"exp": later, "read": ["*"]}));
    for (request, expect) in [
        (json!({"channels": [ch.as_str()]}), 4401u16),
        (json!({"channels": [ch.as_str()], "token": bad}), 4401),
        (json!({"channels": [other.as_str()], "token": good}), 4400),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws.send(Message::Text(request.to_string().into())).await.unwrap();
        assert_eq!(close_code(&mut ws).await, Some(expect), "{request}");
    }
    // A token that expires in 2 s: the socket is closed when it does.
    let short = token(SECRET, json!({"exp": now_s() + 2, "read": [ch.as_str()]}));
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Text(json!({"channels": [ch.as_str()], "token": short}).to_string().into())).await.unwrap();
    let started = Instant::now();
    assert_eq!(close_code(&mut ws).await, Some(4401));
    assert!(started.elapsed() >= Duration::from_secs(1), "closed before the token expired");
}

/// With auth on, every store route asks for the store channel's claims.
#[tokio::test]
async fn the_store_requires_its_claims() {
    let db = TestDb::new().await;
    let server = serve(&db, "pubsub_store", &["--jwt-secret", SECRET]);
    let item = format!("http://{}/store/b/{}", server.addr, common::unique("id"));
    let later = now_s() + 3600;
    let reader = format!("Authorization: Bearer {}", token(SECRET, json!({"exp": later, "read": ["pubsub_store"]})));
    let writer = format!(
        "Authorization: Bearer {}",
        token(SECRET, json!({"exp": later, "read": ["pubsub_store"], "write": ["pubsub_store"]}))
    );
    for (method, body) in [("PUT", Some("{}")), ("GET", None), ("DELETE", None)] {
        assert_eq!(curl(method, &item, body, &[]).0, 401, "{method} without a token");
    }
    assert_eq!(curl("GET", &format!("{item}/history"), None, &[]).0, 401);
    assert_eq!(curl("PUT", &item, Some("{}"), &[reader.as_str()]).0, 403);
    assert_eq!(curl("DELETE", &item, None, &[reader.as_str()]).0, 403);
    assert_eq!(curl("PUT", &item, Some("{}"), &[writer.as_str()]).0, 200);
    assert_eq!(curl("GET", &item, None, &[reader.as_str()]).0, 200);
    assert_eq!(curl("GET", &format!("{item}/history"), None, &[reader.as_str()]).0, 200);
    assert_eq!(curl("DELETE", &item, None, &[writer.as_str()]).0, 200);
}

/// SIGTERM with subscribers connected: their streams end (WebSocket close
/// 1001), and the server exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_streams_and_exits() {
    let db = TestDb::new().await;
    let ch = common::channel("term");
    let mut server = serve_process(&db.url, ch.as_str(), &[]);
    let (mut sse_client, _rx) = sse(&format!("http://{}/events?channel={ch}", server.addr), None);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)).await.unwrap();
    ws.send(Message::Text(json!({"channels": [ch.as_str()]}).to_string().into())).await.unwrap();
    subscribed(&server, ch.as_str()).await;

    Command::new("kill").args(["-TERM", &server.child().id().to_string()]).status().unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1001));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = server.child().try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // The SSE client saw its stream end.
    let deadline = Instant::now() + WAIT;
    while sse_client.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the SSE stream did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// PostgreSQL itself restarts under the gateway (a cluster of the test's
/// own): the subscriber's stream goes on, and what was published around the
/// restart arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_keeps_its_stream_across_a_database_restart() {
    let cluster = tokio::task::spawn_blocking(|| crate::cluster::Cluster::start(false)).await.unwrap();
    let url = cluster.url("postgres");
    let config: pgpubsub::db::Config = url.parse().unwrap();
    let mut client = pgpubsub::db::connect(&config).await.unwrap();
    pgpubsub::migrate::up(&mut client, false).await.unwrap();
    let ch = common::channel("dbrestart");

    let server = serve_url(&url, ch.as_str(), &[]);

    let (mut sub, rx) = sse(&format!("http://{}/events?channel={ch}", server.addr), None);
    subscribed(&server, ch.as_str()).await;
    pgpubsub::publish(&client, &ch, "before").await.unwrap();
    let cluster = std::sync::Arc::new(cluster);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart("fast")).await.unwrap();
    let client = pgpubsub::db::connect(&config).await.unwrap();
    pgpubsub::publish(&client, &ch, "after").await.unwrap();

    let mut payloads = Vec::new();
    while payloads.last().map(String::as_str) != Some("after") {
        let e = next_sse(&rx);
        let v: Value = serde_json::from_str(&e.data).unwrap();
        payloads.push(v["payload"].as_str().unwrap().to_string());
    }
    assert_eq!(payloads.first().map(String::as_str), Some("before"));
    let _ = sub.kill();
    drop(server);
}

/// Resuming from a position the log was pruned past: an explicit `resync`
/// first, then the events still kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_past_retention_gets_a_resync() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("resync");
    let server = serve(&db, ch.as_str(), &[]);
    let (_, body) = curl_get(&format!("http://{}/healthz", server.addr));
    let old: String = serde_json::from_str::<Value>(&body).unwrap()["position"].as_str().unwrap().to_string();
    for i in 0..3 {
        pgpubsub::publish(&client, &ch, &format!("pruned {i}")).await.unwrap();
    }
    let policy = pgpubsub::retention::Retention::new(None, Some(1));
    assert_eq!(pgpubsub::retention::prune(&client, policy).await.unwrap(), 2);
    let (mut c, rx) = sse(&format!("http://{}/events?channel={ch}", server.addr), Some(&old));
    let first = next_sse(&rx);
    assert_eq!(first.event, "resync", "{first:?}");
    let kept = next_sse(&rx);
    let v: Value = serde_json::from_str(&kept.data).unwrap();
    assert_eq!(v["payload"], "pruned 2");
    let _ = c.kill();
}
