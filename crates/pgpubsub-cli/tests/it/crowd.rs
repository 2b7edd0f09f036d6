//! A crowd resuming at once (after a gateway restart): resumes from one
//! position share reads of the log, and each client still gets every event
//! exactly once, in order.
//!
//! Shown able to fail: with groups never joined (each resume alone) the
//! first test counts 160 reads of the log for its 40 resumes.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, TestDb, WAIT};
use crate::serve::{curl_get, serve, subscribed, Ws};

/// A metric's value now.
fn metric(addr: &str, name: &str) -> f64 {
    let (_, text) = curl_get(&format!("http://{addr}/metrics"));
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(f64::NAN)
}

/// The next event on `ws` (heartbeats skipped): its payload and id.
async fn next_event(ws: &mut Ws) -> (String, String) {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.expect("no event in time").unwrap().unwrap();
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str() {
            Some("event") => {
                return (v["event"]["payload"].as_str().unwrap().to_string(), v["id"].as_str().unwrap().to_string())
            }
            Some("heartbeat" | "subscribed") => {}
            _ => panic!("unexpected {v}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_resuming_from_one_position_shares_reads_and_gets_everything_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("crowd");
    let first = serve(&db, ch.as_str(), &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", first.addr)).await.unwrap();
    ws.send(Message::text(json!({"channels": [ch.as_str()]}).to_string())).await.unwrap();
    subscribed(&first, ch.as_str()).await;
    pgpubsub::publish(&client, &ch, "seen").await.unwrap();
    let (_, since) = next_event(&mut ws).await;
    // The gateway goes away; the crowd misses what comes meanwhile.
    drop(ws);
    drop(first);
    let missed = 1200; // more than two pages of the log
    let sql = "SELECT count(pubsub.publish($1, 'missed ' || i)) FROM generate_series(1, $2::int) i";
    client.execute(sql, &[&ch.as_str(), &missed]).await.unwrap();

    let server = serve(&db, ch.as_str(), &[]);
    let crowd = 40;
    let mut clients = Vec::new();
    for _ in 0..crowd {
        let url = format!("ws://{}/ws", server.addr);
        let request = json!({"channels": [ch.as_str()], "since": since}).to_string();
        clients.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            ws.send(Message::text(request)).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..missed {
                got.push(next_event(&mut ws).await.0);
            }
            (ws, got)
        }));
    }
    let want: Vec<String> = (1..=missed).map(|i| format!("missed {i}")).collect();
    let mut sockets = Vec::new();
    for c in clients {
        let (ws, got) = tokio::time::timeout(WAIT, c).await.unwrap().unwrap();
        assert_eq!(got, want);
        sockets.push(ws);
    }
    // A fence: the next event written is the next each one gets (nothing twice).
    pgpubsub::publish(&client, &ch, "fence").await.unwrap();
    for ws in &mut sockets {
        assert_eq!(next_event(ws).await.0, "fence");
    }
    // Read one by one, 40 resumes of three pages each would be 120 reads.
    let reads = metric(&server.addr, "pgpubsub_replay_reads_total");
    let shared = metric(&server.addr, "pgpubsub_replay_shared_total");
    assert!(reads <= 12.0, "{reads} reads of the log for {crowd} resumes");
    assert!(shared >= 1.0, "{shared}");
    let deadline = Instant::now() + WAIT;
    while metric(&server.addr, "pgpubsub_subscribers") != crowd as f64 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `load-fanout --storm` and `--idle` run and report what
/// docs/performance.md quotes: every client caught up with nothing lost,
/// the reads of the log counted; heartbeat frames counted.
#[cfg(feature = "load")]
#[tokio::test]
async fn the_storm_and_idle_benchmarks_run() {
    let db = TestDb::new().await;
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
        cmd.env("DATABASE_URL", &db.url).env("RUST_LOG", "warn").arg("load-fanout").args(args).arg("--json");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let v = run(&["--storm", "--clients", "20", "--events", "600"]);
    assert_eq!((v["caught_up_clients"].as_u64(), v["lost"].as_u64()), (Some(20), Some(0)), "{v}");
    let reads = v["log_reads_for_resumes"].as_f64().unwrap();
    assert!((2.0..20.0).contains(&reads), "{v}");
    let v = run(&["--idle", "2s", "--clients", "5", "--heartbeat", "500ms"]);
    assert!(v["frames_per_s"].as_f64().unwrap() > 0.0 && v["server_cpu_percent_of_a_core"].is_number(), "{v}");
}
