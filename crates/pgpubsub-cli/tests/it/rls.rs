//! Row-level authorization through the gateway: a token's `role` claim and
//! its claims decide, with the table's own policies and column privileges,
//! which row changes each subscriber receives, over SSE and WebSocket,
//! live and replayed. The gateway runs as an "authenticator" role that is
//! not a superuser and may only become the tenants' role.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, TestDb, WAIT};
use crate::serve::{curl_get, next_sse, now_s, serve_url, sse_with, token, Sse, SECRET};

/// The roles of one test (roles are per cluster: unique names), dropped
/// when it ends.
struct Roles {
    admin: tokio_postgres::Client,
    /// The gateway's login role.
    auth: String,
    /// The role tokens name.
    tenant: String,
    /// A role the gateway may not become.
    other: String,
    db: String,
}

impl Roles {
    async fn new(db: &TestDb) -> Roles {
        let admin = db.client().await;
        let u = common::unique("rls").to_lowercase();
        let (auth, tenant, other) = (format!("{u}_auth"), format!("{u}_tenant"), format!("{u}_other"));
        admin
            .batch_execute(&format!(
                "CREATE ROLE {auth} LOGIN NOINHERIT; CREATE ROLE {tenant} NOLOGIN; CREATE ROLE {other} NOLOGIN;
                 GRANT {tenant} TO {auth};
                 -- What docs/delivery.md gives the gateway's role: read the log.
                 GRANT USAGE ON SCHEMA pubsub TO {auth};
                 GRANT SELECT ON pubsub.events, pubsub.retention TO {auth};"
            ))
            .await
            .unwrap();
        Roles { admin, auth, tenant, other, db: db.name.clone() }
    }

    /// The test database's URL as the gateway's role.
    fn url(&self) -> String {
        let admin = common::admin_url();
        let (scheme, rest) = admin.split_once("://").unwrap();
        let at = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{}@{}/{}", self.auth, at.split('/').next().unwrap(), self.db)
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let (auth, tenant, other, db) = (self.auth.clone(), self.tenant.clone(), self.other.clone(), self.db.clone());
        // Dropped from another connection once the test's database is gone
        // with it (its objects hold the grants): by the owner, then the roles.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let admin = pgpubsub::db::connect(&common::admin_url().parse().unwrap()).await.unwrap();
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
                let _ = admin.batch_execute(&format!("DROP ROLE IF EXISTS {auth}, {tenant}, {other}")).await;
            });
        })
        .join()
        .unwrap();
    }
}

/// `orders` with a policy on the `tenant` claim, a column the tenants may
/// not read, watched on a channel of its own.
async fn orders(roles: &Roles) -> String {
    let ch = common::unique("orders");
    let (tenant, auth) = (&roles.tenant, &roles.auth);
    roles
        .admin
        .batch_execute(&format!(
            "CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL, item text, secret text);
             ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
             CREATE POLICY by_tenant ON orders FOR SELECT TO {tenant}
                 USING (tenant = current_setting('request.jwt.claims', true)::json ->> 'tenant');
             GRANT SELECT (id, tenant, item) ON orders TO {tenant};
             GRANT SELECT ON orders TO {auth};
             SELECT pubsub.watch('orders', '{ch}');"
        ))
        .await
        .unwrap();
    ch
}

fn claims(ch: &str, role: &str, tenant: &str) -> Value {
    json!({"exp": now_s() + 3600, "read": [ch], "role": role, "tenant": tenant})
}

/// The next change of an SSE stream, as JSON.
fn change(rx: &std::sync::mpsc::Receiver<Sse>) -> (Value, Option<String>) {
    loop {
        let e = next_sse(rx);
        if e.event == "change" {
            return (serde_json::from_str(&e.data).unwrap(), e.id);
        }
    }
}

/// What a subscriber was handed, compactly: (op, view, id, new, old).
fn seen(v: &Value) -> (String, Value, Value, Value, Value) {
    let id = v["key"]["id"].clone();
    (v["op"].as_str().unwrap().to_string(), v["view"].clone(), id, v["new"].clone(), v["old"].clone())
}

/// Waits until the gateway counts at least `n` subscribers.
async fn subscribers(addr: &str, n: u64) {
    until_subscribers(addr, |got| got >= n).await;
}

/// Waits until the gateway counts exactly `n` subscribers.
async fn subscribers_exactly(addr: &str, n: u64) {
    until_subscribers(addr, |got| got == n).await;
}

async fn until_subscribers(addr: &str, done: impl Fn(u64) -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v: Value = serde_json::from_str(&curl_get(&format!("http://{addr}/healthz")).1).unwrap_or_default();
        let got = v["subscribers"].as_u64().unwrap_or(0);
        if done(got) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the subscribers stayed at {got}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_sees_its_rows_enter_leave_and_deletes_without_the_columns_it_may_not_read() {
    let db = TestDb::new().await;
    let roles = Roles::new(&db).await;
    let ch = orders(&roles).await;
    let server = serve_url(&roles.url(), &ch, &["--jwt-secret", SECRET, "--heartbeat", "500ms"]);
    let events = format!("http://{}/events?channel={ch}", server.addr);
    let bearer = |c: Value| vec![format!("Authorization: Bearer {}", token(SECRET, c))];

    // A role the gateway may not become, or none at all: refused, never
    // served with the gateway's own rights.
    for role in [roles.other.as_str(), "no_such_role_at_all", "postgres"] {
        let h = bearer(claims(&ch, role, "a"));
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5", "-H", &h[0], &events])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.ends_with("\n403"), "{role}: {text}");
        assert!(text.contains("cannot be taken by the gateway"), "{role}: {text}");
    }

    let (mut a, rx_a) = sse_with(&events, None, &bearer(claims(&ch, &roles.tenant, "a")));
    let (mut b, rx_b) = sse_with(&events, None, &bearer(claims(&ch, &roles.tenant, "b")));
    let ws_url = format!("ws://{}/ws", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    let request = json!({"channels": [ch], "token": token(SECRET, claims(&ch, &roles.tenant, "a"))});
    ws.send(Message::Text(request.to_string().into())).await.unwrap();
    subscribers(&server.addr, 3).await;

    let w = db.client().await;
    w.batch_execute(
        "INSERT INTO orders VALUES (1, 'a', 'pen', 's1');
         INSERT INTO orders VALUES (2, 'b', 'ink', 's2');
         UPDATE orders SET item = 'red pen' WHERE id = 1;
         UPDATE orders SET tenant = 'a' WHERE id = 2;
         UPDATE orders SET tenant = 'b' WHERE id = 1;
         UPDATE orders SET tenant = 'a' WHERE id = 1;
         DELETE FROM orders WHERE id = 1;
         INSERT INTO orders VALUES (100, 'a', 'fence', 's');
         INSERT INTO orders VALUES (200, 'b', 'fence', 's');",
    )
    .await
    .unwrap();

    let row = |id: i32, tenant: &str, item: &str| json!({"id": id, "tenant": tenant, "item": item});
    let key = |id: i32| json!(id);
    let expect_a = vec![
        ("INSERT".to_string(), Value::Null, key(1), row(1, "a", "pen"), Value::Null),
        ("UPDATE".into(), Value::Null, key(1), row(1, "a", "red pen"), row(1, "a", "pen")),
        ("UPDATE".into(), json!("enter"), key(2), row(2, "a", "ink"), Value::Null),
        ("UPDATE".into(), json!("leave"), key(1), Value::Null, Value::Null),
        ("UPDATE".into(), json!("enter"), key(1), row(1, "a", "red pen"), Value::Null),
        ("DELETE".into(), Value::Null, key(1), Value::Null, row(1, "a", "red pen")),
        ("INSERT".into(), Value::Null, key(100), row(100, "a", "fence"), Value::Null),
    ];
    let expect_b = vec![
        ("INSERT".to_string(), Value::Null, key(2), row(2, "b", "ink"), Value::Null),
        ("UPDATE".into(), json!("leave"), key(2), Value::Null, Value::Null),
        ("UPDATE".into(), json!("enter"), key(1), row(1, "b", "red pen"), Value::Null),
        ("UPDATE".into(), json!("leave"), key(1), Value::Null, Value::Null),
        ("INSERT".into(), Value::Null, key(200), row(200, "b", "fence"), Value::Null),
    ];
    // Each stream, up to its fence (which comes last: nothing else can).
    let mut got_a = Vec::new();
    let (mut first_id, mut first_seq) = (None, 0);
    while got_a.len() < expect_a.len() {
        let (v, id) = change(&rx_a);
        assert!(!v.to_string().contains("\"secret\""), "a column the role may not read: {v}");
        if first_id.is_none() {
            (first_id, first_seq) = (id, v["seq"].as_i64().unwrap());
        }
        got_a.push(seen(&v));
    }
    assert_eq!(got_a, expect_a);
    let got_b: Vec<_> = (0..expect_b.len()).map(|_| seen(&change(&rx_b).0)).collect();
    assert_eq!(got_b, expect_b);
    let mut got_ws = Vec::new();
    while got_ws.len() < expect_a.len() {
        let m = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "event" && v["event"]["kind"] == "change" {
            assert!(!v.to_string().contains("\"secret\""), "{v}");
            got_ws.push(seen(&v["event"]));
        }
    }
    assert_eq!(got_ws, expect_a);
    let _ = ws.close(None).await;
    let _ = (a.kill(), b.kill());

    // Replayed from the log after a reconnect: the same, decided the same.
    // (At least once: a resume may repeat the events before its position,
    // which `seq` tells apart.)
    let (mut again, rx) = sse_with(&events, first_id.as_deref(), &bearer(claims(&ch, &roles.tenant, "a")));
    let mut replayed = Vec::new();
    while replayed.len() < expect_a.len() - 1 {
        let (v, _) = change(&rx);
        if v["seq"].as_i64() > Some(first_seq) {
            replayed.push(seen(&v));
        }
    }
    assert_eq!(replayed, expect_a[1..]);
    let _ = again.kill();
    subscribers_exactly(&server.addr, 0).await;

    // A policy changed takes effect within pubsub::views::FRESH (the wait
    // is that bound, not a guess): under a closed policy tenant a's row is
    // withheld (the gateway's counter says when it was decided), and once
    // the policy is back, the next row comes.
    roles.admin.batch_execute("ALTER POLICY by_tenant ON orders USING (false)").await.unwrap();
    tokio::time::sleep(pgpubsub::views::FRESH).await;
    let (mut late, rx) = sse_with(&events, None, &bearer(claims(&ch, &roles.tenant, "a")));
    subscribers_exactly(&server.addr, 1).await;
    let withheld = metric(&server.addr, "pgpubsub_rls_withheld_total");
    w.batch_execute("INSERT INTO orders VALUES (3, 'a', 'hidden', 's')").await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while metric(&server.addr, "pgpubsub_rls_withheld_total") <= withheld {
        assert!(std::time::Instant::now() < deadline, "the row was never decided");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    roles
        .admin
        .batch_execute(
            "ALTER POLICY by_tenant ON orders USING (tenant = current_setting('request.jwt.claims', true)::json ->> 'tenant')",
        )
        .await
        .unwrap();
    tokio::time::sleep(pgpubsub::views::FRESH).await;
    w.batch_execute("INSERT INTO orders VALUES (4, 'a', 'fence', 's')").await.unwrap();
    assert_eq!(seen(&change(&rx).0).2, key(4), "the row written under the closed policy was withheld");
    let _ = late.kill();

    // --default-role: a token without a role claim is decided as that role
    // (PostgREST's anonymous role), with its claims.
    let anon = serve_url(&roles.url(), &ch, &["--jwt-secret", SECRET, "--default-role", &roles.tenant]);
    let no_role = json!({"exp": now_s() + 3600, "read": [ch], "tenant": "b"});
    let (mut plain, rx) = sse_with(&format!("http://{}/events?channel={ch}", anon.addr), None, &bearer(no_role));
    subscribers(&anon.addr, 1).await;
    w.batch_execute("INSERT INTO orders VALUES (5, 'a', 'not b', 's'), (6, 'b', 'b', 's')").await.unwrap();
    assert_eq!(seen(&change(&rx).0).2, key(6));
    let _ = plain.kill();
}

/// A counter of the gateway's /metrics.
fn metric(addr: &str, name: &str) -> f64 {
    let text = curl_get(&format!("http://{addr}/metrics")).1;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// A shape under row-level authorization: its snapshot is read as the
/// token's role with its claims, so it holds the tenant's rows only,
/// without the columns the role may not read, as its live changes do; a
/// filter on such a column is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_shape_holds_its_rows_only_in_the_snapshot_and_after() {
    let db = TestDb::new().await;
    let roles = Roles::new(&db).await;
    let ch = orders(&roles).await;
    let w = db.client().await;
    w.batch_execute("INSERT INTO orders VALUES (1, 'a', 'pen', 's1'), (2, 'b', 'ink', 's2'), (3, 'a', 'cap', 's3')")
        .await
        .unwrap();
    let server = serve_url(&roles.url(), &ch, &["--jwt-secret", SECRET]);
    let bearer = |c: Value| vec![format!("Authorization: Bearer {}", token(SECRET, c))];
    let url = format!("http://{}/events?table=orders&snapshot=true", server.addr);
    let (mut a, rx) = sse_with(&url, None, &bearer(claims(&ch, &roles.tenant, "a")));
    let mut rows = Vec::new();
    loop {
        let e = next_sse(&rx);
        match e.event.as_str() {
            "snapshot" => {
                rows.extend(serde_json::from_str::<Value>(&e.data).unwrap()["rows"].as_array().unwrap().clone())
            }
            "ready" => break,
            other => panic!("{other}: {}", e.data),
        }
    }
    rows.sort_by_key(|r| r["id"].as_i64());
    assert_eq!(rows, [json!({"id": 1, "tenant": "a", "item": "pen"}), json!({"id": 3, "tenant": "a", "item": "cap"})]);
    w.batch_execute(
        "UPDATE orders SET tenant = 'a' WHERE id = 2; UPDATE orders SET tenant = 'b' WHERE id = 1;
         INSERT INTO orders VALUES (100, 'a', 'fence', 's')",
    )
    .await
    .unwrap();
    let got: Vec<_> = (0..3).map(|_| seen(&change(&rx).0)).collect();
    let row = |id: i32, item: &str| json!({"id": id, "tenant": "a", "item": item});
    assert_eq!(
        got,
        [
            ("UPDATE".to_string(), json!("enter"), json!(2), row(2, "ink"), Value::Null),
            ("UPDATE".into(), json!("leave"), json!(1), Value::Null, Value::Null),
            ("INSERT".into(), Value::Null, json!(100), row(100, "fence"), Value::Null),
        ]
    );
    let _ = a.kill();

    let filtered = format!(
        "http://{}/events?table=orders&snapshot=true&filter={}",
        server.addr,
        form_urlencoded::byte_serialize(b"secret = 's1'").collect::<String>()
    );
    let h = bearer(claims(&ch, &roles.tenant, "a"));
    let (code, body) = crate::serve::curl("GET", &filtered, None, &[&h[0]]);
    assert_eq!(code, 403, "{body}");
    assert!(body.to_string().contains("may not read"), "{body}");
}
