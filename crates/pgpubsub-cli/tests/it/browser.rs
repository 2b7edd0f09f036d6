//! The live page in a real browser: headless Chromium (Debian's package),
//! driven over the DevTools protocol. It connects, shows an event written
//! to the database, and reconnects by itself after the server restarts.
//!
//! Ignored by a plain `cargo test` (it needs Chromium); `.ci/run` installs
//! Chromium and runs it with `--include-ignored`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, TestDb, WAIT};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_on(db: &TestDb, port: u16, channel: &str) -> Killed {
    serve_with(db, port, channel, &[])
}

fn serve_with(db: &TestDb, port: u16, channel: &str, extra: &[&str]) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_pgpubsub"))
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .args(["serve", "--bind", &format!("127.0.0.1:{port}"), "--channel", channel])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Killed(child)
}

/// A page's DevTools connection.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    id: u64,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.id += 1;
        let id = self.id;
        self.ws
            .send(Message::Text(json!({"id": id, "method": method, "params": params}).to_string().into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next()).await.unwrap().unwrap().unwrap();
            let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap_or_default();
            if v["id"] == id {
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    async fn until(&mut self, expression: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.eval(expression).await != json!(true) {
            let body = self.eval("document.body.innerText").await;
            let errors = self.eval("JSON.stringify(window.__errors ?? [])").await;
            assert!(Instant::now() < deadline, "{what}: not seen; the page shows: {body}; errors: {errors}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Headless Chromium on `url`: the process, the page's DevTools
/// connection, and the profile directory to remove.
async fn open_page(url: &str) -> (Killed, Page, std::path::PathBuf) {
    let debug_port = free_port();
    let profile = std::env::temp_dir().join(common::unique("chromium"));
    let chromium = Killed(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &format!("--user-data-dir={}", profile.display()),
                &format!("--remote-debugging-port={debug_port}"),
                url,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is installed (apt-get install chromium)"),
    );
    // The page's DevTools endpoint.
    let deadline = Instant::now() + WAIT;
    let ws_url = loop {
        let out =
            Command::new("curl").args(["-s", &format!("http://127.0.0.1:{debug_port}/json/list")]).output().unwrap();
        let targets: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let page = targets.as_array().and_then(|t| t.iter().find(|t| t["type"] == "page").cloned());
        if let Some(url) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str().map(str::to_string)) {
            break url;
        }
        assert!(Instant::now() < deadline, "no page target in chromium");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    (chromium, Page { ws, id: 0 }, profile)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium (apt-get install chromium); .ci/run runs it"]
async fn the_live_page_shows_events_and_reconnects_after_a_restart() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("page");
    let port = free_port();
    let server = serve_on(&db, port, ch.as_str());

    let (chromium, mut page, profile) = open_page(&format!("http://127.0.0.1:{port}/?channel={ch}")).await;

    page.until("document.getElementById('status').textContent === 'live'", "connected").await;
    pgpubsub::publish(&client, &ch, "hello browser").await.unwrap();
    page.until("document.getElementById('log').innerText.includes('hello browser')", "first event").await;

    // The server goes away and comes back on the same address.
    drop(server);
    page.until("document.getElementById('status').textContent !== 'live'", "noticed the drop").await;
    pgpubsub::publish(&client, &ch, "while the server was down").await.unwrap();
    let _server = serve_on(&db, port, ch.as_str());
    page.until("document.getElementById('status').textContent === 'live'", "reconnected").await;
    pgpubsub::publish(&client, &ch, "after the restart").await.unwrap();
    page.until("document.getElementById('log').innerText.includes('after the restart')", "event after restart").await;
    // Missed while down: replayed from the log through Last-Event-ID.
    page.until("document.getElementById('log').innerText.includes('while the server was down')", "missed event").await;
    // Each event once, though the resume repeated some.
    let rows = page.eval("document.getElementById('log').childElementCount").await;
    assert_eq!(rows, json!(3), "{}", page.eval("document.getElementById('log').innerText").await);

    // A picture for people (not asserted): target/live-page.png.
    let shot = page.call("Page.captureScreenshot", json!({"format": "png"})).await;
    if let Some(data) = shot["data"].as_str() {
        let _ = std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/live-page.b64"), data);
    }
    drop(chromium);
    let _ = std::fs::remove_dir_all(profile);
}

/// The live page logged in with a token (typed into the page, never in the
/// URL) holds a live shape of a table under row-level authorization: it
/// shows the rows that user's role and claims may see, and keeps them in
/// step as rows enter, change and leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium (apt-get install chromium); .ci/run runs it"]
async fn the_live_page_logs_in_and_shows_the_rows_that_user_sees() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("pageshape");
    let tenant = common::unique("page_tenant").to_lowercase();
    client
        .batch_execute(&format!(
            "CREATE ROLE {tenant} NOLOGIN;
             CREATE TABLE items (id int PRIMARY KEY, owner text NOT NULL, item text);
             ALTER TABLE items ENABLE ROW LEVEL SECURITY;
             CREATE POLICY mine ON items FOR SELECT TO {tenant}
                 USING (owner = current_setting('request.jwt.claims', true)::json ->> 'sub');
             GRANT SELECT ON items TO {tenant};
             INSERT INTO items VALUES (1, 'ann', 'pen'), (2, 'bob', 'ink'), (3, 'ann', 'cap');
             SELECT pubsub.watch('items', '{ch}');"
        ))
        .await
        .unwrap();
    let secret = crate::serve::SECRET;
    let port = free_port();
    let _server = serve_with(&db, port, ch.as_str(), &["--jwt-secret", secret]);
    let claims = json!({"exp": crate::serve::now_s() + 600, "read": [ch.as_str()], "role": tenant, "sub": "ann"});
    let token = crate::serve::token(secret, claims);
    let (chromium, mut page, profile) = open_page(&format!("http://127.0.0.1:{port}/")).await;
    // Until the page's script has run (the first document may be about:blank).
    page.until("typeof document.getElementById('connect')?.onclick === 'function'", "the page loaded").await;
    page.eval(
        "window.__errors = []; \
         addEventListener('error', (e) => __errors.push(String(e.message))); \
         addEventListener('unhandledrejection', (e) => __errors.push(String(e.reason))); true",
    )
    .await;
    page.eval(&format!(
        "document.getElementById('table').value = 'items'; document.getElementById('token').value = '{token}'; \
         document.getElementById('connect').click(); true"
    ))
    .await;
    let shown = "document.getElementById('shape').innerText";
    page.until(&format!("{shown}.includes('pen') && {shown}.includes('cap')"), "ann's rows").await;
    assert_eq!(
        page.eval("document.getElementById('shape').rows.length").await,
        json!(3),
        "a header and ann's two rows"
    );
    client
        .batch_execute("UPDATE items SET owner = 'ann' WHERE id = 2; UPDATE items SET owner = 'bob' WHERE id = 1; INSERT INTO items VALUES (9, 'ann', 'fence')")
        .await
        .unwrap();
    page.until(&format!("{shown}.includes('fence')"), "the fence row").await;
    let text = page.eval(shown).await.as_str().unwrap_or_default().to_string();
    assert!(text.contains("ink") && text.contains("cap") && !text.contains("pen"), "entered, kept, left: {text}");
    assert_eq!(page.eval("document.getElementById('shape').rows.length").await, json!(4), "{text}");
    drop(chromium);
    let _ = std::fs::remove_dir_all(profile);
    let _ = client.batch_execute(&format!("DROP TABLE items; DROP ROLE {tenant}")).await;
}
