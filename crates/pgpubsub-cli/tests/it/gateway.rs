//! The gateway exposed: any channel (or patterns), origins and the cookie,
//! bodies refused before they are read, client errors as 4xx, probes, caps.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, TestDb, WAIT};
use crate::serve::{
    curl, curl_get, next_sse, now_s, serve, serve_process, serve_url, sse, sse_with, subscribed, token, Server, SECRET,
};

/// A channel watched after the server started is served, with no
/// `--channel`; so are messages on any channel, and foreign notifications
/// of a channel a subscriber asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channels_every_channel_is_served_even_new_ones() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let server = serve(&db, "", &[]);
    let base = format!("http://{}", server.addr);
    // No channel named: everything.
    let (mut everything, all_rx) = sse(&format!("{base}/events"), None);

    client.batch_execute("CREATE TABLE late (id int PRIMARY KEY)").await.unwrap();
    pgpubsub::watch(&client, "late", None).await.unwrap();
    let (mut sub, rx) = sse(&format!("{base}/events?channel=late"), None);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = curl_get(&format!("{base}/readyz"));
        if serde_json::from_str::<Value>(&body).unwrap()["subscribers"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.batch_execute("INSERT INTO late VALUES (7)").await.unwrap();
    for rx in [&rx, &all_rx] {
        let e = next_sse(rx);
        let v: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!((e.event.as_str(), v["table"].as_str(), v["new"]["id"].as_i64()), ("change", Some("late"), Some(7)));
    }
    let _ = (sub.kill(), everything.kill());

    // Any channel, over WebSocket; and a foreign pg_notify on it once asked for.
    let ch = common::channel("anych");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)).await.unwrap();
    ws.send(Message::Text(json!({"channels": [ch.as_str()], "ack": true}).to_string().into())).await.unwrap();
    let first = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("subscribed"), "{first:?}");
    assert_eq!(curl("POST", &format!("{base}/publish/{ch}"), Some("hi"), &[]).0, 200);
    let v = next_ws(&mut ws).await;
    assert_eq!(v["event"]["payload"], "hi", "{v}");
    // The LISTEN is issued when the subscriber asks: notify until heard.
    let deadline = Instant::now() + WAIT;
    loop {
        common::raw_notify(&client, &ch, r#"{"foreign": true}"#).await;
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "heartbeat" {
                continue;
            }
            assert_eq!(v["event"]["kind"], "notify", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the foreign notification never arrived");
    }
}

/// The next text message, heartbeats skipped (pings are not text).
async fn next_ws(ws: &mut crate::serve::Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        if m.is_ping() || m.is_pong() {
            continue;
        }
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["type"] != "heartbeat" {
            return v;
        }
    }
}

/// `--channel` is an allow-list of names and patterns.
#[tokio::test]
async fn channel_patterns_are_an_allow_list() {
    let db = TestDb::new().await;
    let server = serve(&db, "tenant_*,orders", &[]);
    let base = format!("http://{}", server.addr);
    for (ch, code) in [("tenant_1", 200), ("orders", 200), ("chat", 403), ("tenant", 403)] {
        assert_eq!(curl("POST", &format!("{base}/publish/{ch}"), Some("x"), &[]).0, code, "{ch}");
    }
    let (code, body) = curl_get(&format!("{base}/events?channel=chat"));
    assert_eq!(code, 403, "{body}");
    // Without channels, a pattern leaves "everything" undefined: name them.
    let (code, body) = curl_get(&format!("{base}/events"));
    assert_eq!(code, 400, "{body}");
    let (mut sub, rx) = sse(&format!("{base}/events?channel=tenant_9"), None);
    subscribed(&server, "tenant_9").await;
    assert_eq!(curl("POST", &format!("{base}/publish/tenant_9"), Some("t9"), &[]).0, 200);
    let v: Value = serde_json::from_str(&next_sse(&rx).data).unwrap();
    assert_eq!(v["payload"], "t9");
    let _ = sub.kill();
}

const EVIL: &str = "Origin: http://evil.example";
const GOOD: &str = "http://good.example";

fn ws_request(
    addr: &str,
    headers: &[(&'static str, String)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    req
}

/// A foreign page can neither read nor publish with its visitor's cookie;
/// a token it holds itself still works; a listed origin gets CORS and the
/// cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_counts_only_from_trusted_origins() {
    let db = TestDb::new().await;
    let ch = common::channel("origin");
    let server = serve(&db, "", &["--jwt-secret", SECRET, "--allowed-origins", GOOD]);
    let base = format!("http://{}", server.addr);
    let good = token(SECRET, json!({"exp": now_s() + 3600, "read": ["*"], "write": ["*"]}));
    let cookie = format!("Cookie: pgpubsub_token={good}");
    let publish = format!("{base}/publish/{ch}");

    // Foreign origin + cookie: refused, for publish, SSE and the WS handshake.
    let (code, v) = curl("POST", &publish, Some("csrf"), &[EVIL, &cookie]);
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not accepted from origin"), "{v}");
    let (code, _) = curl("GET", &format!("{base}/events?channel={ch}"), None, &[EVIL, &cookie]);
    assert_eq!(code, 403);
    let refused = tokio_tungstenite::connect_async(ws_request(
        &server.addr,
        &[("origin", "http://evil.example".into()), ("cookie", format!("pgpubsub_token={good}"))],
    ))
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }

    // Foreign origin, the page's own token in the first message: works.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(ws_request(&server.addr, &[("origin", "http://evil.example".into())]))
            .await
            .unwrap();
    ws.send(Message::Text(json!({"channels": [ch.as_str()], "token": good, "ack": true}).to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_ws(&mut ws).await["type"], "subscribed");
    // And a bearer header from anywhere.
    let bearer = format!("Authorization: Bearer {good}");
    assert_eq!(curl("POST", &publish, Some("bearer"), &[EVIL, &bearer]).0, 200);
    assert_eq!(next_ws(&mut ws).await["event"]["payload"], "bearer");

    // The listed origin and the same origin may use the cookie.
    let listed = format!("Origin: {GOOD}");
    let same = format!("Origin: {base}");
    assert_eq!(curl("POST", &publish, Some("listed"), &[&listed, &cookie]).0, 200);
    assert_eq!(curl("POST", &publish, Some("same"), &[&same, &cookie]).0, 200);
    let (mut by_cookie, rx) = sse_with(&format!("{base}/events?channel={ch}"), None, &[listed.clone(), cookie.clone()]);
    let deadline = Instant::now() + WAIT;
    loop {
        assert_eq!(curl("POST", &publish, Some("to sse"), &[&bearer]).0, 200);
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(300)) {
            assert_eq!(serde_json::from_str::<Value>(&e.data).unwrap()["payload"], "to sse");
            break;
        }
        assert!(Instant::now() < deadline, "the listed origin's SSE got nothing");
    }
    let _ = by_cookie.kill();

    // CORS: the listed origin is answered, the foreign one is not.
    let preflight = |origin: &str| {
        let out = Command::new("curl")
            .args(["-s", "-D", "-", "-o", "/dev/null", "-X", "OPTIONS", &publish])
            .args(["-H", &format!("Origin: {origin}"), "-H", "Access-Control-Request-Method: POST"])
            .args(["-H", "Access-Control-Request-Headers: authorization"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
    };
    let ok = preflight(GOOD);
    assert!(ok.contains(&format!("access-control-allow-origin: {GOOD}")), "{ok}");
    assert!(ok.contains("access-control-allow-credentials: true"), "{ok}");
    assert!(!preflight("http://evil.example").contains("access-control-allow-origin"));
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// curl POSTing `file`; the status (0 when the server closed first).
fn post_file(url: &str, file: &std::path::Path, headers: &[&str]) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", "-X", "POST"]);
    cmd.args(["--data-binary", &format!("@{}", file.display()), url]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.stderr(Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// An unauthenticated 60 MB body is refused without being read; a
/// `Content-Length` over the limit is refused at once, a chunked body as
/// soon as it passes it.
#[tokio::test]
async fn bodies_are_refused_before_they_are_read() {
    let db = TestDb::new().await;
    let ch = common::channel("body");
    let file = std::env::temp_dir().join(common::unique("body60m"));
    std::fs::write(&file, vec![b'x'; 60 << 20]).unwrap();

    let mut server = serve_process(&db.url, "", &["--jwt-secret", SECRET]);
    let pid = server.child().id();
    let before = rss_kb(pid);
    for _ in 0..3 {
        let code = post_file(&format!("http://{}/publish/{ch}", server.addr), &file, &[]);
        assert!(code == 401 || code == 0, "{code}");
    }
    let grown = rss_kb(pid).saturating_sub(before);
    assert!(grown < 30 << 10, "the server grew by {grown} kB on refused bodies");

    let mut small = serve_process(&db.url, "", &["--max-event-bytes", "1024"]);
    let url = format!("http://{}/publish/{ch}", small.addr);
    let two_k = std::env::temp_dir().join(common::unique("body2k"));
    std::fs::write(&two_k, vec![b'y'; 2048]).unwrap();
    let (code, v) = curl("POST", &url, Some(&"z".repeat(2048)), &[]);
    assert_eq!(code, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("limit"), "{v}");
    assert_eq!(post_file(&url, &two_k, &["Transfer-Encoding: chunked"]), 413);
    assert_eq!(curl("POST", &url, Some("fits"), &[]).0, 200);
    let pid = small.child().id();
    let before = rss_kb(pid);
    let code = post_file(&url, &file, &["Transfer-Encoding: chunked"]);
    assert!(code == 413 || code == 0, "{code}");
    assert!(rss_kb(pid).saturating_sub(before) < 30 << 10);
    let _ = (std::fs::remove_file(&file), std::fs::remove_file(&two_k));
}

/// Bad input is a 4xx with a JSON body, never a 5xx.
#[tokio::test]
async fn bad_input_is_a_client_error() {
    let db = TestDb::new().await;
    let server = serve(&db, "", &[]);
    let base = format!("http://{}", server.addr);
    let check = |(code, v): (u16, Value), want: u16, what: &str| {
        assert_eq!(code, want, "{what}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {v}");
    };
    let nul_file = std::env::temp_dir().join(common::unique("nul"));
    std::fs::write(&nul_file, b"a\0b").unwrap();
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-X", "POST", "--data-binary"])
        .arg(format!("@{}", nul_file.display()))
        .arg(format!("{base}/publish/nul"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    check((code.parse().unwrap(), serde_json::from_str(body).unwrap()), 400, "NUL in a message");
    let _ = std::fs::remove_file(&nul_file);

    check(curl("PUT", &format!("{base}/store/b%00x/1"), Some("{}"), &[]), 400, "NUL in a bucket");
    check(curl("PUT", &format!("{base}/store/b/1%001"), Some("{}"), &[]), 400, "NUL in an id");
    check(curl("GET", &format!("{base}/store/b/1%001"), None, &[]), 400, "NUL in an id (GET)");
    // A JSON string with U+0000 is valid JSON that jsonb refuses (22P05).
    check(curl("PUT", &format!("{base}/store/b/1"), Some(r#"{"t":"a\u0000b"}"#), &[]), 400, "NUL in JSON");
    // Still fine afterwards.
    assert_eq!(curl("PUT", &format!("{base}/store/b/1"), Some(r#"{"t":"ok"}"#), &[]).0, 200);
}

/// `/livez` answers; `/readyz` (and `/healthz`) say 503 with a reason while
/// the database is out of reach, and 200 once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database() {
    let db = TestDb::new().await;
    let proxy = crate::proxy::Proxy::start("127.0.0.1:5432".into()).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/{}?sslmode=disable", proxy.port, db.name);
    let server = tokio::task::spawn_blocking(move || serve_url(&url, "", &[])).await.unwrap();
    let get = |path: &str| {
        let (code, body) = curl_get(&format!("http://{}{path}", server.addr));
        (code, serde_json::from_str::<Value>(&body).unwrap_or_default())
    };
    assert_eq!(get("/livez").0, 200);
    let (code, v) = get("/readyz");
    assert_eq!((code, v["status"].as_str()), (200, Some("ok")), "{v}");

    proxy.refuse(true);
    proxy.cut();
    let until = |want: u16| {
        let deadline = Instant::now() + WAIT;
        loop {
            let (code, v) = get("/readyz");
            if code == want {
                return v;
            }
            assert!(Instant::now() < deadline, "/readyz never said {want}: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let v = tokio::task::block_in_place(|| until(503));
    assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    assert_eq!(get("/healthz").0, 503);
    assert_eq!(get("/livez").0, 200);
    proxy.refuse(false);
    tokio::task::block_in_place(|| until(200));
    drop(server);
}

/// Past `--max-connections` open connections, 503 at once (the probes still
/// answer); past `--publish-rate`, 429; a client that does not finish its
/// request head within `--header-timeout` is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_refuse_clearly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await;
    let server: Server = serve(&db, "", &["--max-connections", "2", "--publish-rate", "1", "--header-timeout", "1s"]);
    let base = format!("http://{}", server.addr);
    let ch = common::channel("caps");
    let url = format!("{base}/events?channel={ch}");
    let (mut a, _ra) = sse(&url, None);
    let (mut b, _rb) = sse(&url, None);
    let deadline = Instant::now() + WAIT;
    loop {
        // A stream that raced a probe for the last place was refused (its
        // curl exited): open it again.
        for stream in [&mut a, &mut b] {
            if matches!(stream.try_wait(), Ok(Some(_))) {
                *stream = sse(&url, None).0;
            }
        }
        // Both streams subscribed: both connections hold their places (the
        // probe answers over the cap too).
        let (_, body) = curl_get(&format!("{base}/readyz"));
        if serde_json::from_str::<Value>(&body).unwrap()["subscribers"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, m) = curl_get(&format!("{base}/metrics"));
    assert!(m.contains("pgpubsub_open_connections 2"), "{m}");
    let (code, v) = curl("POST", &format!("{base}/publish/{ch}"), Some("x"), &[]);
    assert_eq!(code, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--max-connections"), "{v}");
    assert_eq!(curl_get(&format!("{base}/readyz")).0, 200);
    let _ = (a.kill(), b.kill());
    let _ = (a.wait(), b.wait());

    // A burst of two, then one a second.
    let deadline = Instant::now() + WAIT;
    let codes: Vec<u16> = loop {
        let codes: Vec<u16> = (0..3).map(|_| curl("POST", &format!("{base}/publish/{ch}"), Some("r"), &[]).0).collect();
        // The streams' places are given back once the server sees them close.
        if !codes.contains(&503) {
            break codes;
        }
        assert!(Instant::now() < deadline, "{codes:?}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    };
    assert_eq!(codes.last(), Some(&429), "{codes:?}");

    // Slowloris: half a request head, then nothing.
    let mut slow = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, slow.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(started.elapsed() < Duration::from_secs(5), "held for {:?}", started.elapsed());
}

/// Connections over the cap are answered (503, or a probe) only up to a
/// tenth of the cap plus 16 at once; past that a connection is closed at
/// once instead of being held until the header timeout.
#[tokio::test]
async fn connections_over_the_cap_are_bounded_too() {
    use tokio::io::AsyncReadExt;
    let db = TestDb::new().await;
    let server = serve(&db, "", &["--max-connections", "1", "--header-timeout", "10s"]);
    // One place, and 0 / 10 + 16 = 16 answered over it: 17 idle sockets
    // fill both (each waits for its request head).
    let mut idle = Vec::new();
    for _ in 0..17 {
        idle.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(3), extra.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the 18th connection was not closed at once: {read:?}");
    // An idle one within the bound is still open (it would get its answer).
    let mut first = idle.remove(1);
    let held = tokio::time::timeout(Duration::from_millis(500), first.read(&mut buf)).await;
    assert!(held.is_err(), "a connection within the bound was closed: {held:?}");
}
