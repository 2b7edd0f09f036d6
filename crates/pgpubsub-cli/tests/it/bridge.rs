//! `pgpubsub bridge` against the real NATS server: every committed event in
//! the stream exactly once, in commit order, through faults. Concurrent
//! writers tag every row (writer, n); faults are injected while they write;
//! a checker reads the stream back and counts lost, duplicated, unexpected
//! and out-of-order events (per writer: a writer's rows commit one after
//! the other). Each test has a database, channel, stream and subject prefix
//! of its own; the NATS-restart test also a nats-server of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use pgpubsub::db::Config;
use pgpubsub::Channel;
use serde_json::Value;

use crate::cluster::Cluster;
use crate::common::{self, TestDb, WAIT};

/// The shared NATS server (JetStream on); override with PGPUBSUB_TEST_NATS.
fn shared_nats() -> String {
    std::env::var("PGPUBSUB_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A nats-server of the test's own, on a free port with its own store, so
/// the test can kill and restart it.
struct Nats {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    fn start() -> Nats {
        let dir = std::env::temp_dir().join(common::unique("pgpubsub_nats"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut nats = Nats { child: None, port, dir };
        nats.spawn();
        nats
    }

    fn spawn(&mut self) {
        let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd", self.dir.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (set NATS_SERVER to its path)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then the same server again (same port, same store).
    fn restart(&mut self) {
        self.kill();
        std::thread::sleep(Duration::from_millis(300));
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A stream of the test's own; deleted when the test ends.
struct TestStream {
    nats: String,
    name: String,
    prefix: String,
}

impl TestStream {
    fn new(nats: &str) -> TestStream {
        let id = common::unique("b");
        TestStream { nats: nats.to_string(), name: format!("T{id}"), prefix: format!("t{id}") }
    }

    async fn js(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(&self.nats).await.unwrap())
    }

    /// Every message, in stream order, retried while the server restarts.
    async fn read(&self) -> Vec<Stored> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.try_read().await {
                Ok(all) => return all,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot read stream {}: {e}", self.name);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn try_read(&self) -> Result<Vec<Stored>, async_nats::Error> {
        use futures_util::StreamExt;
        let js = self.js().await;
        let mut stream = js.get_stream(&self.name).await?;
        let state = stream.info().await?.state.clone();
        let mut all = Vec::new();
        if state.messages == 0 {
            return Ok(all);
        }
        // An ordered consumer: every message, in stream order, fast.
        let consumer = stream.create_consumer(jetstream::consumer::pull::OrderedConfig::default()).await?;
        let mut messages = consumer.messages().await?;
        loop {
            let m = tokio::time::timeout(WAIT, messages.next()).await?.ok_or("the consumer ended")??;
            let at = m.info()?.stream_sequence;
            let headers = m.headers.clone().unwrap_or_default();
            let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
            all.push(Stored {
                subject: m.subject.to_string(),
                // A standard header: looked up by its constant, not by text.
                msg_id: headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.to_string()).unwrap_or_default(),
                seq: header("Pgpubsub-Seq").and_then(|s| s.parse().ok()).unwrap_or(-1),
                kind: header("Pgpubsub-Kind"),
                table: header("Pgpubsub-Table"),
                op: header("Pgpubsub-Op"),
                payload: String::from_utf8(m.payload.to_vec()).unwrap(),
            });
            if at >= state.last_sequence {
                return Ok(all);
            }
        }
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (nats, name) = (self.nats.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let connect = tokio::time::timeout(Duration::from_secs(2), async_nats::connect(&nats)).await;
                if let Ok(Ok(client)) = connect {
                    let _ = jetstream::new(client).delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

/// One message read back.
#[derive(Debug, Clone)]
struct Stored {
    subject: String,
    msg_id: String,
    seq: i64,
    kind: Option<String>,
    table: Option<String>,
    op: Option<String>,
    payload: String,
}

/// A `pgpubsub bridge` process; SIGKILLed on drop. Its log lines are kept.
struct Bridge {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Bridge {
    fn spawn(db_url: &str, nats: &str, channel: &Channel, name: &str, stream: &TestStream, extra: &[&str]) -> Bridge {
        let mut args = vec!["--channel", channel.as_str()];
        args.extend(extra);
        Bridge::spawn_all(db_url, nats, name, stream, &args)
    }

    /// Without `--channel`: every channel.
    fn spawn_all(db_url: &str, nats: &str, name: &str, stream: &TestStream, extra: &[&str]) -> Bridge {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgpubsub"))
            .env_remove("PUB_SUB_CHANNEL")
            .env("DATABASE_URL", db_url)
            .env("RUST_LOG", "warn,pgpubsub=info")
            .args(["bridge", "--nats", nats, "--name", name])
            .args(["--stream", &stream.name, "--subject-prefix", &stream.prefix])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Bridge { child, log }
    }

    fn logged(&self, needle: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `needle` has been logged `times` times.
    async fn wait_log(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + WAIT;
        while self.logged(needle) < times {
            assert!(Instant::now() < deadline, "bridge never logged {needle:?} ×{times}:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET /metrics`, once the bridge has said where it serves them.
    async fn metrics(&self) -> String {
        self.wait_log("metrics on http://", 1).await;
        let line = self.log.lock().unwrap().iter().find(|l| l.contains("metrics on http://")).cloned().unwrap();
        let addr = line.split("metrics on http://").nth(1).unwrap().split('/').next().unwrap().to_string();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of a metric line `name value` (or `name{...} value`).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

fn spawn_writers(
    config: &Config,
    writers: i32,
    rows: i32,
    batch: i32,
    pause: Duration,
) -> Vec<tokio::task::JoinHandle<()>> {
    // Every 25th row travels large.
    (0..writers)
        .map(|id| tokio::spawn(common::write_rows(config.clone(), id, rows, batch, pause, (25, 20_000))))
        .collect()
}

/// What the checker found in the stream.
#[derive(Debug, Default)]
struct Report {
    expected: usize,
    stored: usize,
    lost: Vec<(i32, i32)>,
    unexpected: Vec<(i32, i32)>,
    duplicates: usize,
    out_of_order: usize,
    /// Messages whose subject, id or seq header disagree with the event.
    malformed: usize,
}

/// The row [`check`] writes last, after the writers: its event is the fence.
const FENCE_ROW: (i32, i32) = (-1, 0);

/// Waits for the writers, writes one more row (the fence, [`FENCE_ROW`]),
/// waits until the stream holds its event (or the wait runs out), and
/// compares. The bridge stores events in log order, so whatever it stores
/// for the rows before the fence, a late re-send included, is in the
/// stream by then: no fixed wait for duplicates.
async fn check(
    config: &Config,
    stream: &TestStream,
    channel: &Channel,
    writers: Vec<tokio::task::JoinHandle<()>>,
) -> Report {
    for w in writers {
        tokio::time::timeout(Duration::from_secs(90), w).await.expect("writers finish").unwrap();
    }
    let client = pgpubsub::db::connect(config).await.unwrap();
    client.execute("INSERT INTO w VALUES ($1, $2, 'fence')", &[&FENCE_ROW.0, &FENCE_ROW.1]).await.unwrap();
    let rows = client.query("SELECT writer, n FROM w", &[]).await.unwrap();
    let expected: BTreeSet<(i32, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = stream.read().await;
        if holds_fence_row(&stored) || Instant::now() > deadline {
            return compare(&expected, &stored, stream, channel);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether the stream holds the event of [`FENCE_ROW`].
fn holds_fence_row(stored: &[Stored]) -> bool {
    stored.iter().any(|m| {
        let event: Value = serde_json::from_str(&m.payload).unwrap();
        (event["new"]["writer"].as_i64(), event["new"]["n"].as_i64())
            == (Some(i64::from(FENCE_ROW.0)), Some(i64::from(FENCE_ROW.1)))
    })
}

fn compare(expected: &BTreeSet<(i32, i32)>, stored: &[Stored], stream: &TestStream, channel: &Channel) -> Report {
    let mut seen: BTreeMap<(i32, i32), usize> = BTreeMap::new();
    let mut last: BTreeMap<i32, i32> = BTreeMap::new();
    let mut report = Report { expected: expected.len(), stored: stored.len(), ..Report::default() };
    let subject = format!("{}.{channel}", stream.prefix);
    for m in stored {
        let event: Value = serde_json::from_str(&m.payload).unwrap();
        let seq = event["seq"].as_i64().unwrap();
        if m.subject != subject || m.seq != seq || !m.msg_id.ends_with(&format!(":{seq}")) {
            report.malformed += 1;
        }
        let key = (event["new"]["writer"].as_i64().unwrap() as i32, event["new"]["n"].as_i64().unwrap() as i32);
        let count = seen.entry(key).or_default();
        *count += 1;
        if *count > 1 {
            report.duplicates += 1;
            continue;
        }
        if last.get(&key.0).is_some_and(|&prev| prev > key.1) {
            report.out_of_order += 1;
        }
        last.insert(key.0, key.1);
    }
    report.lost = expected.iter().filter(|k| !seen.contains_key(k)).copied().collect();
    report.unexpected = seen.keys().filter(|k| !expected.contains(k)).copied().collect();
    report
}

fn assert_exactly_once(r: &Report, logs: &str) {
    assert!(r.expected > 0, "{r:?}");
    assert!(
        r.lost.is_empty(),
        "lost {} of {}: {:?}\n{logs}",
        r.lost.len(),
        r.expected,
        &r.lost[..r.lost.len().min(20)]
    );
    assert!(r.unexpected.is_empty(), "unexpected: {:?}", r.unexpected);
    assert_eq!(r.duplicates, 0, "duplicates in the stream: {r:?}\n{logs}");
    assert_eq!(r.out_of_order, 0, "out of order: {r:?}\n{logs}");
    assert_eq!(r.malformed, 0, "{r:?}");
    assert_eq!(r.stored, r.expected, "{r:?}");
}

/// While writers run: twice, SIGKILL the bridge 900 ms in and start another
/// (`start`) once it is gone, waiting for its `ready` line. Returns the
/// killed bridges' logs.
async fn kill_twice(bridge: &mut Bridge, start: impl Fn() -> Bridge, ready: &str) -> String {
    let mut logs = String::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        bridge.kill();
        logs.push_str(&bridge.logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
        *bridge = start();
        bridge.wait_log(ready, 1).await;
    }
    logs
}

/// `pgpubsub listen --json` on the same channel, for comparison.
fn spawn_listen(db_url: &str, channel: &Channel, count: usize) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgpubsub"))
        .env_remove("PUB_SUB_CHANNEL")
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn,pgpubsub=info")
        .args(["listen", "--json", "--channel", channel.as_str(), "--count", &count.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = BufReader::new(child.stderr.take().unwrap());
    let t = tx.clone();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            if line.contains("listening") {
                let _ = t.send("<listening>".to_string());
            }
        }
    });
    let out = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), "<listening>");
    (child, rx)
}

/// The stream holds `n` messages (waits up to [`WAIT`]).
async fn wait_stored(stream: &TestStream, n: usize) -> Vec<Stored> {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = stream.read().await;
        if all.len() >= n {
            return all;
        }
        assert!(Instant::now() < deadline, "the stream holds {} of {n} messages", all.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The stream once it holds a message whose payload is `payload` (waits up
/// to [`WAIT`]): a fence. The bridge stores events in log order, so what it
/// stores for events before the fence, a late copy included, is in by then.
async fn wait_for_payload(stream: &TestStream, payload: &str) -> Vec<Stored> {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = stream.read().await;
        if payloads(&all).iter().any(|p| p == payload) {
            return all;
        }
        assert!(Instant::now() < deadline, "{payload:?} is not in the stream: {:?}", payloads(&all));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The published messages' payloads, in stream order.
fn payloads(stored: &[Stored]) -> Vec<String> {
    stored
        .iter()
        .map(|m| serde_json::from_str::<Value>(&m.payload).unwrap()["payload"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_copies_every_kind_of_event_exactly_as_listen_prints_it() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("bexact");
    client.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)").await.unwrap();
    pgpubsub::watch(&client, "items", Some(&ch)).await.unwrap();
    let stream = TestStream::new(&shared_nats());
    let (listen, lines) = spawn_listen(&db.url, &ch, 7);
    let bridge = Bridge::spawn(&db.url, &shared_nats(), &ch, &common::unique("exact"), &stream, &[]);
    bridge.wait_log("copying", 1).await;

    client.batch_execute("INSERT INTO items VALUES (1, 'tea')").await.unwrap();
    client.batch_execute("UPDATE items SET name = 'thé \"vert\"\n' WHERE id = 1").await.unwrap();
    client.batch_execute("DELETE FROM items WHERE id = 1").await.unwrap();
    for payload in ["plain".to_string(), "é\u{1F600}\\\"".repeat(3), "c".repeat(30_000), "r".repeat(400_000)] {
        pgpubsub::publish(&client, &ch, &payload).await.unwrap();
    }

    let mut printed = Vec::new();
    while printed.len() < 7 {
        printed.push(lines.recv_timeout(WAIT).expect("listen prints every event"));
    }
    let stored = wait_stored(&stream, 7).await;
    assert_eq!(stored.len(), 7, "{stored:?}");
    for (m, line) in stored.iter().zip(&printed) {
        assert!(m.payload == *line, "stream body differs from listen --json:\n{}\n{}", m.payload, line);
        assert_eq!(m.subject, format!("{}.{ch}", stream.prefix));
        let event: Value = serde_json::from_str(line).unwrap();
        assert_eq!(m.seq, event["seq"].as_i64().unwrap());
        assert_eq!(m.kind.as_deref(), event["kind"].as_str());
        if event["kind"] == "change" {
            assert_eq!(m.table.as_deref(), Some("public.items"));
            assert_eq!(m.op.as_deref(), event["op"].as_str());
        } else {
            assert_eq!((m.table.as_deref(), m.op.as_deref()), (None, None));
        }
    }
    let ids: BTreeSet<&str> = stored.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), 7, "ids are unique");
    let source: String = client
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text || '-' || \
             (SELECT oid FROM pg_database WHERE datname = current_database())::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored[0].msg_id, format!("{source}:{}", stored[0].seq));
    drop(listen);
}

/// The bridge is killed (SIGKILL) twice while writers run and started again:
/// what the crash left unacknowledged or unsaved is sent again, and
/// JetStream's deduplication (and the chain) keep it to one copy each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_sigkilled_mid_stream_leaves_every_event_once_in_order() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "bw").await;
    let stream = TestStream::new(&shared_nats());
    let name = common::unique("kill");
    let start = || Bridge::spawn(&db.url, &shared_nats(), &ch, &name, &stream, &[]);
    let mut bridge = start();
    bridge.wait_log("copying", 1).await;
    let writers = spawn_writers(&db.config, 3, 400, 1, Duration::from_millis(4));
    let mut logs = kill_twice(&mut bridge, start, "copying").await;
    let r = check(&db.config, &stream, &ch, writers).await;
    logs.push_str(&bridge.logs());
    assert_exactly_once(&r, &logs);
}

/// Deduplication by itself: the cursor is moved back, so a restarted bridge
/// sends every event again; JetStream keeps one copy and says duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_again_are_dropped_by_their_msg_id() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("bdedup");
    let stream = TestStream::new(&shared_nats());
    let name = common::unique("dedup");
    let mut bridge = Bridge::spawn(&db.url, &shared_nats(), &ch, &name, &stream, &[]);
    bridge.wait_log("copying", 1).await;
    for i in 0..10 {
        pgpubsub::publish(&client, &ch, &format!("m{i}")).await.unwrap();
    }
    wait_stored(&stream, 10).await;
    bridge.kill();
    let moved = client
        .execute("UPDATE pubsub.cursors SET txid = '1'::xid8, seq = 0 WHERE name = $1", &[&format!("bridge:{name}")])
        .await
        .unwrap();
    assert_eq!(moved, 1, "the bridge stores its cursor as bridge:<name>");
    let bridge = Bridge::spawn(&db.url, &shared_nats(), &ch, &name, &stream, &["--metrics-bind", "127.0.0.1:0"]);
    pgpubsub::publish(&client, &ch, "after").await.unwrap();
    let all = wait_stored(&stream, 11).await;
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = bridge.metrics().await;
        if metric(&text, "pgpubsub_bridge_published_total") >= 1.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(&text, "pgpubsub_bridge_duplicates_total"), 10.0, "{text}");
    assert_eq!(metric(&text, "pgpubsub_bridge_published_total"), 1.0, "{text}");
    // No copy of an earlier event arrives late: the bridge stores in log
    // order, so any would be in the stream before a later event.
    pgpubsub::publish(&client, &ch, "fence").await.unwrap();
    let all_after = wait_for_payload(&stream, "fence").await;
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).chain(["after".into(), "fence".into()]).collect();
    assert_eq!(payloads(&all_after), want, "{all:?}");
}

/// A backlog of several catch-up pages, written while the bridge was
/// stopped (SIGTERM: it stores its cursor and exits 0), is copied whole and
/// in order when it comes back; then, idle, it stores a cursor past
/// everything it copied within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_copied_and_an_idle_bridge_stores_its_cursor() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "bw").await;
    let stream = TestStream::new(&shared_nats());
    let name = common::unique("backlog");
    let mut bridge = Bridge::spawn(&db.url, &shared_nats(), &ch, &name, &stream, &[]);
    bridge.wait_log("copying", 1).await;
    let _ = Command::new("kill").args(["-TERM", &bridge.child.id().to_string()]).status();
    let status = tokio::task::spawn_blocking(move || {
        let status = bridge.child.wait().unwrap();
        (bridge, status)
    });
    let (bridge, status) = tokio::time::timeout(WAIT, status).await.unwrap().unwrap();
    assert!(status.success(), "{status}\n{}", bridge.logs());
    drop(bridge);

    // 12,400 events: the bridge's catch-up pages are 5,000, the last partial.
    let writers = spawn_writers(&db.config, 2, 6200, 100, Duration::ZERO);
    for w in writers {
        w.await.unwrap();
    }
    let bridge = Bridge::spawn(&db.url, &shared_nats(), &ch, &name, &stream, &[]);
    let started = Instant::now();
    wait_stored(&stream, 12_400).await;
    let copied = started.elapsed();
    let r = check(&db.config, &stream, &ch, Vec::new()).await;
    assert_exactly_once(&r, &bridge.logs());
    assert!(copied < Duration::from_secs(15), "3 pages took {copied:?}");

    let client = db.client().await;
    let last: (String, i64) = client
        .query_one("SELECT txid::text, seq FROM pubsub.events ORDER BY txid DESC, seq DESC LIMIT 1", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    // Within a heartbeat or two, unless a transaction elsewhere in the
    // cluster (another test's) holds every cursor back for a while.
    let deadline = Instant::now() + WAIT;
    loop {
        let covered: bool = client
            .query_one(
                "SELECT (txid, seq) >= ($2::text::xid8, $3::bigint) FROM pubsub.cursors WHERE name = $1",
                &[&format!("bridge:{name}"), &last.0, &last.1],
            )
            .await
            .unwrap()
            .get(0);
        if covered {
            break;
        }
        assert!(Instant::now() < deadline, "the idle bridge's stored cursor does not cover its last event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The test's own nats-server is killed (SIGKILL) and started again twice
/// while writers run: publishes fail, time out or vanish with the server;
/// the bridge sends them again until acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream_leaves_every_event_once_in_order() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "bw").await;
    let mut nats = tokio::task::spawn_blocking(Nats::start).await.unwrap();
    let stream = TestStream::new(&nats.url());
    let bridge = Bridge::spawn(&db.url, &nats.url(), &ch, &common::unique("natsrestart"), &stream, &[]);
    bridge.wait_log("copying", 1).await;
    // Batches faster than the bridge copies them: publishes are in flight
    // whenever the server dies. Enough of them to outlast every restart
    // below on a slow machine (6000 rows each were done after two).
    let writers = spawn_writers(&db.config, 3, 15000, 50, Duration::from_millis(2));
    // At least twice, and until a restart caught publishes in flight (the
    // point of the test; how many are in flight at a kill is up to timing).
    for round in 0..6 {
        if round >= 2 && bridge.logged("publishing to JetStream failed") >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        nats = tokio::task::spawn_blocking(move || {
            nats.restart();
            nats
        })
        .await
        .unwrap();
    }
    let r = check(&db.config, &stream, &ch, writers).await;
    assert_exactly_once(&r, &bridge.logs());
    assert!(bridge.logged("NATS disconnected") >= 2, "{}", bridge.logs());
    assert!(bridge.logged("publishing to JetStream failed") >= 1, "nothing was in flight:\n{}", bridge.logs());
}

/// NATS is down while events commit; the bridge, unable to publish them,
/// is killed; NATS comes back, the bridge too: every event arrives. Its
/// cursor never moved past events JetStream had not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_while_nats_is_down_loses_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("bdown");
    let mut nats = tokio::task::spawn_blocking(Nats::start).await.unwrap();
    let stream = TestStream::new(&nats.url());
    let name = common::unique("down");
    let mut bridge = Bridge::spawn(&db.url, &nats.url(), &ch, &name, &stream, &[]);
    bridge.wait_log("copying", 1).await;
    for i in 0..5 {
        pgpubsub::publish(&client, &ch, &format!("m{i}")).await.unwrap();
    }
    wait_stored(&stream, 5).await;
    nats.kill();
    bridge.wait_log("NATS disconnected", 1).await;
    for i in 5..25 {
        pgpubsub::publish(&client, &ch, &format!("m{i}")).await.unwrap();
    }
    // Several cursor-store periods and heartbeats pass with nothing
    // acknowledged: the time a bug would need to store the cursor past them
    // (this wait proves nothing by itself; the count at the end does).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let logs = bridge.logs();
    bridge.kill();
    nats = tokio::task::spawn_blocking(move || {
        nats.spawn();
        nats
    })
    .await
    .unwrap();
    let bridge = Bridge::spawn(&db.url, &nats.url(), &ch, &name, &stream, &[]);
    let all = wait_stored(&stream, 25).await;
    // Nothing more comes late: a later event is stored after anything the
    // bridge would still send for the earlier ones.
    pgpubsub::publish(&client, &ch, "fence").await.unwrap();
    let all_after = wait_for_payload(&stream, "fence").await;
    let want: Vec<String> = (0..25).map(|i| format!("m{i}")).chain(["fence".into()]).collect();
    assert_eq!(payloads(&all_after), want, "{all:?}\n{logs}\n---\n{}", bridge.logs());
}

/// Every PostgreSQL backend of the bridge (the LISTEN connection, the log's,
/// the lock's) is terminated, twice, while writers run. Losing the lock's
/// session stops copying; the bridge takes the lock again and resumes from
/// its stored cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_backends_terminated_mid_stream_leave_every_event_once_in_order() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "bw").await;
    let stream = TestStream::new(&shared_nats());
    let bridge = Bridge::spawn(&db.url, &shared_nats(), &ch, &common::unique("pgkill"), &stream, &[]);
    bridge.wait_log("copying", 1).await;
    let writers = spawn_writers(&db.config, 3, 400, 1, Duration::from_millis(4));
    let admin = db.client().await;
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let killed: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name LIKE 'pgpubsub%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(killed >= 3, "killed {killed}");
        bridge.wait_log("copying", round + 1).await;
    }
    let r = check(&db.config, &stream, &ch, writers).await;
    assert_exactly_once(&r, &bridge.logs());
    assert!(bridge.logged("lost the lock's session") >= 2, "{}", bridge.logs());
}

/// PostgreSQL itself restarts (`fast`, then `immediate`) while writers run:
/// a cluster of the test's own, as in faults.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_leaves_every_event_once_in_order() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(false)).await.unwrap();
    let url = cluster.url("postgres");
    let config: Config = url.parse().unwrap();
    let mut client = pgpubsub::db::connect(&config).await.unwrap();
    pgpubsub::migrate::up(&mut client, false).await.unwrap();
    let ch = common::workload_table(&config, "bw").await;
    let stream = TestStream::new(&shared_nats());
    let bridge = Bridge::spawn(&url, &shared_nats(), &ch, &common::unique("pgrestart"), &stream, &[]);
    bridge.wait_log("copying", 1).await;
    let writers = spawn_writers(&config, 2, 400, 1, Duration::from_millis(6));
    let cluster = Arc::new(cluster);
    for mode in ["fast", "immediate"] {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.restart(mode)).await.unwrap();
    }
    let r = check(&config, &stream, &ch, writers).await;
    assert_exactly_once(&r, &bridge.logs());
}

/// Two bridges with one name: one copies, the other stands by and says who
/// is active (log and /metrics). The active one is SIGKILLed mid-stream; the
/// standby takes over within seconds and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_seconds_when_the_active_bridge_dies() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "bw").await;
    let stream = TestStream::new(&shared_nats());
    let name = common::unique("pair");
    let metrics = ["--metrics-bind", "127.0.0.1:0"];
    let a = Bridge::spawn(&db.url, &shared_nats(), &ch, &name, &stream, &metrics);
    a.wait_log("copying", 1).await;
    let b = Bridge::spawn(&db.url, &shared_nats(), &ch, &name, &stream, &metrics);
    b.wait_log("standby: another bridge is active", 1).await;
    let a_pid = a.child.id();
    assert!(b.logs().contains(&format!(":{a_pid} (backend pid")), "the standby names the active bridge:\n{}", b.logs());
    let text = b.metrics().await;
    assert_eq!(metric(&text, "pgpubsub_bridge_active"), 0.0);
    assert!(text.contains(&format!(":{a_pid} (backend pid")), "{text}");
    assert_eq!(metric(&a.metrics().await, "pgpubsub_bridge_active"), 1.0);

    let writers = spawn_writers(&db.config, 3, 400, 1, Duration::from_millis(4));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut a = a;
    let logs_a = a.logs();
    a.kill();
    let killed = Instant::now();
    b.wait_log("active: this bridge holds the lock", 1).await;
    let takeover = killed.elapsed();
    eprintln!("the standby took over {takeover:?} after the active bridge was killed");
    assert!(takeover < Duration::from_secs(3), "took over after {takeover:?}");
    let r = check(&db.config, &stream, &ch, writers).await;
    assert_exactly_once(&r, &format!("{logs_a}\n---\n{}", b.logs()));
    let text = b.metrics().await;
    assert_eq!(metric(&text, "pgpubsub_bridge_active"), 1.0);
    assert!(text.contains(&format!(":{}\"", b.child.id())), "{text}");
}

/// The next JSON message of a WebSocket.
async fn next_ws(ws: &mut crate::serve::Ws) -> Value {
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.expect("no WebSocket message in time").unwrap().unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "heartbeat" {
                return v;
            }
        }
    }
}

/// A WebSocket subscriber from `since` (or from now), once subscribed.
async fn ws_subscribe(addr: &str, channel: &Channel, since: Option<&str>) -> crate::serve::Ws {
    use futures_util::SinkExt;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await.unwrap();
    let mut request = serde_json::json!({"channels": [channel.as_str()], "ack": true});
    if let Some(since) = since {
        request["since"] = since.into();
    }
    ws.send(tokio_tungstenite::tungstenite::Message::Text(request.to_string().into())).await.unwrap();
    assert_eq!(next_ws(&mut ws).await["type"], "subscribed");
    ws
}

/// `serve --source nats`: a gateway fed from the stream the bridge writes
/// serves SSE and WebSocket subscribers; publishing through it writes to
/// PostgreSQL and comes back through the stream; ids are stream positions,
/// and both kinds of subscriber resume from them across a gateway restart,
/// missing nothing and repeating nothing. A position from a gateway fed by
/// PostgreSQL gets a `resync`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_fed_from_nats_serves_and_resumes_across_a_restart() {
    use crate::serve::{curl_post, next_sse, serve, sse, subscribed};
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("natsgw");
    let stream = TestStream::new(&shared_nats());
    let bridge = Bridge::spawn(&db.url, &stream.nats, &ch, &common::unique("gw"), &stream, &[]);
    bridge.wait_log("copying", 1).await;
    // The bridge creates the stream; the gateway needs it.
    pgpubsub::publish(&client, &ch, "before the gateway").await.unwrap();
    wait_stored(&stream, 1).await;
    let flags = ["--source", "nats", &stream.nats, "--stream", &stream.name, "--subject-prefix", &stream.prefix];
    let server = serve(&db, "", &flags);
    let base = format!("http://{}", server.addr);
    let (mut first_sse, rx) = sse(&format!("{base}/events?channel={ch}"), None);
    subscribed(&server, ch.as_str()).await;
    let mut ws = ws_subscribe(&server.addr, &ch, None).await;

    let (code, v) = curl_post(&format!("{base}/publish/{ch}"), b"through the gateway");
    assert_eq!(code, 200, "{v}");
    pgpubsub::publish(&client, &ch, "straight to PostgreSQL").await.unwrap();
    let live: Vec<_> = (0..2).map(|_| next_sse(&rx)).collect();
    let payload = |data: &str| serde_json::from_str::<Value>(data).unwrap()["payload"].as_str().unwrap().to_string();
    assert_eq!(
        live.iter().map(|e| payload(&e.data)).collect::<Vec<_>>(),
        ["through the gateway", "straight to PostgreSQL"]
    );
    let sse_id = live[0].id.clone().unwrap();
    assert!(sse_id.starts_with("0:"), "a stream position: {sse_id}");
    let w1 = next_ws(&mut ws).await;
    let w2 = next_ws(&mut ws).await;
    assert_eq!(
        (w1["event"]["payload"].as_str(), w2["event"]["payload"].as_str()),
        (Some("through the gateway"), Some("straight to PostgreSQL"))
    );
    assert_eq!(w1["id"].as_str(), Some(sse_id.as_str()), "the same position on both transports");

    // The gateway goes away; events go on into the stream meanwhile.
    drop(server);
    let _ = (first_sse.kill(), first_sse.wait());
    drop(ws);
    for i in 0..3 {
        pgpubsub::publish(&client, &ch, &format!("while down {i}")).await.unwrap();
    }
    wait_stored(&stream, 6).await;
    let server = serve(&db, "", &flags);
    let base = format!("http://{}", server.addr);
    let want = ["straight to PostgreSQL", "while down 0", "while down 1", "while down 2", "after"];

    let (mut resumed, rx) = sse(&format!("{base}/events?channel={ch}"), Some(&sse_id));
    let mut ws = ws_subscribe(&server.addr, &ch, Some(&sse_id)).await;
    subscribed(&server, ch.as_str()).await;
    pgpubsub::publish(&client, &ch, "after").await.unwrap();
    let got: Vec<String> = (0..want.len()).map(|_| payload(&next_sse(&rx).data)).collect();
    assert_eq!(got, want, "SSE resumed from {sse_id}");
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(next_ws(&mut ws).await["event"]["payload"].as_str().unwrap().to_string());
    }
    assert_eq!(got, want, "WebSocket resumed from {sse_id}");
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "nothing more, nothing twice");

    // A position of PostgreSQL's log means nothing to the stream: resync.
    let (mut other, rx) = sse(&format!("{base}/events?channel={ch}&since=12345:6"), None);
    let resync = next_sse(&rx);
    assert_eq!(resync.event, "resync");
    assert!(resync.id.as_deref().is_some_and(|id| id.starts_with("0:")), "resume after it from the stream: {resync:?}");
    let _ = (resumed.kill(), other.kill());
}

/// Without `--channel` the bridge copies every channel, one that first
/// appears after it started included, each to its own subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channels_the_bridge_copies_every_channel() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let stream = TestStream::new(&shared_nats());
    let bridge = Bridge::spawn_all(&db.url, &stream.nats, &common::unique("all"), &stream, &[]);
    bridge.wait_log("copying", 1).await;
    let (a, b) = (common::channel("alla"), common::channel("allb"));
    client.batch_execute("CREATE TABLE things (id int PRIMARY KEY)").await.unwrap();
    pgpubsub::watch(&client, "things", Some(&b)).await.unwrap();
    pgpubsub::publish(&client, &a, "one").await.unwrap();
    client.batch_execute("INSERT INTO things VALUES (1)").await.unwrap();
    pgpubsub::publish(&client, &a, "two").await.unwrap();
    let stored = wait_stored(&stream, 3).await;
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    let (sa, sb) = (format!("{}.{a}", stream.prefix), format!("{}.{b}", stream.prefix));
    assert_eq!(subjects, [sa.as_str(), sb.as_str(), sa.as_str()], "{stored:?}");
    assert_eq!(stored[1].op.as_deref(), Some("INSERT"));
}

/// Capture from the WAL into NATS: a table watched with `watch --wal`,
/// appended to the log by `pgpubsub capture` and copied by the bridge like
/// every logged event. The bridge is SIGKILLed twice while writers run:
/// every row is in the stream once, in WAL order, with its place in the WAL;
/// and a gateway fed from the stream serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_events_reach_nats_once_in_wal_order_through_bridge_kills() {
    use crate::serve::{next_sse, serve_url, sse};
    let cluster = tokio::task::spawn_blocking(Cluster::logical).await.unwrap();
    let admin = pgpubsub::db::connect(&cluster.url("postgres").parse().unwrap()).await.unwrap();
    admin.batch_execute("CREATE DATABASE wb").await.unwrap();
    let url = cluster.url("wb");
    let config: Config = url.parse().unwrap();
    let mut client = pgpubsub::db::connect(&config).await.unwrap();
    pgpubsub::migrate::up(&mut client, false).await.unwrap();
    client.batch_execute("CREATE TABLE w (writer int, n int, pad text, PRIMARY KEY (writer, n))").await.unwrap();
    let ch = common::channel("walb");
    pgpubsub::watch::watch_wal(&client, "w", Some(&ch)).await.unwrap();
    let stream = TestStream::new(&shared_nats());
    let name = common::unique("walkill");
    let mut capturer = crate::capture::capture(&url).await;
    let start = || Bridge::spawn(&url, &shared_nats(), &ch, &name, &stream, &[]);
    let mut bridge = start();
    bridge.wait_log("copying", 1).await;
    let writers = spawn_writers(&config, 3, 300, 1, Duration::from_millis(4));
    let mut logs = kill_twice(&mut bridge, start, "copying").await;
    for w in writers {
        tokio::time::timeout(Duration::from_secs(90), w).await.expect("writers finish").unwrap();
    }
    // The fence: a last row. The bridge stores in WAL order, so once its
    // event is in, so is whatever the bridge stores for the rows before it,
    // a late re-send included.
    client.execute("INSERT INTO w VALUES ($1, $2, 'fence')", &[&FENCE_ROW.0, &FENCE_ROW.1]).await.unwrap();
    let rows = client.query("SELECT writer, n FROM w", &[]).await.unwrap();
    let expected: BTreeSet<(i32, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(expected.len(), 901);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stored = stream.read().await;
    while !holds_fence_row(&stored) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stored = stream.read().await;
    }
    logs.push_str(&bridge.logs());

    let mut seen = BTreeSet::new();
    let mut last: BTreeMap<i32, i32> = BTreeMap::new();
    let mut previous_place = (0u64, 0u32);
    for m in &stored {
        let event: Value = serde_json::from_str(&m.payload).unwrap();
        let lsn = pgpubsub::WalPosition::parse_lsn(event["lsn"].as_str().unwrap()).unwrap();
        let place = (lsn, event["index"].as_u64().unwrap() as u32);
        assert!(m.msg_id.ends_with(&format!(":{}", event["seq"])), "{} for {}", m.msg_id, event["seq"]);
        assert!(place > previous_place, "the stream in WAL order: {place:?} after {previous_place:?}\n{logs}");
        previous_place = place;
        let key = (event["new"]["writer"].as_i64().unwrap() as i32, event["new"]["n"].as_i64().unwrap() as i32);
        assert!(seen.insert(key), "{key:?} twice\n{logs}");
        assert!(last.get(&key.0).is_none_or(|&prev| prev < key.1), "{key:?} out of order");
        last.insert(key.0, key.1);
    }
    let lost: Vec<_> = expected.difference(&seen).take(20).collect();
    assert!(lost.is_empty(), "lost {} of {}: {lost:?}\n{logs}", expected.len() - seen.len(), expected.len());
    assert_eq!(seen.len(), expected.len());

    // A gateway fed from the stream serves the WAL's events, from the start.
    let flags = ["--source", "nats", &stream.nats, "--stream", &stream.name, "--subject-prefix", &stream.prefix];
    let server = serve_url(&url, "", &flags);
    let (mut sub, rx) = sse(&format!("http://{}/events?channel={ch}&since=0:0", server.addr), None);
    for m in stored.iter().take(3) {
        assert_eq!(next_sse(&rx).data, m.payload);
    }
    let _ = sub.kill();
    let _ = capturer.kill();
    let _ = capturer.wait();
}
