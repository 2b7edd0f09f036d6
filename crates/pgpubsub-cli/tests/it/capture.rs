//! Capture from the WAL from the command line: `watch --wal`, `publish
//! --wal`, `pgpubsub capture` (killed with SIGKILL), and every reader of the
//! log serving what it captured: `listen`, the gateway with resume, the
//! writer-tables load scenario. On a cluster of the test's own with
//! wal_level = logical.

use std::process::{Child, Stdio};
use std::time::Duration;

use pgpubsub::Channel;
use serde_json::Value;
use tokio_postgres::Client;

use crate::cli::{pgpubsub, run, spawn_listener, wait_output_within};
use crate::cluster::Cluster;
use crate::common::{unique, write_rows, WAIT};
use crate::serve::{curl_get, next_sse, serve_url, sse, subscribed};

/// A logical cluster with a migrated database `cli`: the cluster, the URL, a client.
async fn logical() -> (Cluster, String, Client) {
    let cluster = tokio::task::spawn_blocking(Cluster::logical).await.unwrap();
    let admin = pgpubsub::db::connect(&cluster.url("postgres").parse().unwrap()).await.unwrap();
    admin.batch_execute("CREATE DATABASE cli").await.unwrap();
    let url = cluster.url("cli");
    assert!(run({
        let mut c = pgpubsub(&url);
        c.arg("migrate");
        c
    })
    .status
    .success());
    let client = pgpubsub::db::connect(&url.parse().unwrap()).await.unwrap();
    (cluster, url, client)
}

/// `pgpubsub capture`, once it streams the slot.
pub(crate) async fn capture(url: &str) -> Child {
    let mut child = pgpubsub(url)
        .env("RUST_LOG", "warn,pgpubsub=info")
        .arg("capture")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut seen = String::new();
        for line in lines.by_ref().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("capturing") {
                // Keep draining, so the child never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return Ok(());
            }
        }
        Err(seen)
    });
    match tokio::time::timeout(WAIT, ready).await {
        Ok(Ok(Ok(()))) => child,
        Ok(Ok(Err(seen))) => panic!("pgpubsub capture did not start: {seen}"),
        _ => panic!("pgpubsub capture did not start in time"),
    }
}

/// Waits until `marker`, published through the WAL after everything else,
/// is in the log.
async fn fence(client: &Client, marker: &str) {
    crate::common::wal_fence(client, &Channel::new("fence").unwrap(), marker).await;
}

#[tokio::test]
async fn watch_publish_capture_and_listen_through_the_log() {
    let (_cluster, url, client) = logical().await;
    client.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, item text)").await.unwrap();
    let watched = run({
        let mut c = pgpubsub(&url);
        c.args(["watch", "orders", "--wal"]);
        c
    });
    assert!(String::from_utf8_lossy(&watched.stdout).contains("through the WAL"), "{watched:?}");
    let mut capturer = capture(&url).await;
    // A plain `listen` reads the log: no REPLICATION, no slot of its own.
    let mut cmd = pgpubsub(&url);
    cmd.env("RUST_LOG", "warn,pgpubsub=info").args(["listen", "--json", "--count", "3", "--channel", "orders,news"]);
    let (listen, mut stdout, _logs) = tokio::task::spawn_blocking(move || spawn_listener(cmd)).await.unwrap();
    client.batch_execute("INSERT INTO orders VALUES (1, 'a'); UPDATE orders SET item = 'b'").await.unwrap();
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            run({
                let mut c = pgpubsub(&url);
                c.args(["publish", "--wal", "news", "hello ✓"]);
                c
            })
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = wait_output_within(listen, WAIT);
        text
    })
    .await
    .unwrap();
    let lines: Vec<Value> = printed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["op"], "INSERT");
    assert_eq!(lines[1]["new"], serde_json::json!({"id": 1, "item": "b"}));
    assert_eq!((lines[2]["kind"].as_str(), lines[2]["payload"].as_str()), (Some("message"), Some("hello ✓")));
    assert!(lines.iter().all(|l| l["seq"].is_i64() && l["lsn"].is_string() && l["source_txid"].is_u64()), "{lines:?}");

    // `migrate status` shows the slot and the WAL it keeps.
    let status = run({
        let mut c = pgpubsub(&url);
        c.args(["migrate", "status"]);
        c
    });
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("pgpubsub_capture") && text.contains("active"), "{text}");
    let _ = capturer.kill();
    let _ = capturer.wait();

    // The load scenario measures the WAL-watched table and publish_wal on a
    // server that can decode, and checks every row reached the listener and
    // the gateway's SSE subscriber.
    let out = tokio::task::spawn_blocking(move || {
        let mut c = pgpubsub(&url);
        c.args(["load", "--scenario", "writer-tables", "--writers", "1", "--duration", "1s", "--publishers", "1"]);
        let child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        wait_output_within(child, 6 * WAIT)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for head in ["| 1 | wal |", "| 1 | publish_wal (100 B) |"] {
        let line = stdout.lines().find(|l| l.starts_with(head)).unwrap_or_else(|| panic!("no {head} in {stdout}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        for col in [4, 10] {
            let (got, written) = cells[col].split_once('/').unwrap_or_else(|| panic!("column {col}: {cells:?}"));
            assert!(got == written && written.parse::<u64>().unwrap() > 0, "{cells:?}");
        }
    }
}

/// SIGKILL three times while writers commit single-row and multi-row
/// transactions: every change in the log once, in commit order.
#[tokio::test]
async fn a_capture_process_killed_three_times_leaves_every_change_once_in_the_log() {
    let (_cluster, url, client) = logical().await;
    client.batch_execute("CREATE TABLE w (writer int, n int, pad text, PRIMARY KEY (writer, n))").await.unwrap();
    let ch = Channel::new(unique("capkill")).unwrap();
    pgpubsub::watch::watch_wal(&client, "w", Some(&ch)).await.unwrap();
    let config: pgpubsub::db::Config = url.parse().unwrap();
    let mut capturer = capture(&url).await;
    let writers: Vec<_> = [(0, 1), (1, 1), (2, 20), (3, 50)]
        .into_iter()
        .map(|(id, batch)| tokio::spawn(write_rows(config.clone(), id, 2000, batch, Duration::ZERO, (0, 0))))
        .collect();
    for pause in [300, 80, 600] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        capturer.kill().unwrap(); // SIGKILL
        capturer.wait().unwrap();
        capturer = capture(&url).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    fence(&client, "all written").await;
    let (rows, distinct, ordered) = crate::common::captured_once_in_order(&client, &ch).await;
    assert_eq!((rows, distinct, ordered), (8000, 8000, true));
    let _ = capturer.kill();
    let _ = capturer.wait();
}

/// The gateway serves captured events like any other, and a subscriber
/// resumes after a gateway restart with the missed ones, in order.
#[tokio::test]
async fn the_gateway_serves_captured_events_with_resume_across_a_restart() {
    let (_cluster, url, client) = logical().await;
    client.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "orders", None).await.unwrap();
    let mut capturer = capture(&url).await;
    let server = serve_url(&url, "orders", &[]);
    let (mut first, rx) = sse(&format!("http://{}/events?channel=orders", server.addr), None);
    subscribed(&server, "orders").await;
    client.batch_execute("INSERT INTO orders VALUES (1); INSERT INTO orders VALUES (2);").await.unwrap();
    let seen: Vec<_> = (0..2).map(|_| next_sse(&rx)).collect();
    let rows: Vec<Value> = seen.iter().map(|e| serde_json::from_str(&e.data).unwrap()).collect();
    assert_eq!((rows[0]["new"]["id"].as_i64(), rows[1]["new"]["id"].as_i64()), (Some(1), Some(2)));
    assert!(rows[0]["lsn"].is_string());
    // What a browser's EventSource sends when it reconnects.
    let id = seen[1].id.clone().expect("each event has its resume id");
    let _ = first.kill();
    drop(server);
    client.batch_execute("INSERT INTO orders VALUES (3); INSERT INTO orders VALUES (4);").await.unwrap();
    fence(&client, "missed written").await;
    let _ = capturer.kill();
    let _ = capturer.wait();
    let server = serve_url(&url, "orders", &[]);
    let (mut second, rx) = sse(&format!("http://{}/events?channel=orders", server.addr), Some(&id));
    let mut ids = Vec::new();
    while ids.last() != Some(&4) {
        let e = next_sse(&rx);
        if e.data.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&e.data).unwrap();
        if let Some(id) = v["new"]["id"].as_i64() {
            ids.push(id);
        }
    }
    let missed: Vec<i64> = ids.into_iter().filter(|&i| i > 2).collect();
    assert_eq!(missed, [3, 4]);
    let _ = second.kill();
    // Any gateway shows the WAL the capturer's slot keeps (none reads it now).
    let (_, metrics) = curl_get(&format!("http://{}/metrics", server.addr));
    let retained = metrics
        .lines()
        .find(|l| l.starts_with("pgpubsub_capture_slot_retained_bytes{slot=\"pgpubsub_capture\"}"))
        .unwrap_or_else(|| panic!("no slot gauge in {metrics}"));
    assert!(retained.rsplit(' ').next().unwrap().parse::<f64>().unwrap() > 0.0, "{retained}");
}

/// `migrate down` of the capture step drops the capturers' idle slots and
/// says so, so no slot is left to keep WAL forever.
#[tokio::test]
async fn migrate_down_leaves_no_orphaned_slot() {
    let (_cluster, url, client) = logical().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "t", None).await.unwrap();
    let mut capturer = capture(&url).await;
    let _ = capturer.kill();
    let _ = capturer.wait();
    // The slot is let go a moment after its session ends.
    let deadline = tokio::time::Instant::now() + WAIT;
    while client
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE active", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slots(&client).await, 1);
    let down = || {
        run({
            let mut c = pgpubsub(&url);
            c.args(["migrate", "down"]);
            c
        })
    };
    // The newest steps (row views' plans, the capturer's wake-ups, row
    // views for classes, row views) leave the slot: it is not theirs.
    for _ in 0..4 {
        let first = down();
        assert!(first.status.success() && !String::from_utf8_lossy(&first.stderr).contains("dropped replication slot"));
        assert_eq!(slots(&client).await, 1);
    }
    let down = down();
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(down.status.success(), "{err}");
    assert!(err.contains("dropped replication slot pgpubsub_capture"), "{err}");
    assert_eq!(slots(&client).await, 0);
}

async fn slots(c: &Client) -> i64 {
    c.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgpubsub%'", &[]).await.unwrap().get(0)
}

/// A gap in capture (here: the slot dropped while no capturer ran) reaches
/// a gateway subscriber as the resync it already knows, with where it was
/// and where to go on from, never as a row event.
#[tokio::test]
async fn a_capture_gap_reaches_a_gateway_subscriber_as_a_resync() {
    let (_cluster, url, client) = logical().await;
    client.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "orders", None).await.unwrap();
    let mut capturer = capture(&url).await;
    let server = serve_url(&url, "orders", &[]);
    let (mut sub, rx) = sse(&format!("http://{}/events?channel=orders", server.addr), None);
    subscribed(&server, "orders").await;
    client.batch_execute("INSERT INTO orders VALUES (1)").await.unwrap();
    let one = next_sse(&rx);
    assert_eq!(serde_json::from_str::<Value>(&one.data).unwrap()["new"]["id"], 1);
    capturer.kill().unwrap();
    capturer.wait().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.execute("SELECT pg_drop_replication_slot('pgpubsub_capture')", &[]).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the slot stayed in use");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.batch_execute("INSERT INTO orders VALUES (2)").await.unwrap();
    let mut capturer = capture(&url).await;
    client.batch_execute("INSERT INTO orders VALUES (3)").await.unwrap();
    let gap = next_sse(&rx);
    assert_eq!(gap.event, "resync", "{gap:?}");
    let data: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!((data["cursor"].as_str(), data["pruned"].as_str()), (one.id.as_deref(), gap.id.as_deref()), "{gap:?}");
    let three = next_sse(&rx);
    assert_eq!(serde_json::from_str::<Value>(&three.data).unwrap()["new"]["id"], 3);
    let _ = sub.kill();
    let _ = capturer.kill();
    let _ = capturer.wait();
}
