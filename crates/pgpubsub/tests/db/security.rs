//! Who can read and who can forge (docs/delivery.md): tested with roles
//! that lack the privilege.

use std::time::Duration;

use futures_util::StreamExt;
use pgpubsub::db::Config;
use pgpubsub::{Listener, ListenerOptions};
use tokio_postgres::{AsyncMessage, Client};

use crate::common::{self, next, TestDb};

/// A role of the test's own, dropped at the end.
struct Role {
    name: String,
    config: Config,
    admin: Client,
}

impl Role {
    async fn new(db: &TestDb, grants: &str) -> Role {
        let name = common::unique("role");
        let admin = db.client().await;
        admin.batch_execute(&format!("CREATE ROLE {name} LOGIN; {}", grants.replace("ROLE", &name))).await.unwrap();
        let mut config = db.config.clone();
        config.pg_mut().user(&name);
        Role { name, config, admin }
    }

    async fn client(&self) -> Client {
        pgpubsub::db::connect(&self.config).await.unwrap()
    }

    async fn drop_role(self) {
        let _ = self.admin.batch_execute(&format!("DROP OWNED BY {0}; DROP ROLE {0}", self.name)).await;
    }
}

/// A plain LISTEN connection (not pgpubsub) on `channels`: its client, and
/// every (channel, payload) it hears.
async fn raw_listen(
    config: &Config,
    channels: &[&str],
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
    let (client, mut conn) = pgpubsub::db::open(config).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut m = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = m.next().await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    let listen: String = channels.iter().map(|c| format!("LISTEN \"{c}\";")).collect();
    client.batch_execute(&listen).await.unwrap();
    (client, rx)
}

#[tokio::test]
async fn a_login_only_role_reads_nothing_of_a_watched_table() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let ch = common::channel("secret");
    admin.batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, secret text)").await.unwrap();
    pgpubsub::watch(&admin, "accounts", Some(&ch)).await.unwrap();
    let role = Role::new(&db, "").await;

    // Through LISTEN: the channel and the wake channel carry no row data.
    let (_raw, mut heard) = raw_listen(&role.config, &[ch.as_str(), "pubsub_wake"]).await;
    let mut l = db.listen(&[ch.clone()]).await; // a waiting listener, so writers send wake-ups
    admin.execute("INSERT INTO accounts VALUES (1, 'hunter2')", &[]).await.unwrap();
    let e = next(&mut l).await;
    assert!(e.json().contains("hunter2"));
    let mut payloads = Vec::new();
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(500), heard.recv()).await {
        payloads.push(n);
    }
    assert!(payloads.iter().all(|(_, p)| !p.contains("hunter2")), "{payloads:?}");
    assert!(payloads.iter().all(|(c, p)| c == "pubsub_wake" && p == ch.as_str()), "{payloads:?}");

    // Through the log: nothing at all.
    let client = role.client().await;
    let err = client.query("SELECT body FROM pubsub.events", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    role.drop_role().await;
}

/// A reader granted the log sees the changes of the tables it may SELECT,
/// and published messages; not the others'.
#[tokio::test]
async fn a_reader_gets_only_the_changes_of_tables_it_may_select() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let ch = common::channel("mixed");
    admin
        .batch_execute("CREATE TABLE open_t (id int PRIMARY KEY); CREATE TABLE closed_t (id int PRIMARY KEY)")
        .await
        .unwrap();
    pgpubsub::watch(&admin, "open_t", Some(&ch)).await.unwrap();
    pgpubsub::watch(&admin, "closed_t", Some(&ch)).await.unwrap();
    let role = Role::new(
        &db,
        "GRANT USAGE ON SCHEMA pubsub TO ROLE; GRANT SELECT ON pubsub.events, pubsub.retention TO ROLE; \
         GRANT SELECT ON open_t TO ROLE",
    )
    .await;
    let mut l = Listener::connect(&role.config, &[ch.clone()], ListenerOptions::default()).await.unwrap();
    admin
        .batch_execute(
            "INSERT INTO closed_t VALUES (1); INSERT INTO open_t VALUES (2); INSERT INTO closed_t VALUES (3)",
        )
        .await
        .unwrap();
    pgpubsub::publish(&admin, &ch, "a message").await.unwrap();
    let e = next(&mut l).await;
    assert_eq!(e.change().map(|c| c.table.as_str()), Some("open_t"), "{}", e.json());
    let e = next(&mut l).await;
    assert_eq!(e.message().map(|m| m.payload.as_str()), Some("a message"), "{}", e.json());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(l.try_recv().is_none());
    drop(l);
    role.drop_role().await;
}

/// A role that may write a watched table writes it without any privilege on
/// the pubsub schema, and cannot write the log any other way.
#[tokio::test]
async fn no_role_can_write_the_log_except_through_a_real_change() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let ch = common::channel("forgery");
    admin.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)").await.unwrap();
    pgpubsub::watch(&admin, "orders", Some(&ch)).await.unwrap();
    // Even with USAGE on the schema and SELECT on the log.
    let role = Role::new(
        &db,
        "GRANT INSERT ON orders TO ROLE; GRANT USAGE ON SCHEMA pubsub TO ROLE; GRANT SELECT ON pubsub.events TO ROLE",
    )
    .await;
    let client = role.client().await;
    client.execute("INSERT INTO orders VALUES (1)", &[]).await.unwrap();
    for forge in [
        "INSERT INTO pubsub.events (seq, channel, body) VALUES (999, 'x', '{}')",
        "UPDATE pubsub.events SET body = '{}'",
        "DELETE FROM pubsub.events",
        "SELECT pubsub.publish('x', 'y')",
        "SELECT pubsub.append('x', 999, '{}')",
        "UPDATE pubsub.cursors SET seq = 0",
    ] {
        let err = client.batch_execute(forge).await.unwrap_err();
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{forge}: {err}");
    }
    let n: i64 =
        admin.query_one("SELECT count(*) FROM pubsub.events WHERE channel = $1", &[&ch.as_str()]).await.unwrap().get(0);
    assert_eq!(n, 1);
    drop(client);
    role.drop_role().await;
}

/// `watch --inline` keeps the seeds' way: a program that is not pgpubsub
/// reads each event's JSON from the payloads, chunked past 8000 bytes, at
/// any size.
#[tokio::test]
async fn an_inline_watch_round_trips_every_size_to_a_plain_listen() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let ch = common::channel("inline");
    admin.batch_execute("CREATE TABLE docs (id int PRIMARY KEY, body text)").await.unwrap();
    admin.execute("SELECT pubsub.watch('docs', $1, true)", &[&ch.as_str()]).await.unwrap();
    let (_raw, mut heard) = raw_listen(&db.config, &[ch.as_str()]).await;
    // The envelope of a row with an empty text: the rest is the text.
    admin.execute("INSERT INTO docs VALUES (0, '')", &[]).await.unwrap();
    let (_, empty) = tokio::time::timeout(common::WAIT, heard.recv()).await.unwrap().unwrap();
    for (id, target) in [(1, 7_999usize), (2, 8_001), (3, 1_000_000), (4, 30_000)] {
        let unit = if id == 4 { "é€😀" } else { "x" };
        let text = unit.repeat((target - empty.len()) / unit.len());
        admin.execute("INSERT INTO docs VALUES ($1, $2)", &[&id, &text]).await.unwrap();
        let logged: String = admin
            .query_one("SELECT body FROM pubsub.events WHERE channel = $1 ORDER BY seq DESC LIMIT 1", &[&ch.as_str()])
            .await
            .unwrap()
            .get(0);
        // Put back together as a foreign program would: whole, or ~c frames.
        let mut parts = Vec::new();
        let got = loop {
            let (_, p) = tokio::time::timeout(common::WAIT, heard.recv()).await.unwrap().unwrap();
            assert!(p.len() < 8000);
            if !p.starts_with("~c:") {
                break p;
            }
            let fields: Vec<&str> = p.splitn(7, ':').collect();
            let count: usize = fields[3].parse().unwrap();
            parts.push(fields[6].to_string());
            if parts.len() == count {
                break parts.concat();
            }
        };
        assert!(got == logged, "event {id} of {} bytes altered", logged.len());
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["new"]["body"].as_str(), Some(text.as_str()));
        assert_eq!(parts.is_empty(), logged.len() < 8000, "{} bytes", logged.len());
    }
}
