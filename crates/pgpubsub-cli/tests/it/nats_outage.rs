//! A gateway fed from NATS (`serve --source nats`) whose NATS goes silent:
//! the connection to it stops forwarding (no FIN, no RST) and new ones are
//! refused. The gateway notices within its ping bound, says 503 on
//! `/readyz` meanwhile, and once NATS is back its subscribers get what was
//! stored during the outage, each event once.
//!
//! Shown able to fail: with the client's 60 s default ping and the
//! disconnection not reported, `/readyz` stays 200 throughout.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, TestDb, WAIT};
use crate::proxy::Proxy;
use crate::serve::{curl_get, serve};

fn shared_nats() -> (String, u16) {
    let url = std::env::var("PGPUBSUB_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(4222);
    (url, port)
}

/// `/readyz`'s status and body.
fn readyz(addr: &str) -> (u16, Value) {
    let (code, body) = curl_get(&format!("http://{addr}/readyz"));
    (code, serde_json::from_str(&body).unwrap_or_default())
}

async fn readyz_until(addr: &str, want: u16) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = readyz(addr);
        if code == want {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz never answered {want}: {code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next event's payload on `ws` (heartbeats and pings skipped).
async fn next_payload(ws: &mut crate::serve::Ws) -> String {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.expect("no WebSocket message in time").unwrap().unwrap();
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str() {
            Some("event") => return v["event"]["payload"].as_str().unwrap().to_string(),
            Some("heartbeat" | "subscribed") => {}
            _ => panic!("unexpected {v}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_fed_from_nats_notices_a_silent_nats_says_503_and_loses_nothing() {
    let db = TestDb::new().await;
    let (url, port) = shared_nats();
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    let id = common::unique("o");
    let (name, prefix) = (format!("T{id}"), format!("t{id}"));
    let config =
        jetstream::stream::Config { name: name.clone(), subjects: vec![format!("{prefix}.>")], ..Default::default() };
    js.create_stream(config).await.unwrap();
    let ch = common::channel("outage");
    let mut seq = 0;
    let mut store = |text: &str| {
        seq += 1;
        let event = json!({"seq": seq, "txid": 1, "kind": "message", "channel": ch.as_str(), "payload": text});
        let js = js.clone();
        let subject = format!("{prefix}.{ch}");
        async move { js.publish(subject, event.to_string().into()).await.unwrap().await.unwrap() }
    };
    store("before the gateway").await;

    let proxy = Proxy::start(format!("127.0.0.1:{port}")).await;
    let via = format!("nats://127.0.0.1:{}", proxy.port);
    let server = serve(&db, "", &["--source", "nats", &via, "--stream", &name, "--subject-prefix", &prefix]);
    readyz_until(&server.addr, 200).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)).await.unwrap();
    ws.send(Message::text(json!({"channels": [ch.as_str()], "ack": true}).to_string())).await.unwrap();
    store("live").await;
    assert_eq!(next_payload(&mut ws).await, "live");

    // NATS goes silent, and stays out of reach.
    proxy.refuse(true);
    proxy.cut();
    let down = readyz_until(&server.addr, 503).await;
    let reason = down["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("NATS"), "{down}");
    store("during the outage").await;

    proxy.refuse(false);
    readyz_until(&server.addr, 200).await;
    store("after").await;
    assert_eq!(next_payload(&mut ws).await, "during the outage");
    assert_eq!(next_payload(&mut ws).await, "after");
    // A fence: the next event stored is the next one received (nothing twice).
    store("fence").await;
    assert_eq!(next_payload(&mut ws).await, "fence");
    let _ = js.delete_stream(&name).await;
}
