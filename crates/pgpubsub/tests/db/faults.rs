//! Nothing committed is lost: concurrent writers tag every row (writer,
//! counter); faults are injected while they write; a checker compares what
//! arrived with what the table holds. Lost and unexpected must be zero.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgpubsub::db::Config;
use pgpubsub::{ConnectionState, Error, Listener, ListenerOptions};

use crate::cluster::Cluster;
use crate::common::{self, next, TestDb};
use crate::proxy::Proxy;

/// What the checker found.
#[derive(Debug, Default)]
struct Report {
    expected: usize,
    received: usize,
    lost: Vec<(i32, i32)>,
    unexpected: Vec<(i32, i32)>,
    duplicates: usize,
    out_of_order: usize,
}

/// Receives while `writers` run, then until everything the table holds has
/// arrived (or the wait runs out), and compares.
async fn check(
    listener: &mut Listener,
    config: &Config,
    writers: Vec<tokio::task::JoinHandle<()>>,
    hold: Option<Duration>,
) -> Report {
    let mut seen: BTreeMap<(i32, i32), usize> = BTreeMap::new();
    let mut last: BTreeMap<i32, i32> = BTreeMap::new();
    let mut report = Report::default();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    tokio::spawn(async move {
        for w in writers {
            w.await.unwrap();
        }
        flag.store(true, Ordering::SeqCst);
    });
    if let Some(stall) = hold {
        // A stalled consumer: reads nothing while the writers go on.
        while !done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(stall).await;
    }
    let mut expected: Option<BTreeSet<(i32, i32)>> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if expected.is_none() && done.load(Ordering::SeqCst) {
            let client = pgpubsub::db::connect(config).await.unwrap();
            let rows = client.query("SELECT writer, n FROM w", &[]).await.unwrap();
            expected = Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect());
        }
        if let Some(e) = &expected {
            if e.iter().all(|k| seen.contains_key(k)) {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            break;
        }
        let item = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
        let event = match item {
            Err(_) => continue,
            Ok(Some(Ok(e))) => e,
            Ok(Some(Err(e))) => panic!("listener error: {e}"),
            Ok(None) => panic!("listener ended"),
        };
        #[derive(serde::Deserialize)]
        struct Row {
            writer: i32,
            n: i32,
        }
        let row: Row = event.change().unwrap().new_as().unwrap().unwrap();
        let key = (row.writer, row.n);
        report.received += 1;
        let count = seen.entry(key).or_default();
        *count += 1;
        if *count > 1 {
            report.duplicates += 1;
            continue;
        }
        if last.get(&row.writer).is_some_and(|&prev| prev > row.n) {
            report.out_of_order += 1;
        }
        last.insert(row.writer, row.n);
    }
    let expected = expected.unwrap_or_default();
    report.expected = expected.len();
    report.lost = expected.iter().filter(|k| !seen.contains_key(k)).copied().collect();
    report.unexpected = seen.keys().filter(|k| !expected.contains(k)).copied().collect();
    report
}

fn assert_complete(r: &Report) {
    assert!(r.expected > 0, "{r:?}");
    assert!(r.lost.is_empty(), "lost {} of {}: {:?}", r.lost.len(), r.expected, &r.lost[..r.lost.len().min(20)]);
    assert!(r.unexpected.is_empty(), "unexpected: {:?}", r.unexpected);
    assert_eq!(r.out_of_order, 0, "{r:?}");
}

fn fast_heartbeat() -> ListenerOptions {
    ListenerOptions::default().heartbeat(Duration::from_millis(200), Duration::from_secs(2))
}

/// Terminates the listening backends of `db` (the session whose last
/// statement was LISTEN); returns how many.
async fn kill_listeners(db: &str) -> i64 {
    let admin = pgpubsub::db::connect(&common::admin_url().parse().unwrap()).await.unwrap();
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN %'",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

fn spawn_writers(
    config: &Config,
    writers: i32,
    rows: i32,
    pause: Duration,
    big_every: i32,
) -> Vec<tokio::task::JoinHandle<()>> {
    // One row per transaction; every big_every-th large enough to travel in chunks.
    let big = (big_every, 30_000);
    (0..writers).map(|id| tokio::spawn(common::write_rows(config.clone(), id, rows, 1, pause, big))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_backend_terminated_once() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "w").await;
    let mut l = db.listen_with(&[ch], fast_heartbeat()).await;
    let writers = spawn_writers(&db.config, 3, 300, Duration::from_millis(2), 10);
    let name = db.name.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(kill_listeners(&name).await, 1);
    });
    let r = check(&mut l, &db.config, writers, None).await;
    assert_complete(&r);
    let s = l.stats().snapshot();
    assert!(s.reconnects >= 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_backend_terminated_every_2s_for_20s() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "w").await;
    let mut l = db.listen_with(&[ch], fast_heartbeat()).await;
    // ~20 s of writing: 3 writers, 1,000 rows each, 20 ms apart; every 10th
    // row is chunked, so disconnects also cut chunk sequences.
    let writers = spawn_writers(&db.config, 3, 1000, Duration::from_millis(20), 10);
    let name = db.name.clone();
    let killer = tokio::spawn(async move {
        let mut kills = 0;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            kills += kill_listeners(&name).await;
        }
        kills
    });
    let r = check(&mut l, &db.config, writers, None).await;
    assert_complete(&r);
    let kills = killer.await.unwrap();
    assert!(kills >= 8, "only {kills} kills");
    assert!(l.stats().snapshot().reconnects >= 8, "{:?}", l.stats().snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_network_cut_is_detected_and_nothing_lost() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "w").await;
    let proxy = Proxy::start("127.0.0.1:5432".into()).await;
    let via = proxy.config(&db.name);
    let mut l = Listener::connect(&via, &[ch], fast_heartbeat()).await.unwrap();
    // Every state the connection goes through, in order.
    let mut state = l.state();
    let seen = tokio::spawn(async move {
        let mut seen = vec![state.borrow_and_update().clone()];
        while state.changed().await.is_ok() {
            let now = state.borrow_and_update().clone();
            let back = now == ConnectionState::Listening && seen.len() > 1;
            seen.push(now);
            if back {
                break;
            }
        }
        seen
    });
    let writers = spawn_writers(&db.config, 2, 300, Duration::from_millis(5), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    let r = check(&mut l, &db.config, writers, None).await;
    assert_complete(&r);
    assert!(l.stats().snapshot().reconnects >= 1, "{:?}", l.stats().snapshot());
    // The state went through Reconnecting and back.
    let seen = tokio::time::timeout(common::WAIT, seen).await.unwrap().unwrap();
    assert!(seen.iter().any(|s| matches!(s, ConnectionState::Reconnecting { .. })), "{seen:?}");
    assert_eq!(seen.last(), Some(&ConnectionState::Listening), "{seen:?}");
}

#[tokio::test]
async fn a_pooler_that_drops_notifications_fails_fast() {
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432".into()).await;
    proxy.swallow_notifications(true);
    let via = proxy.config(&db.name);
    let opts = ListenerOptions::default().heartbeat(Duration::from_millis(200), Duration::from_secs(1));
    let err = Listener::connect(&via, &[common::channel("pool")], opts).await.unwrap_err();
    assert!(matches!(err, Error::NotifyUnavailable(_)), "{err}");
    assert!(err.to_string().contains("transaction pooler"), "{err}");
}

/// The race a `seq > last` cursor gets wrong: A takes seq s1, B takes s2 >
/// s1 and commits, the listener sees s2, loses its connection, A commits
/// while it is away. Catch-up must still deliver A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_of_an_earlier_seq_is_not_skipped() {
    let db = TestDb::new().await;
    let ch = common::channel("race");
    let proxy = Proxy::start("127.0.0.1:5432".into()).await;
    let via = proxy.config(&db.name);
    let mut l = Listener::connect(&via, &[ch.clone()], fast_heartbeat()).await.unwrap();

    let mut a = db.client().await;
    let b = db.client().await;
    let tx = a.transaction().await.unwrap();
    let s1: i64 = tx.query_one("SELECT pubsub.publish($1, 'A')", &[&ch.as_str()]).await.unwrap().get(0);
    let s2 = pgpubsub::publish(&b, &ch, "B").await.unwrap();
    assert!(s1 < s2);
    let got = next(&mut l).await;
    assert_eq!((got.seq, got.message().unwrap().payload.as_str()), (Some(s2), "B"));
    // Let a few heartbeats pass: the cursor must not move past A's txid.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(l.cursor().txid <= got.txid.unwrap(), "cursor {} passed an open transaction", l.cursor());

    // Cut the listener off, and keep it off while A commits.
    proxy.refuse(true);
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    tx.commit().await.unwrap();
    proxy.refuse(false);

    let got = next(&mut l).await;
    assert_eq!((got.seq, got.message().unwrap().payload.as_str()), (Some(s1), "A"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_consumer_loses_nothing_and_never_blocks_writers() {
    let db = TestDb::new().await;
    let ch = common::workload_table(&db.config, "w").await;
    let mut l = db.listen_with(&[ch], fast_heartbeat()).await;
    let writers = spawn_writers(&db.config, 2, 1000, Duration::ZERO, 50);
    let r = check(&mut l, &db.config, writers, Some(Duration::from_millis(500))).await;
    assert_complete(&r);
    // Nothing queued for it meanwhile: its next reads were just larger.
    let s = l.stats().snapshot();
    assert!(s.polls > 0 && s.foreign_dropped == 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_listener_resumes_after_a_restart() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("durable");
    let name = common::unique("svc");
    let mut l = db.listen_with(&[ch.clone()], fast_heartbeat().name(name.clone())).await;
    for i in 0..5 {
        pgpubsub::publish(&client, &ch, &format!("before {i}")).await.unwrap();
    }
    for i in 0..5 {
        assert_eq!(next(&mut l).await.message().unwrap().payload, format!("before {i}"));
    }
    l.close().await.unwrap();
    // While it is down.
    for i in 0..5 {
        pgpubsub::publish(&client, &ch, &format!("while down {i}")).await.unwrap();
    }
    let mut l = db.listen_with(&[ch.clone()], fast_heartbeat().name(name.clone())).await;
    pgpubsub::publish(&client, &ch, "after").await.unwrap();
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("after") {
        got.push(next(&mut l).await.message().unwrap().payload.clone());
    }
    // At least once: anything from before may repeat, nothing may be missing.
    let after_restart: Vec<&String> = got.iter().filter(|p| !p.starts_with("before")).collect();
    let want: Vec<String> = (0..5).map(|i| format!("while down {i}")).chain(["after".to_string()]).collect();
    assert_eq!(after_restart, want.iter().collect::<Vec<_>>());
    let stored: i64 =
        client.query_one("SELECT count(*) FROM pubsub.cursors WHERE name = $1", &[&name]).await.unwrap().get(0);
    assert_eq!(stored, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_retention_is_told_to_resync() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("pruned");
    let name = common::unique("slow");
    let l = db.listen_with(&[ch.clone()], fast_heartbeat().name(name.clone())).await;
    l.close().await.unwrap();
    for i in 0..5 {
        pgpubsub::publish(&client, &ch, &format!("gone {i}")).await.unwrap();
    }
    let policy = pgpubsub::retention::Retention::new(None, Some(0));
    assert_eq!(pgpubsub::retention::prune(&client, policy).await.unwrap(), 5);
    pgpubsub::publish(&client, &ch, "kept").await.unwrap();
    let mut l = db.listen_with(&[ch.clone()], fast_heartbeat().name(name.clone())).await;
    match tokio::time::timeout(common::WAIT, l.recv()).await.unwrap() {
        Some(Err(Error::ResyncNeeded { cursor, pruned })) => assert!(pruned > cursor),
        other => panic!("expected a resync, got {other:?}"),
    }
    assert_eq!(next(&mut l).await.message().unwrap().payload, "kept");
    assert_eq!(l.stats().snapshot().resyncs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_fast_and_immediate_while_writers_run() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(false)).await.unwrap();
    let config: Config = cluster.url("postgres").parse().unwrap();
    let mut client = pgpubsub::db::connect(&config).await.unwrap();
    pgpubsub::migrate::up(&mut client, false).await.unwrap();
    let ch = common::workload_table(&config, "w").await;
    let mut l = Listener::connect(&config, &[ch], fast_heartbeat()).await.unwrap();
    let writers = spawn_writers(&config, 2, 400, Duration::from_millis(10), 20);
    let cluster = Arc::new(cluster);
    let c = cluster.clone();
    let restarts = tokio::spawn(async move {
        for mode in ["fast", "immediate"] {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let c = c.clone();
            tokio::task::spawn_blocking(move || c.restart(mode)).await.unwrap();
        }
    });
    let r = check(&mut l, &config, writers, None).await;
    restarts.await.unwrap();
    assert_complete(&r);
    assert!(l.stats().snapshot().reconnects >= 2, "{:?}", l.stats().snapshot());
}

#[tokio::test]
async fn a_read_replica_is_refused_with_a_clear_message() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(true)).await.unwrap();
    let config: Config = cluster.url("postgres").parse().unwrap();
    let err = Listener::connect(&config, &[common::channel("replica")], ListenerOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::ReadReplica(_)), "{err}");
    assert!(err.to_string().contains("read replica"), "{err}");
}

/// A session that LISTENs and then sits in an open transaction cannot read
/// the queue, so the queue fills for the whole cluster. The listener reports
/// the usage it sees, and its own connections are never idle in a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_pressure_is_reported_and_we_never_pin_the_queue() {
    let db = TestDb::new().await;
    let ch = common::channel("pressure");
    let mut stuck = db.client().await;
    // Not ours: the check below counts connections named pgpubsub.
    stuck.batch_execute(&format!("SET application_name = 'stuck'; LISTEN {ch}")).await.unwrap();
    let open = stuck.transaction().await.unwrap();
    open.batch_execute("SELECT 1").await.unwrap();

    let mut l = db.listen_with(&[ch.clone()], fast_heartbeat()).await;
    let client = db.client().await;
    for _ in 0..20 {
        pgpubsub::publish(&client, &ch, &"q".repeat(100_000)).await.unwrap();
        next(&mut l).await;
    }
    common::until_stats(&l, |s| s.queue_usage_ppm > 0).await;

    let pinned: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'pgpubsub' \
             AND state LIKE 'idle in transaction%'",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pinned, 0);
    open.rollback().await.unwrap();
}

/// Large events being read when every connection of the listener is cut:
/// read again from the log, in order, nothing missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_being_read_survive_their_connections_being_cut() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let client = db.client().await;
    let ch = common::channel("refs_cut");
    let mut l = db.listen_with(&[ch.clone()], fast_heartbeat()).await;
    let mut sent = BTreeMap::new();
    client.batch_execute("BEGIN").await.unwrap();
    for i in 0..40 {
        let p = format!("{i}:{}", "é".repeat(100_000));
        sent.insert(pgpubsub::publish(&client, &ch, &p).await.unwrap(), p);
    }
    client.batch_execute("COMMIT").await.unwrap();
    // Every backend of this database but the writer's: the LISTEN
    // connection and the log connection with its reads under way.
    let mine: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> $1",
            &[&mine],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 2, "killed {killed}");
    // At least once, in order: repeats only of what came before.
    let mut got = BTreeSet::new();
    let mut last = 0;
    while got.len() < sent.len() {
        let e = next(&mut l).await;
        let seq = e.seq.unwrap();
        assert!(e.message().unwrap().payload == sent[&seq], "event {seq} altered");
        assert!(seq > last || got.contains(&seq), "event {seq} after {last}, not seen before");
        last = last.max(seq);
        got.insert(seq);
    }
    let s = l.stats().snapshot();
    assert!(s.reconnects >= 1, "{s:?}");
}
