//! Capture from the WAL into the log (`pubsub.watch_wal`, `pubsub.wal_messages`,
//! the `Capturer`), on a cluster of the test's own with wal_level = logical.
//! Readers read the log: `Listener`, as any reader, with no REPLICATION.

use std::time::Duration;

use pgpubsub::db::Config;
use pgpubsub::{Body, CaptureOptions, Capturer, Channel, Event, ListenerOptions, Op};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::cluster::Cluster;
use crate::common::{captured_once_in_order as log_of, next, unique, wal_fence as fence, write_rows, WAIT};

/// A cluster that can decode, and a migrated database in it.
async fn logical() -> (Cluster, Config, Client) {
    crate::common::init_logs();
    migrated(tokio::task::spawn_blocking(Cluster::logical).await.unwrap()).await
}

/// As [`logical`], with more settings in postgresql.conf.
async fn logical_with(settings: &'static str) -> (Cluster, Config, Client) {
    crate::common::init_logs();
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start_with(false, |data| {
            use std::io::Write;
            let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
            writeln!(conf, "wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\n{settings}")
                .unwrap();
        })
    })
    .await
    .unwrap();
    migrated(cluster).await
}

async fn migrated(cluster: Cluster) -> (Cluster, Config, Client) {
    let admin = pgpubsub::db::connect(&cluster.url("postgres").parse().unwrap()).await.unwrap();
    admin.batch_execute("CREATE DATABASE t").await.unwrap();
    let config: Config = cluster.url("t").parse().unwrap();
    let mut client = pgpubsub::db::connect(&config).await.unwrap();
    pgpubsub::migrate::up(&mut client, false).await.unwrap();
    (cluster, config, client)
}

/// A capturer running in this process, as `pgpubsub capture` runs it.
struct Running {
    task: JoinHandle<pgpubsub::Result<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stats: std::sync::Arc<pgpubsub::capture::CaptureStats>,
}

fn start(config: &Config, options: CaptureOptions) -> Running {
    let capturer = Capturer::new(config, options).unwrap();
    let stats = capturer.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(capturer.run(async move {
        let _ = stopped.await;
    }));
    Running { task, stop: Some(stop), stats }
}

impl Running {
    /// Killed, not stopped: nothing is finished, its connections just go.
    fn kill(self) {
        self.task.abort();
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(WAIT, self.task).await.expect("stops in time").unwrap().unwrap();
    }

    /// Waits until it streams the slot.
    async fn active(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.stats.snapshot().active == 0 {
            assert!(!self.task.is_finished(), "the capturer ended");
            assert!(tokio::time::Instant::now() < deadline, "never became active");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn value(e: &Event) -> serde_json::Value {
    serde_json::from_str(e.json()).unwrap()
}

/// The table the writers fill, watched through the WAL on a channel of its own.
async fn wal_table(client: &Client) -> Channel {
    client.batch_execute("CREATE TABLE w (writer int, n int, pad text, PRIMARY KEY (writer, n))").await.unwrap();
    let ch = Channel::new(unique("capw")).unwrap();
    pgpubsub::watch::watch_wal(client, "w", Some(&ch)).await.unwrap();
    ch
}

#[tokio::test]
async fn captured_events_are_typed_complete_in_commit_order_and_keep_their_source() {
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
    let logged = pgpubsub::watch(&client, "logged", None).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    // Any reader of the log: no REPLICATION, no slot.
    let mut listener = pgpubsub::Listener::connect(
        &config,
        &[orders.clone(), news.clone(), logged.clone()],
        ListenerOptions::default(),
    )
    .await
    .unwrap();

    let big = "é\"x\n".repeat(300_000);
    let mut tx_client = pgpubsub::db::connect(&config).await.unwrap();
    let tx = tx_client.transaction().await.unwrap();
    tx.execute("INSERT INTO orders VALUES (1, 'a \"quoted\" ☃', 2, true, '{\"k\": [1, 2]}', 12.50, NULL)", &[])
        .await
        .unwrap();
    tx.execute("INSERT INTO orders VALUES (2, 'b', NULL, false, NULL, 'NaN', $1)", &[&big]).await.unwrap();
    let writer: i64 = tx.query_one("SELECT pg_current_xact_id()::text::bigint", &[]).await.unwrap().get(0);
    tx.commit().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO logged VALUES (1);
             UPDATE orders SET qty = 3 WHERE id = 1;
             UPDATE orders SET qty = 4 WHERE id = 2;
             DELETE FROM orders WHERE id = 1;
             TRUNCATE orders;",
        )
        .await
        .unwrap();
    pgpubsub::watch::publish_wal(&client, &news, &big).await.unwrap();

    let mut events = Vec::new();
    for _ in 0..8 {
        events.push(next(&mut listener).await);
    }
    // The two ways in share one log: the trigger-captured row is in it as
    // soon as its transaction commits; the capturer appends a moment after
    // the commit. Order is per channel (commit order), as always.
    let on = |ch: &str| events.iter().filter(|e| e.channel == ch).count();
    assert_eq!((on(orders.as_str()), on(logged.as_str()), on("news")), (6, 1, 1));
    let logged_at = events.iter().position(|e| e.channel == logged.as_str()).unwrap();
    let events: Vec<Event> = events.into_iter().enumerate().filter(|(i, _)| *i != logged_at).map(|(_, e)| e).collect();
    let v: Vec<serde_json::Value> = events.iter().map(value).collect();
    let wal: Vec<&Event> = events.iter().collect();
    for e in &wal {
        assert!(e.seq.is_some() && e.wal.is_some() && e.source_txid.is_some(), "{}", e.json());
        assert!(!e.json().contains('\n'));
    }
    // One transaction: the same source, lsn, and indexes 0 and 1.
    assert_eq!((events[0].source_txid, events[1].source_txid), (Some(writer as u64), Some(writer as u64)));
    assert_eq!((events[0].wal.unwrap().index, events[1].wal.unwrap().index), (0, 1));
    assert_eq!(events[0].wal.unwrap().lsn, events[1].wal.unwrap().lsn);
    assert_ne!(events[0].txid, events[0].source_txid, "txid is the log row's: the capturer's transaction");
    let lsns: Vec<u64> = wal.iter().map(|e| e.wal.unwrap().lsn).collect();
    assert!(lsns.windows(2).all(|w| w[0] <= w[1]), "commit order: {lsns:?}");
    let seqs: Vec<i64> = wal.iter().map(|e| e.seq.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    let c = events[0].change().unwrap();
    assert_eq!((c.op, c.schema.as_str(), c.table.as_str()), (Op::Insert, "public", "orders"));
    assert_eq!(
        v[0]["new"],
        serde_json::json!({"id": 1, "item": "a \"quoted\" ☃", "qty": 2, "ok": true, "doc": {"k": [1, 2]}, "price": 12.50, "big": null})
    );
    assert_eq!(v[0]["key"], serde_json::json!({"id": 1}));
    assert_eq!(v[1]["new"]["price"], "NaN");
    assert_eq!(v[1]["new"]["big"].as_str().unwrap(), big, "a large (TOASTed) value arrives whole");
    // The commit time, in the log's time format.
    assert!(events[0].time.as_deref().is_some_and(|t| t.ends_with('Z') && t.len() == 27), "{:?}", events[0].time);
    // An update that leaves a TOASTed value alone: without REPLICA IDENTITY
    // FULL the value is not in the WAL, so it is left out, never made up.
    assert_eq!((v[2]["op"].as_str(), &v[2]["new"]["qty"]), (Some("UPDATE"), &serde_json::json!(3)));
    assert!(v[3]["new"].get("big").is_none(), "{}", v[3]["new"]);
    assert_eq!((v[4]["op"].as_str(), &v[4]["old"]), (Some("DELETE"), &serde_json::json!({"id": 1})));
    assert_eq!((v[5]["op"].as_str(), &v[5]["key"]), (Some("TRUNCATE"), &serde_json::Value::Null));
    // A large message is kept apart in the log and arrives byte for byte.
    let Body::Message(m) = &events[6].body else { panic!("{}", &events[6].json()[..200]) };
    assert!(m.payload == big);
    let apart: bool = client
        .query_one("SELECT payload IS NOT NULL FROM pubsub.events WHERE seq = $1", &[&events[6].seq.unwrap()])
        .await
        .unwrap()
        .get(0);
    assert!(apart);
    capture.stop().await;
}

/// Kills the capturer three times while writers commit single-row and
/// multi-row transactions: every change is in the log once, in commit order.
#[tokio::test]
async fn a_capturer_killed_at_any_moment_appends_every_change_exactly_once() {
    let (_cluster, config, client) = logical().await;
    let ch = wal_table(&client).await;
    let news = Channel::new(unique("fence")).unwrap();
    let small_batches = || {
        let mut o = CaptureOptions::default();
        // Small batches: a kill lands between appends as well as inside one.
        o.batch_rows = 37;
        o
    };
    let mut capture = start(&config, small_batches());
    capture.active().await;
    let writers: Vec<_> = [(0, 1), (1, 1), (2, 25), (3, 40)]
        .into_iter()
        .map(|(id, batch)| tokio::spawn(write_rows(config.clone(), id, 1500, batch, Duration::ZERO, (0, 0))))
        .collect();
    for pause in [150, 40, 400] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        capture.kill();
        tokio::time::sleep(Duration::from_millis(pause / 2)).await;
        capture = start(&config, small_batches());
    }
    for w in writers {
        w.await.unwrap();
    }
    fence(&client, &news, "done").await;
    let (rows, distinct, ordered) = log_of(&client, &ch).await;
    assert_eq!((rows, distinct, ordered), (6000, 6000, true));
    capture.stop().await;
}

#[tokio::test]
async fn a_postgres_restart_loses_and_repeats_nothing() {
    let (cluster, config, client) = logical().await;
    let ch = wal_table(&client).await;
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    let writer = tokio::spawn(write_rows(config.clone(), 0, 3000, 10, Duration::from_millis(1), (0, 0)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::spawn_blocking(move || {
        cluster.restart("immediate");
        cluster
    })
    .await
    .map(|cluster| {
        // Kept alive to the end of the test.
        std::mem::forget(cluster);
    })
    .unwrap();
    writer.await.unwrap();
    let client = pgpubsub::db::connect(&config).await.unwrap();
    fence(&client, &Channel::new(unique("fence")).unwrap(), "after restart").await;
    assert_eq!(log_of(&client, &ch).await, (3000, 3000, true));
    assert!(capture.stats.snapshot().reconnects >= 1);
    capture.stop().await;
}

#[tokio::test]
async fn a_standby_takes_over_when_the_active_capturer_dies() {
    let (_cluster, config, client) = logical().await;
    let ch = wal_table(&client).await;
    let first = start(&config, CaptureOptions::default());
    first.active().await;
    let mut options = CaptureOptions::default();
    options.standby_poll = Duration::from_millis(500);
    let second = start(&config, options);
    let writer = tokio::spawn(write_rows(config.clone(), 0, 2000, 1, Duration::from_millis(1), (0, 0)));
    // The second stands by while the first streams.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((first.stats.snapshot().active, second.stats.snapshot().active), (1, 0));
    first.kill();
    let died = tokio::time::Instant::now();
    second.active().await;
    let took = died.elapsed();
    assert!(took < Duration::from_secs(3), "took over after {took:?}");
    writer.await.unwrap();
    fence(&client, &Channel::new(unique("fence")).unwrap(), "taken over").await;
    assert_eq!(log_of(&client, &ch).await, (2000, 2000, true));
    second.stop().await;
}

/// Watch changes made while no capturer runs are applied in WAL order when
/// it catches up: each change goes to the channel its table had then.
#[tokio::test]
async fn a_changed_channel_takes_effect_in_wal_order_even_when_read_later() {
    let (_cluster, config, client) = logical().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let (a, b) = (Channel::new("chan_a").unwrap(), Channel::new("chan_b").unwrap());
    pgpubsub::watch::watch_wal(&client, "t", Some(&a)).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    client.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    fence(&client, &a, "one in").await;
    capture.stop().await;
    // While it is down: a new channel, then none.
    client.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "t", Some(&b)).await.unwrap();
    client.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    pgpubsub::unwatch(&client, "t").await.unwrap();
    client.batch_execute("INSERT INTO t VALUES (4)").await.unwrap();
    // Watched again, on the other channel: the map stored with the first
    // run's position, not today's, must decide rows 2 and 3.
    pgpubsub::watch::watch_wal(&client, "t", Some(&b)).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    client.batch_execute("INSERT INTO t VALUES (5)").await.unwrap();
    fence(&client, &a, "all in").await;
    let rows = client
        .query(
            "SELECT channel, (body::json->'new'->>'id')::int FROM pubsub.events
             WHERE body::json->>'kind' = 'change' ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want = [("chan_a", 1), ("chan_a", 2), ("chan_b", 3), ("chan_b", 5)];
    assert_eq!(got, want.map(|(c, i)| (c.to_string(), i)));
    capture.stop().await;
}

#[tokio::test]
async fn a_role_without_select_reads_none_of_a_tables_captured_events() {
    let (_cluster, config, client) = logical().await;
    let reader = unique("log_reader");
    client
        .batch_execute(&format!(
            "CREATE TABLE open (id int PRIMARY KEY); CREATE TABLE secret (id int PRIMARY KEY, card text);
             CREATE ROLE {reader} LOGIN; GRANT USAGE ON SCHEMA pubsub TO {reader};
             GRANT SELECT ON pubsub.events, pubsub.retention TO {reader}; GRANT SELECT ON open TO {reader};"
        ))
        .await
        .unwrap();
    let open = pgpubsub::watch::watch_wal(&client, "open", None).await.unwrap();
    let secret = pgpubsub::watch::watch_wal(&client, "secret", None).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    let mut as_reader = config.clone();
    as_reader.pg_mut().user(&reader);
    let mut listener =
        pgpubsub::Listener::connect(&as_reader, &[open.clone(), secret.clone()], ListenerOptions::default())
            .await
            .unwrap();
    client
        .batch_execute(
            "INSERT INTO open VALUES (1); INSERT INTO secret VALUES (1, '4111 1111 1111 1111'); INSERT INTO open VALUES (2);",
        )
        .await
        .unwrap();
    // The fence: open's second row comes right after its first.
    let (one, two) = (next(&mut listener).await, next(&mut listener).await);
    assert_eq!((one.channel.as_str(), two.channel.as_str()), (open.as_str(), open.as_str()));
    assert_eq!((value(&one)["new"]["id"].as_i64(), value(&two)["new"]["id"].as_i64()), (Some(1), Some(2)));
    // It is in the log, for those who may read it.
    let n: i64 = client
        .query_one("SELECT count(*) FROM pubsub.events WHERE channel = $1", &[&secret.as_str()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    capture.stop().await;
}

#[tokio::test]
async fn without_logical_wal_level_the_capturer_says_what_to_set() {
    // The shared server runs with the default wal_level (replica).
    let db = crate::common::TestDb::new().await;
    let c = db.client().await;
    let level: String = c.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    if level == "logical" {
        eprintln!("skipped: the shared server already decodes");
        return;
    }
    let e = Capturer::new(&db.config, CaptureOptions::default()).unwrap().run(std::future::pending()).await;
    let e = e.expect_err("captured without wal_level = logical");
    assert!(e.to_string().contains("wal_level = logical"), "{e}");
    // Names that are not slot names are refused.
    let bad = Capturer::new(&db.config, CaptureOptions::named(Some("Bad Name".into())));
    assert!(matches!(bad, Err(pgpubsub::Error::Config(_))));
}

/// The server invalidates a slot that kept too much WAL: the capturer says
/// so, makes a new one, and readers find a `resync` in the log where the gap is.
#[tokio::test]
async fn an_invalidated_slot_is_recreated_and_the_gap_is_a_resync_in_the_log() {
    let (_cluster, config, client) =
        logical_with("max_slot_wal_keep_size = 1MB\nmin_wal_size = 32MB\nmax_wal_size = 32MB").await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY, pad text)").await.unwrap();
    let ch = pgpubsub::watch::watch_wal(&client, "t", None).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    client.batch_execute("INSERT INTO t VALUES (1, '')").await.unwrap();
    fence(&client, &ch, "before").await;
    capture.stop().await;
    // While no capturer runs, the WAL moves on past what the slot may keep.
    for i in 0..6 {
        client
            .execute(
                "INSERT INTO t SELECT g, repeat('x', 1000) FROM generate_series($1::int, $1::int + 19999) g",
                &[&(i * 20_000 + 10)],
            )
            .await
            .unwrap();
        client.batch_execute("SELECT pg_switch_wal(); CHECKPOINT;").await.unwrap();
    }
    let lost: String = client
        .query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pgpubsub_capture'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lost, "lost");
    let mut listener = pgpubsub::Listener::connect(&config, &[ch.clone()], ListenerOptions::default()).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    client.batch_execute("INSERT INTO t VALUES (0, 'after')").await.unwrap();
    let resync = next(&mut listener).await;
    let Body::Resync(r) = &resync.body else { panic!("{}", resync.json()) };
    assert!(r.reason.contains("invalidated"), "{}", r.reason);
    let after = next(&mut listener).await;
    assert_eq!(value(&after)["new"]["pad"], "after");
    assert_eq!(capture.stats.snapshot().resets, 1);
    capture.stop().await;
}

/// Every value as `row_to_json` gives it: scalars, arrays (nested),
/// composites, domains and enums; timestamps in ISO 8601 whatever the
/// session's time zone.
#[tokio::test]
async fn rows_are_typed_as_row_to_json_types_them() {
    let (_cluster, config, client) = logical().await;
    client
        .batch_execute(
            "SET timezone = 'Asia/Kolkata';
             CREATE DOMAIN price AS numeric(10, 2);
             CREATE TYPE mood AS ENUM ('ok', 'great');
             CREATE TYPE item AS (name text, qty int, price price, tags text[]);
             CREATE TABLE typed (id int PRIMARY KEY, ts timestamptz, t timestamp, d date, o oid, n numeric,
                                 f float8, r real, b boolean, j jsonb, js json, u uuid, tx text, a int[],
                                 grid int[][], words text[], p price, m mood, it item, items item[],
                                 docs jsonb[], stamps timestamptz[], empty int[], nulls text[]);",
        )
        .await
        .unwrap();
    let ch = pgpubsub::watch::watch_wal(&client, "typed", None).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    let mut listener = pgpubsub::Listener::connect(&config, &[ch], ListenerOptions::default()).await.unwrap();
    client
        .batch_execute(
            r#"INSERT INTO typed VALUES (1, '2026-11-30 09:17:56.629682+00', '2026-11-30 09:17:56', '2026-01-02', 42,
                 123.4500, 0.1, 1.5, true, '{"k": [1, "x"]}', '{"a":1}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
                 'é "q" \n', '{1,2}', '{{1,2},{3,NULL}}', '{"a b","q\"x",NULL,"NULL",""}', 12.5, 'great',
                 ROW('tea, "green"', 2, 3.10, '{x,y}'), ARRAY[ROW('a', 1, 1, '{}')::item, ROW(NULL, NULL, NULL, NULL)::item],
                 ARRAY['{"z": 1}'::jsonb, 'null'::jsonb], ARRAY['2026-01-01 00:00:00+05:30'::timestamptz], '{}', '{NULL}')"#,
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
        assert_eq!(&ours[k], v, "column {k}: ours {} vs row_to_json {v}", ours[k]);
    }
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&ours), keys(&theirs), "the same columns, in the same order");
    capture.stop().await;
}

/// The capturer runs as a role with only what docs/deploying.md grants it
/// (REPLICATION and EXECUTE on the capture functions), not as a superuser;
/// without the grants it is refused clearly.
#[tokio::test]
async fn the_capturer_needs_only_its_documented_grants() {
    let (_cluster, config, client) = logical().await;
    let role = unique("capturer");
    client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION;
             CREATE TABLE orders (id int PRIMARY KEY, item text);"
        ))
        .await
        .unwrap();
    let ch = pgpubsub::watch::watch_wal(&client, "orders", None).await.unwrap();
    let mut as_role = config.clone();
    as_role.pg_mut().user(&role);
    // No grants yet: refused, and it says so.
    let refused = Capturer::new(&as_role, CaptureOptions::default()).unwrap().run(std::future::pending()).await;
    let e = refused.expect_err("captured without EXECUTE on the capture functions");
    assert!(matches!(e, pgpubsub::Error::Db { .. } | pgpubsub::Error::NotMigrated), "{e}");
    client
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA pubsub TO {role};
             GRANT EXECUTE ON FUNCTION pubsub.capture_state(text),
                 pubsub.capture_append(text, pg_lsn[], integer[], bigint[], text[], oid[], text[], text[], jsonb, pg_lsn, integer),
                 pubsub.capture_reset(text, text) TO {role};"
        ))
        .await
        .unwrap();
    let capture = start(&as_role, CaptureOptions::default());
    capture.active().await;
    let mut listener = pgpubsub::Listener::connect(&config, &[ch], ListenerOptions::default()).await.unwrap();
    client.batch_execute("INSERT INTO orders VALUES (1, 'tea')").await.unwrap();
    assert_eq!(value(&next(&mut listener).await)["new"]["item"], "tea");
    let superuser: bool =
        client.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role]).await.unwrap().get(0);
    assert!(!superuser);
    capture.stop().await;
}

/// A slot that went missing while no capturer ran (dropped by hand, lost in
/// a failover) is created again, and the gap is a resync in the log, never
/// a silent one.
#[tokio::test]
async fn a_missing_slot_is_created_again_and_the_gap_is_a_resync() {
    let (_cluster, config, client) = logical().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let ch = pgpubsub::watch::watch_wal(&client, "t", None).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    client.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    fence(&client, &ch, "one in").await;
    capture.stop().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.query_one("SELECT pg_drop_replication_slot('pgpubsub_capture')", &[]).await.is_err() {
        // Let go by the server a moment after the stream ends.
        assert!(tokio::time::Instant::now() < deadline, "the slot stayed in use");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let mut listener = pgpubsub::Listener::connect(&config, &[ch.clone()], ListenerOptions::default()).await.unwrap();
    let capture = start(&config, CaptureOptions::default());
    capture.active().await;
    client.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    let resync = next(&mut listener).await;
    let Body::Resync(r) = &resync.body else { panic!("{}", resync.json()) };
    assert!(r.reason.contains("missing"), "{}", r.reason);
    assert_eq!(value(&next(&mut listener).await)["new"]["id"], 3);
    assert_eq!(capture.stats.snapshot().resets, 1);
    capture.stop().await;
}

/// Slots are per cluster: a second database's capturer under the same name
/// is refused clearly (and touches nothing of the first's); with a name of
/// its own it captures.
#[tokio::test]
async fn a_slot_of_another_database_is_refused_clearly() {
    let (cluster, config, client) = logical().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "t", None).await.unwrap();
    let first = start(&config, CaptureOptions::default());
    first.active().await;
    let admin = pgpubsub::db::connect(&cluster.url("postgres").parse().unwrap()).await.unwrap();
    admin.batch_execute("CREATE DATABASE other").await.unwrap();
    let other: Config = cluster.url("other").parse().unwrap();
    let mut c = pgpubsub::db::connect(&other).await.unwrap();
    pgpubsub::migrate::up(&mut c, false).await.unwrap();
    first.stop().await;
    let refused = Capturer::new(&other, CaptureOptions::default()).unwrap().run(std::future::pending()).await;
    let e = refused.expect_err("a slot of another database was used");
    assert!(e.to_string().contains("belongs to database"), "{e}");
    let named = start(&other, CaptureOptions::named(Some("other".into())));
    named.active().await;
    named.stop().await;
    // The first database's slot is untouched.
    let kept: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgpubsub_capture'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1);
}
