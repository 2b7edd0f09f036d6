//! Capture from the WAL from the command line: `watch --wal`, `publish
//! --wal`, `listen --wal`, and the writer-tables load scenario's WAL rows,
//! on a cluster of the test's own with wal_level = logical.

use std::io::Read;
use std::process::Stdio;

use serde_json::Value;

use crate::cli::{pgpubsub, run, wait_output_within};
use crate::cluster::Cluster;
use crate::common::WAIT;

/// Runs `listen --wal --json --count n` and returns its lines once `write`
/// has run (after the listener started).
async fn listen(url: &str, name: &str, n: usize, write: impl std::future::Future<Output = ()>) -> Vec<Value> {
    let mut cmd = pgpubsub(url);
    cmd.args(["listen", "--wal", "--json", "--name", name, "--count", &n.to_string(), "--channel", "orders,news"]);
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let started = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(k) = stderr.read(&mut buf) {
            if k == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..k]);
            if String::from_utf8_lossy(&seen).contains("listening from the WAL") {
                return (true, stderr, seen);
            }
        }
        (false, stderr, seen)
    });
    let (ok, _stderr, seen) = tokio::task::spawn_blocking(move || started.join().unwrap()).await.unwrap();
    assert!(ok, "listen --wal did not start: {}", String::from_utf8_lossy(&seen));
    write.await;
    let out = tokio::task::spawn_blocking(move || wait_output_within(child, WAIT)).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn watch_publish_and_listen_through_the_wal() {
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
    client.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, item text)").await.unwrap();
    let watched = run({
        let mut c = pgpubsub(&url);
        c.args(["watch", "orders", "--wal"]);
        c
    });
    assert!(String::from_utf8_lossy(&watched.stdout).contains("through the WAL"), "{watched:?}");
    let publish = |text: &'static str| {
        let url = url.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                run({
                    let mut c = pgpubsub(&url);
                    c.args(["publish", "--wal", "news", text]);
                    c
                })
            })
            .await
            .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
    };

    let lines = listen(&url, "cli", 3, async {
        client.batch_execute("INSERT INTO orders VALUES (1, 'a'); UPDATE orders SET item = 'b'").await.unwrap();
        publish("hello ✓").await;
    })
    .await;
    assert_eq!(lines[0]["op"], "INSERT");
    assert_eq!(lines[1]["new"], serde_json::json!({"id": 1, "item": "b"}));
    assert_eq!((lines[2]["kind"].as_str(), lines[2]["payload"].as_str()), (Some("message"), Some("hello ✓")));
    assert!(lines.iter().all(|l| l["lsn"].is_string()));

    // Written while it was stopped: the named reader resumes after what it printed.
    client.batch_execute("INSERT INTO orders VALUES (2, 'c')").await.unwrap();
    let lines = listen(&url, "cli", 1, async {}).await;
    assert_eq!(lines[0]["new"]["id"], 2);

    // The load scenario measures the WAL-watched table and publish_wal
    // on a server that can decode, and checks every row arrived.
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
        let (got, written) = cells[4].split_once('/').unwrap();
        assert!(got == written && written.parse::<u64>().unwrap() > 0, "{cells:?}");
    }
}
