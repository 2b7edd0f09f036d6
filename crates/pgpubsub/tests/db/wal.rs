//! Capture from the WAL (`pubsub.watch_wal`, `pubsub.publish_wal`,
//! `WalListener`), on a cluster of the test's own with wal_level = logical.

use std::time::Duration;

use pgpubsub::{Channel, Error, Event, Op, WalListener, WalOptions};
use tokio_postgres::Client;

use crate::cluster::Cluster;
use crate::common::{unique, WAIT};

/// A cluster that can decode, and a migrated database in it.
async fn logical() -> (Cluster, pgpubsub::db::Config, Client) {
    crate::common::init_logs();
    let cluster = tokio::task::spawn_blocking(Cluster::logical).await.unwrap();
    let admin = pgpubsub::db::connect(&cluster.url("postgres").parse().unwrap()).await.unwrap();
    admin.batch_execute("CREATE DATABASE t").await.unwrap();
    let config: pgpubsub::db::Config = cluster.url("t").parse().unwrap();
    let mut client = pgpubsub::db::connect(&config).await.unwrap();
    pgpubsub::migrate::up(&mut client, false).await.unwrap();
    (cluster, config, client)
}

async fn next(listener: &mut WalListener) -> Event {
    tokio::time::timeout(WAIT, listener.recv()).await.expect("an event in time").expect("stream open").unwrap()
}

/// Nothing more within `wait`.
async fn nothing(listener: &mut WalListener, wait: Duration) {
    if let Ok(Some(e)) = tokio::time::timeout(wait, listener.recv()).await {
        panic!("expected nothing, got {:?}", e.map(|e| e.json().to_string()));
    }
}

fn value(e: &Event) -> serde_json::Value {
    serde_json::from_str(e.json()).unwrap()
}

#[tokio::test]
async fn wal_events_are_typed_complete_and_in_commit_order() {
    let (_cluster, config, client) = logical().await;
    client
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int, ok boolean, doc jsonb, price numeric, big text);
             CREATE TABLE logged (id int PRIMARY KEY);",
        )
        .await
        .unwrap();
    let orders = pgpubsub::watch::watch_wal(&client, "orders", None).await.unwrap();
    let news = Channel::new("news").unwrap();
    // A trigger-watched table is not in the WAL stream.
    pgpubsub::watch(&client, "logged", None).await.unwrap();
    let mut listener = WalListener::connect(
        &config,
        WalOptions::new(None, vec![orders.clone(), news.clone(), Channel::new("logged").unwrap()]),
    )
    .await
    .unwrap();

    let big = "é\"x\n".repeat(300_000);
    client
        .batch_execute(&format!(
            "INSERT INTO logged VALUES (1);
             BEGIN;
             INSERT INTO orders VALUES (1, 'a \"quoted\" ☃', 2, true, '{{\"k\": [1, 2]}}', 12.50, NULL);
             INSERT INTO orders VALUES (2, 'b', NULL, false, NULL, 'NaN', '{big}');
             COMMIT;
             UPDATE orders SET qty = 3 WHERE id = 1;
             UPDATE orders SET qty = 4 WHERE id = 2;
             DELETE FROM orders WHERE id = 1;
             TRUNCATE orders;"
        ))
        .await
        .unwrap();
    pgpubsub::watch::publish_wal(&client, &news, &big).await.unwrap();

    let mut events = Vec::new();
    for _ in 0..7 {
        events.push(next(&mut listener).await);
    }
    nothing(&mut listener, Duration::from_millis(500)).await;
    let v: Vec<serde_json::Value> = events.iter().map(value).collect();

    // One transaction: same lsn, indexes 0 and 1; then later lsns.
    assert_eq!(v[0]["lsn"], v[1]["lsn"]);
    assert_eq!((v[0]["index"].as_u64(), v[1]["index"].as_u64()), (Some(0), Some(1)));
    let lsns: Vec<u64> = events.iter().map(|e| e.wal.unwrap().lsn).collect();
    assert!(lsns.windows(2).all(|w| w[0] <= w[1]), "commit order: {lsns:?}");
    assert!(lsns[1] < lsns[2]);

    let c = events[0].change().unwrap();
    assert_eq!((c.op, c.schema.as_str(), c.table.as_str()), (Op::Insert, "public", "orders"));
    assert_eq!(events[0].channel, orders.as_str());
    assert_eq!(
        v[0]["new"],
        serde_json::json!({"id": 1, "item": "a \"quoted\" ☃", "qty": 2, "ok": true, "doc": {"k": [1, 2]}, "price": 12.50, "big": null})
    );
    assert_eq!(v[0]["key"], serde_json::json!({"id": 1}));
    assert_eq!(v[1]["new"]["price"], "NaN");
    assert_eq!(v[1]["new"]["big"].as_str().unwrap(), big, "a large (TOASTed) value arrives whole");
    // An update that leaves a TOASTed value alone: without REPLICA IDENTITY
    // FULL the value is not in the WAL, so it is left out, never made up.
    assert_eq!(v[2]["op"], "UPDATE");
    assert_eq!(v[2]["new"]["qty"], 3);
    assert_eq!(v[3]["new"]["qty"], 4);
    assert!(v[3]["new"].get("big").is_none(), "{}", v[3]["new"]);
    assert_eq!((v[4]["op"].as_str(), &v[4]["old"]), (Some("DELETE"), &serde_json::json!({"id": 1})));
    assert!(v[4]["new"].is_null());
    assert_eq!((v[5]["op"].as_str(), &v[5]["key"]), (Some("TRUNCATE"), &serde_json::Value::Null));
    let m = events[6].message().unwrap();
    assert_eq!((events[6].channel.as_str(), m.payload == big), ("news", true));
    for e in &events {
        assert!(!e.json().contains('\n'));
        assert!(e.seq.is_none() && e.time.is_some() && e.txid.is_some());
    }
}

#[tokio::test]
async fn a_named_wal_reader_resumes_after_what_it_finished_nothing_lost_or_repeated() {
    let (_cluster, config, client) = logical().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let ch = pgpubsub::watch::watch_wal(&client, "t", None).await.unwrap();
    let opts = || WalOptions::new(Some("resumer".into()), vec![ch.clone()]);
    let ids = |es: &[Event]| es.iter().map(|e| value(e)["new"]["id"].as_i64().unwrap()).collect::<Vec<_>>();

    let mut first = WalListener::connect(&config, opts()).await.unwrap();
    assert_eq!(first.slot(), "pgpubsub_resumer");
    for i in 1..=5 {
        client.execute("INSERT INTO t VALUES ($1)", &[&i]).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next(&mut first).await);
    }
    assert_eq!(ids(&got), [1, 2, 3, 4, 5]);
    first.close().await.unwrap();

    // Written while no reader runs: kept by the slot.
    for i in 6..=10 {
        client.execute("INSERT INTO t VALUES ($1)", &[&i]).await.unwrap();
    }
    let mut second = WalListener::connect(&config, opts()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next(&mut second).await);
    }
    assert_eq!(ids(&got), [6, 7, 8, 9, 10]);
    nothing(&mut second, Duration::from_millis(500)).await;

    // The stream is cut (the server ends the walsender) while writes go
    // on: the reader reconnects to its slot, and skips what it delivered.
    let writer = {
        let config = config.clone();
        tokio::spawn(async move {
            let c = pgpubsub::db::connect(&config).await.unwrap();
            for i in 11..=60 {
                c.execute("INSERT INTO t VALUES ($1)", &[&i]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut got = Vec::new();
    for n in 0..50 {
        if n == 10 {
            client
                .execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'pgpubsub_resumer'", &[])
                .await
                .unwrap();
        }
        got.push(next(&mut second).await);
    }
    writer.await.unwrap();
    assert_eq!(ids(&got), (11..=60).collect::<Vec<i64>>());
    assert!(second.stats().snapshot().reconnects >= 1);
    nothing(&mut second, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_wal_reader_gets_only_what_its_role_may_select() {
    let (_cluster, config, client) = logical().await;
    let reader = unique("wal_reader");
    let outsider = unique("wal_outsider");
    client
        .batch_execute(&format!(
            "CREATE TABLE open (id int PRIMARY KEY); CREATE TABLE secret (id int PRIMARY KEY, card text);
             CREATE ROLE {reader} LOGIN REPLICATION; GRANT USAGE ON SCHEMA pubsub TO {reader};
             GRANT SELECT ON open TO {reader};
             CREATE ROLE {outsider} LOGIN; GRANT USAGE ON SCHEMA pubsub TO {outsider};"
        ))
        .await
        .unwrap();
    let open = pgpubsub::watch::watch_wal(&client, "open", None).await.unwrap();
    let secret = pgpubsub::watch::watch_wal(&client, "secret", None).await.unwrap();
    let news = Channel::new("news").unwrap();
    let as_role = |role: &str| {
        let mut c = config.clone();
        c.pg_mut().user(role);
        c
    };
    let all = vec![open.clone(), secret.clone(), news.clone()];

    // LOGIN only: no stream at all, and a clear reason.
    let refused = WalListener::connect(&as_role(&outsider), WalOptions::new(None, all.clone())).await;
    match refused {
        Err(Error::Wal(why)) => assert!(why.contains("REPLICATION"), "{why}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a role without REPLICATION streamed the WAL"),
    }

    let mut listener = WalListener::connect(&as_role(&reader), WalOptions::new(None, all)).await.unwrap();
    client
        .batch_execute("INSERT INTO secret VALUES (1, '4111 1111 1111 1111'); INSERT INTO open VALUES (1);")
        .await
        .unwrap();
    pgpubsub::watch::publish_wal(&client, &news, "not for the reader").await.unwrap();
    client.batch_execute("INSERT INTO open VALUES (2)").await.unwrap();
    let a = next(&mut listener).await;
    let b = next(&mut listener).await;
    assert_eq!((a.channel.as_str(), b.channel.as_str()), (open.as_str(), open.as_str()));
    assert_eq!((value(&a)["new"]["id"].as_i64(), value(&b)["new"]["id"].as_i64()), (Some(1), Some(2)));
    nothing(&mut listener, Duration::from_millis(500)).await;

    // Granted: its later rows come (privileges are asked again within a second).
    client.batch_execute(&format!("GRANT SELECT ON secret, pubsub.wal_messages TO {reader}")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client.batch_execute("INSERT INTO secret VALUES (2, 'granted')").await.unwrap();
    pgpubsub::watch::publish_wal(&client, &news, "now readable").await.unwrap();
    let c = next(&mut listener).await;
    assert_eq!((c.channel.as_str(), value(&c)["new"]["card"].as_str()), (secret.as_str(), Some("granted")));
    assert_eq!(next(&mut listener).await.message().unwrap().payload, "now readable");

    // Writers cannot use publish_wal without a grant, nor write the table.
    let outsider_client = pgpubsub::db::connect(&as_role(&outsider)).await.unwrap();
    for sql in
        ["SELECT pubsub.publish_wal('news', 'forged')", "INSERT INTO pubsub.wal_messages VALUES ('news', 'forged')"]
    {
        let e = outsider_client.execute(sql, &[]).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{sql}: {e}");
    }
    // Granted INSERT on the table, or EXECUTE on the function, it publishes;
    // a channel name that LISTEN could not carry is refused either way.
    client
        .batch_execute(&format!(
            "GRANT INSERT ON pubsub.wal_messages TO {outsider};
             GRANT EXECUTE ON FUNCTION pubsub.publish_wal(text, text) TO {outsider};"
        ))
        .await
        .unwrap();
    pgpubsub::watch::publish_wal(&outsider_client, &news, "by insert").await.unwrap();
    outsider_client.execute("SELECT pubsub.publish_wal('news', 'by function')", &[]).await.unwrap();
    assert_eq!(next(&mut listener).await.message().unwrap().payload, "by insert");
    assert_eq!(next(&mut listener).await.message().unwrap().payload, "by function");
    for (sql, code) in [
        ("INSERT INTO pubsub.wal_messages (channel, payload) VALUES ('no-such channel', 'x')", "23514"),
        ("SELECT pubsub.publish_wal('no-such channel', 'x')", "22023"),
    ] {
        let e = outsider_client.execute(sql, &[]).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some(code), "{sql}: {e}");
    }
    nothing(&mut listener, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_changed_channel_takes_effect_in_wal_order() {
    let (_cluster, config, client) = logical().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let (a, b) = (Channel::new("chan_a").unwrap(), Channel::new("chan_b").unwrap());
    pgpubsub::watch::watch_wal(&client, "t", Some(&a)).await.unwrap();
    let mut listener = WalListener::connect(&config, WalOptions::new(None, vec![a.clone(), b.clone()])).await.unwrap();
    client.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "t", Some(&b)).await.unwrap();
    client.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    pgpubsub::unwatch(&client, "t").await.unwrap();
    client.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    let (one, two) = (next(&mut listener).await, next(&mut listener).await);
    assert_eq!((one.channel.as_str(), two.channel.as_str()), ("chan_a", "chan_b"));
    nothing(&mut listener, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn without_logical_wal_level_the_error_says_what_to_set() {
    // The shared server runs with the default wal_level (replica).
    let db = crate::common::TestDb::new().await;
    let c = db.client().await;
    let level: String = c.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    if level == "logical" {
        eprintln!("skipped: the shared server already decodes");
        return;
    }
    match WalListener::connect(&db.config, WalOptions::default()).await {
        Err(Error::Wal(why)) => assert!(why.contains("wal_level = logical"), "{why}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("streamed without wal_level = logical"),
    }
    // Named readers refuse names that are not slot names.
    let bad = WalListener::connect(&db.config, WalOptions::new(Some("Bad Name".into()), vec![])).await;
    assert!(matches!(bad, Err(Error::Config(_))));
}

#[tokio::test]
async fn rows_are_typed_as_row_to_json_types_them() {
    let (_cluster, config, client) = logical().await;
    client
        .batch_execute(
            "SET timezone = 'Asia/Kolkata';
             CREATE TABLE typed (id int PRIMARY KEY, ts timestamptz, t timestamp, d date, o oid, n numeric,
                                 f float8, r real, b boolean, j jsonb, js json, u uuid, tx text, a int[]);",
        )
        .await
        .unwrap();
    pgpubsub::watch::watch_wal(&client, "typed", None).await.unwrap();
    let mut listener = WalListener::connect(&config, WalOptions::default()).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO typed VALUES (1, '2026-11-30 09:17:56.629682+00', '2026-11-30 09:17:56', '2026-01-02', 42,
                 123.4500, 0.1, 1.5, true, '{\"k\": [1, \"x\"]}', '{\"a\":1}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
                 'é \"q\" \\n', '{1,2}')",
        )
        .await
        .unwrap();
    let e = next(&mut listener).await;
    let ours = value(&e)["new"].clone();
    let theirs: serde_json::Value = {
        let c = pgpubsub::db::connect(&config).await.unwrap();
        c.batch_execute("SET timezone = 'UTC'").await.unwrap();
        let text: String = c.query_one("SELECT row_to_json(x)::text FROM typed x", &[]).await.unwrap().get(0);
        serde_json::from_str(&text).unwrap()
    };
    for (k, v) in theirs.as_object().unwrap() {
        if k == "a" {
            // Arrays come as their text (documented).
            assert_eq!(ours[k], "{1,2}");
            continue;
        }
        assert_eq!(&ours[k], v, "column {k}: ours {} vs row_to_json {v}", ours[k]);
    }
}

#[tokio::test]
async fn a_cut_stream_or_a_failed_check_loses_and_repeats_nothing_inside_transactions() {
    let (_cluster, config, client) = logical().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "t", None).await.unwrap();
    let mut listener = WalListener::connect(&config, WalOptions::new(Some("cut".into()), vec![])).await.unwrap();
    // Twenty transactions of fifty rows each.
    for t in 0..20 {
        client
            .execute("INSERT INTO t SELECT g FROM generate_series($1::int, $1::int + 49) g", &[&(t * 50)])
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    while ids.len() < 1000 {
        let e = next(&mut listener).await;
        ids.push(value(&e)["new"]["id"].as_i64().unwrap());
        if ids.len() == 125 {
            // In the middle of the third transaction: the server ends the stream.
            client
                .execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'pgpubsub_cut'", &[])
                .await
                .unwrap();
        }
    }
    // The cut is noticed once what the server had sent is read: by now.
    for t in 20..25 {
        client
            .execute("INSERT INTO t SELECT g FROM generate_series($1::int, $1::int + 49) g", &[&(t * 50)])
            .await
            .unwrap();
    }
    while ids.len() < 1250 {
        ids.push(value(&next(&mut listener).await)["new"]["id"].as_i64().unwrap());
    }
    assert_eq!(listener.stats().snapshot().reconnects, 1);

    // The reader's ordinary connection goes: its next privilege check (the
    // last is a second old) fails, and the stream starts again from the slot.
    let killed = client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(killed, 1, "the reader's connection");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for t in 25..30 {
        client
            .execute("INSERT INTO t SELECT g FROM generate_series($1::int, $1::int + 49) g", &[&(t * 50)])
            .await
            .unwrap();
    }
    while ids.len() < 1500 {
        ids.push(value(&next(&mut listener).await)["new"]["id"].as_i64().unwrap());
    }
    assert_eq!(ids, (0..1500).collect::<Vec<i64>>());
    assert!(listener.stats().snapshot().reconnects >= 2, "{:?}", listener.stats().snapshot());
    nothing(&mut listener, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn watch_wal_refuses_what_would_break_writers_and_follows_partitions() {
    let (_cluster, config, client) = logical().await;
    client
        .batch_execute(
            "CREATE TABLE nopk (v int); CREATE TABLE full_identity (v int); ALTER TABLE full_identity REPLICA IDENTITY FULL;
             CREATE TABLE parted (id int PRIMARY KEY, region text) PARTITION BY RANGE (id);
             CREATE TABLE parted_a PARTITION OF parted FOR VALUES FROM (0) TO (100);
             CREATE TABLE parted_b PARTITION OF parted FOR VALUES FROM (100) TO (200);
             CREATE TABLE gone (id int PRIMARY KEY);",
        )
        .await
        .unwrap();
    let e = pgpubsub::watch::watch_wal(&client, "nopk", None).await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("55000"), "{e}");
    assert!(e.to_string().contains("replica identity"), "{e}");
    client.batch_execute("UPDATE nopk SET v = 2").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "full_identity", None).await.unwrap();
    pgpubsub::watch::watch_wal(&client, "parted", None).await.unwrap();
    pgpubsub::watch::watch_wal(&client, "gone", None).await.unwrap();
    let mut listener = WalListener::connect(&config, WalOptions::default()).await.unwrap();
    // A table dropped before its change is read: nobody may read it, no panic.
    client.batch_execute("INSERT INTO gone VALUES (1); DROP TABLE gone;").await.unwrap();
    client
        .batch_execute(
            "INSERT INTO parted VALUES (5, 'a'), (150, 'b'); INSERT INTO full_identity VALUES (1);
             UPDATE full_identity SET v = 2;",
        )
        .await
        .unwrap();
    let got: Vec<serde_json::Value> =
        [next(&mut listener).await, next(&mut listener).await].iter().map(value).collect();
    assert_eq!((got[0]["table"].as_str(), got[1]["table"].as_str()), (Some("parted"), Some("parted")));
    assert_eq!((got[0]["new"]["id"].as_i64(), got[1]["new"]["id"].as_i64()), (Some(5), Some(150)));
    let insert = next(&mut listener).await;
    let update = next(&mut listener).await;
    assert_eq!(value(&insert)["new"], serde_json::json!({"v": 1}));
    // REPLICA IDENTITY FULL: the whole old row.
    assert_eq!(
        (value(&update)["old"].clone(), value(&update)["new"].clone()),
        (serde_json::json!({"v": 1}), serde_json::json!({"v": 2}))
    );
    nothing(&mut listener, Duration::from_millis(300)).await;
}
