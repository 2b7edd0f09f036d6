//! The gateway as an operator runs it: its OpenAPI document against its
//! routes, the metrics' histograms, LISTEN only while someone subscribes,
//! HTTPS, and JSON log lines.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, TestDb, WAIT};
use crate::serve::{curl_get, next_sse, serve, sse, subscribed};

/// Waits until `/metrics` has a line starting with `prefix` whose value
/// passes `ok`; the whole text.
async fn metric(addr: &str, prefix: &str, ok: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, text) = curl_get(&format!("http://{addr}/metrics"));
        let value = text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse::<f64>().ok());
        if value.is_some_and(&ok) {
            return text;
        }
        assert!(Instant::now() < deadline, "{prefix} never passed, last {value:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every operation in `/openapi.json` is answered by a route of the server
/// (not the router's fallback 404 or a 405), and every route a client or
/// operator relies on is in the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let db = TestDb::new().await;
    let server = serve(&db, "", &[]);
    let (code, body) = curl_get(&format!("http://{}/openapi.json", server.addr));
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for expected in ["/", "/client.js", "/events", "/ws", "/publish/{channel}", "/store/{bucket}/{id}"] {
        assert!(paths.contains_key(expected), "{expected} is not documented");
    }
    for extra in ["/store/{bucket}/{id}/history", "/livez", "/readyz", "/metrics"] {
        assert!(paths.contains_key(extra), "{extra} is not documented");
    }
    let channel = common::channel("doc");
    let mut operations = 0;
    for (path, item) in paths {
        let url = path.replace("{channel}", channel.as_str()).replace("{bucket}", "b").replace("{id}", "i");
        for method in ["get", "put", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            operations += 1;
            // A stream would never end: a second is enough for its status.
            let out = Command::new("curl")
                .args(["-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}", "-X", &method.to_uppercase()])
                .args(["-H", "content-type: application/json", "--data-binary", "{}"])
                .arg(format!("http://{}{url}", server.addr))
                .output()
                .unwrap();
            let status: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
            let fallback = status == 404 && !url.starts_with("/store/");
            assert!(status != 0 && status != 405 && !fallback, "{method} {path}: {status}");
        }
    }
    assert!(operations >= 12, "only {operations} operations documented");
}

/// The histograms count: live deliveries (commit to frame) and a resuming
/// subscriber's catch-up from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_delivery_and_catch_up_histograms() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("hist");
    let server = serve(&db, ch.as_str(), &[]);
    let (_, body) = curl_get(&format!("http://{}/readyz", server.addr));
    let start = serde_json::from_str::<Value>(&body).unwrap()["position"].as_str().unwrap().to_string();
    let (mut live, rx) = sse(&format!("http://{}/events?channel={ch}", server.addr), None);
    subscribed(&server, ch.as_str()).await;
    pgpubsub::publish(&client, &ch, "counted").await.unwrap();
    next_sse(&rx);
    let (mut resumed, rx2) = sse(&format!("http://{}/events?channel={ch}&since={start}", server.addr), None);
    next_sse(&rx2);
    let text = metric(&server.addr, "pgpubsub_delivery_latency_seconds_count", |n| n >= 1.0).await;
    assert!(text.contains("pgpubsub_delivery_latency_seconds_bucket{le=\"0.025\"}"), "{text}");
    assert!(text.contains("# TYPE pgpubsub_delivery_latency_seconds histogram"), "{text}");
    metric(&server.addr, "pgpubsub_catch_up_seconds_count", |n| n >= 1.0).await;
    let _ = (live.kill(), resumed.kill());
}

/// Serving every channel, the gateway LISTENs on a channel (for foreign
/// notifications) while a subscriber asks for it, and UNLISTENs once the
/// last one has left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_listened_while_subscribed_and_unlistened_after() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("unlisten");
    let server = serve(&db, "", &[]);
    let url = format!("http://{}/events?channel={ch}", server.addr);
    let (mut a, rx) = sse(&url, None);
    let (mut b, _) = sse(&url, None);
    metric(&server.addr, "pgpubsub_listened_channels", |n| n == 1.0).await;
    // A foreign notification arrives: the channel is LISTENed to.
    let deadline = Instant::now() + WAIT;
    loop {
        client.batch_execute(&format!("NOTIFY {ch}, 'plain'")).await.unwrap();
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(200)) {
            assert_eq!(e.event, "notify", "{e:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the foreign notification never arrived");
    }
    let _ = (a.kill(), a.wait());
    tokio::time::sleep(Duration::from_millis(300)).await;
    metric(&server.addr, "pgpubsub_listened_channels", |n| n == 1.0).await;
    let _ = (b.kill(), b.wait());
    metric(&server.addr, "pgpubsub_listened_channels", |n| n == 0.0).await;
}

/// `--tls-cert`/`--tls-key`: the gateway speaks HTTPS with that certificate,
/// and a client that does not trust it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_https() {
    let db = TestDb::new().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
    let dir = std::env::temp_dir().join(common::unique("https"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let ch = common::channel("https");
    let server =
        serve(&db, ch.as_str(), &["--tls-cert", cert_file.to_str().unwrap(), "--tls-key", key_file.to_str().unwrap()]);
    let port = server.addr.rsplit(':').next().unwrap();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let https = |path: &str, extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--resolve", &resolve])
            .args(extra)
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ca = cert_file.to_str().unwrap();
    assert!(https("/livez", &["--cacert", ca]).ends_with("\n200"));
    let published = https(&format!("/publish/{ch}"), &["--cacert", ca, "-X", "POST", "--data-binary", "over tls"]);
    assert!(published.ends_with("\n200"), "{published}");
    // Not trusted: the handshake fails (curl's status 000).
    assert!(https("/livez", &[]).ends_with("\n000"));
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    assert_ne!(curl_get(&format!("http://{}/livez", server.addr)).0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--log-format json`: every log line is one JSON object with a level and
/// a message.
#[tokio::test]
async fn log_lines_can_be_json() {
    let db = TestDb::new().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgpubsub"))
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn,pgpubsub=info")
        .env_remove("PGPUBSUB_SERVE_CHANNELS")
        .args(["--log-format", "json", "serve", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = 0;
    loop {
        let line = lines.next().expect("serve exited").unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
        seen += 1;
        if v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("serving on http://")) {
            break;
        }
        assert!(seen < 20, "no 'serving on' line");
    }
    let _ = (child.kill(), child.wait());
}
