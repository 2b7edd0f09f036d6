//! Row changes, published messages, the store and the seed's job flow, as
//! events on the real server.

use pgpubsub::{store, Channel, Op};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::{self, next, TestDb};

#[derive(Debug, Deserialize, PartialEq)]
struct Item {
    id: i64,
    name: String,
    tags: Vec<String>,
}

#[tokio::test]
async fn insert_update_delete_truncate_carry_the_right_rows() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, name text, tags text[])").await.unwrap();
    let ch = common::channel("items");
    assert_eq!(pgpubsub::watch(&client, "items", Some(&ch)).await.unwrap(), ch);
    let mut l = db.listen(&[ch.clone()]).await;

    client
        .batch_execute(
            "INSERT INTO items VALUES (1, 'one', '{a,b}');
             UPDATE items SET name = 'uno' WHERE id = 1;
             DELETE FROM items WHERE id = 1;
             INSERT INTO items VALUES (2, 'two', '{}');
             TRUNCATE items;",
        )
        .await
        .unwrap();

    let ins = next(&mut l).await;
    let c = ins.change().unwrap();
    assert_eq!((c.op, c.schema.as_str(), c.table.as_str()), (Op::Insert, "public", "items"));
    assert_eq!(
        c.new_as::<Item>().unwrap(),
        Some(Item { id: 1, name: "one".into(), tags: vec!["a".into(), "b".into()] })
    );
    assert!(c.old.is_none());
    assert_eq!(serde_json::from_str::<Value>(c.key.as_ref().unwrap().get()).unwrap(), json!({"id": 1}));
    assert_eq!(ins.channel, ch.as_str());

    let upd = next(&mut l).await;
    let c = upd.change().unwrap();
    assert_eq!(c.op, Op::Update);
    assert_eq!(c.new_as::<Item>().unwrap().unwrap().name, "uno");
    assert_eq!(c.old_as::<Item>().unwrap().unwrap().name, "one");

    let del = next(&mut l).await;
    let c = del.change().unwrap();
    assert_eq!(c.op, Op::Delete);
    assert!(c.new.is_none());
    assert_eq!(c.old_as::<Item>().unwrap().unwrap().name, "uno");

    let ins2 = next(&mut l).await;
    assert_eq!(ins2.change().unwrap().op, Op::Insert);
    let tr = next(&mut l).await;
    let c = tr.change().unwrap();
    assert_eq!(c.op, Op::Truncate);
    assert!(c.key.is_none() && c.new.is_none() && c.old.is_none());

    // Sequence numbers follow the log, and the log holds the exact text sent.
    let seqs: Vec<i64> = [&ins, &upd, &del, &ins2, &tr].iter().map(|e| e.seq.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let logged: String =
        client.query_one("SELECT body FROM pubsub.events WHERE seq = $1", &[&seqs[1]]).await.unwrap().get(0);
    assert_eq!(logged, upd.json());
    assert!(ins.time.is_some());
}

#[tokio::test]
async fn watch_defaults_to_the_table_name_and_unwatch_stops_events() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let table = common::unique("tbl");
    client.batch_execute(&format!("CREATE SCHEMA app; CREATE TABLE app.{table} (k text, v int)")).await.unwrap();
    let ch = pgpubsub::watch(&client, &format!("app.{table}"), None).await.unwrap();
    assert_eq!(ch.as_str(), table);
    assert_eq!(
        pgpubsub::watch::watches(&client).await.unwrap().into_iter().find(|(t, _)| t.ends_with(&table)),
        Some((format!("app.{table}"), table.clone()))
    );
    let mut l = db.listen(&[ch.clone()]).await;
    client.batch_execute(&format!("INSERT INTO app.{table} VALUES ('a', 1)")).await.unwrap();
    let e = next(&mut l).await;
    let c = e.change().unwrap();
    // No primary key: no key, but the row is all there.
    assert!(c.key.is_none());
    assert_eq!(serde_json::from_str::<Value>(c.new.as_ref().unwrap().get()).unwrap(), json!({"k": "a", "v": 1}));
    assert_eq!(c.schema, "app");

    assert!(pgpubsub::unwatch(&client, &format!("app.{table}")).await.unwrap());
    assert!(!pgpubsub::unwatch(&client, &format!("app.{table}")).await.unwrap());
    client.batch_execute(&format!("INSERT INTO app.{table} VALUES ('b', 2)")).await.unwrap();
    pgpubsub::publish(&client, &ch, "marker").await.unwrap();
    // The marker arrives and nothing came before it.
    assert_eq!(next(&mut l).await.message().unwrap().payload, "marker");
}

#[tokio::test]
async fn composite_keys_and_odd_column_types() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE \"Odd Table\" (a int, b text, payload jsonb, at timestamptz, raw bytea, PRIMARY KEY (b, a))",
        )
        .await
        .unwrap();
    let ch = common::channel("odd");
    pgpubsub::watch(&client, "\"Odd Table\"", Some(&ch)).await.unwrap();
    let mut l = db.listen(&[ch]).await;
    client
        .batch_execute(
            "INSERT INTO \"Odd Table\" VALUES (1, 'x', '{\"nested\": [1, \"two\"]}', '2026-01-01Z', '\\x00ff')",
        )
        .await
        .unwrap();
    let e = next(&mut l).await;
    let c = e.change().unwrap();
    assert_eq!(c.table, "Odd Table");
    let key: Value = serde_json::from_str(c.key.as_ref().unwrap().get()).unwrap();
    assert_eq!(key, json!({"a": 1, "b": "x"}));
    let new: Value = serde_json::from_str(c.new.as_ref().unwrap().get()).unwrap();
    assert_eq!(new["payload"], json!({"nested": [1, "two"]}));
    assert_eq!(new["raw"], json!("\\x00ff"));
}

#[tokio::test]
async fn store_put_and_remove_are_events_with_history() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = Channel::new(store::STORE_CHANNEL).unwrap();
    let mut l = db.listen(&[ch]).await;
    let bucket = common::unique("bucket");

    assert_eq!(store::put(&client, &bucket, "a", &json!({"n": 1}), Some(0)).await.unwrap(), 1);
    assert_eq!(store::put(&client, &bucket, "a", &json!({"n": 2}), None).await.unwrap(), 2);
    let conflict = store::put(&client, &bucket, "a", &json!({"n": 3}), Some(1)).await.unwrap_err();
    assert_eq!(conflict.sqlstate(), Some(store::VERSION_CONFLICT), "{conflict}");
    assert!(conflict.to_string().contains("version conflict"), "{conflict}");
    assert_eq!(store::get(&client, &bucket, "a").await.unwrap().unwrap().val, json!({"n": 2}));
    assert_eq!(store::remove(&client, &bucket, "a").await.unwrap(), Some(3));
    assert_eq!(store::remove(&client, &bucket, "a").await.unwrap(), None);
    assert!(store::get(&client, &bucket, "a").await.unwrap().is_none());
    // A deleted id continues its numbering.
    assert_eq!(store::put(&client, &bucket, "a", &json!("again"), Some(0)).await.unwrap(), 4);

    let history = store::history(&client, &bucket, "a").await.unwrap();
    let kinds: Vec<(i32, &str)> = history.iter().map(|h| (h.version, h.kind.as_str())).collect();
    assert_eq!(kinds, vec![(1, "put"), (2, "put"), (3, "delete"), (4, "put")]);
    assert_eq!(history[2].val, None);

    let ops: Vec<(Op, Value)> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let e = next(&mut l).await;
            let c = e.change().unwrap();
            let row: Value = serde_json::from_str(c.new.as_ref().or(c.old.as_ref()).unwrap().get()).unwrap();
            v.push((c.op, row));
        }
        v
    };
    assert_eq!(ops[0].0, Op::Insert);
    assert_eq!((ops[0].1["bucket"].as_str(), ops[0].1["val"].clone()), (Some(bucket.as_str()), json!({"n": 1})));
    assert_eq!((ops[1].0, ops[1].1["version"].clone()), (Op::Update, json!(2)));
    assert_eq!((ops[2].0, ops[2].1["version"].clone()), (Op::Delete, json!(2)));
    assert_eq!((ops[3].0, ops[3].1["val"].clone()), (Op::Insert, json!("again")));
}

#[tokio::test]
async fn the_seed_job_flow_runs_as_written() {
    let db = TestDb::bare().await;
    let mut client = db.client().await;
    pgpubsub::migrate::up(&mut client, true).await.unwrap();
    let mut l = db.listen(&[Channel::new("job_channel").unwrap()]).await;
    client
        .batch_execute(
            "INSERT INTO job (status) VALUES ('queued');
             UPDATE job SET status = 'running';
             DELETE FROM job;",
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = next(&mut l).await;
        assert_eq!((e.kind(), e.seq), ("notify", None));
        let pgpubsub::Body::Notify(raw) = &e.body else { panic!() };
        seen.push(serde_json::from_str::<Value>(raw.get()).unwrap());
    }
    let statuses: Vec<&str> = seen.iter().map(|v| v["status"].as_str().unwrap()).collect();
    // All three operations reach the channel (the seed's ' INSERT' bug is fixed).
    assert_eq!(statuses, ["queued", "running", "running"]);
    assert!(seen.iter().all(|v| v["job_id"] == seen[0]["job_id"]));
    let ids: Vec<i64> = seen.iter().map(|v| v["notification_id"].as_i64().unwrap()).collect();
    let logged: Vec<(i64, String)> = client
        .query("SELECT id, operation FROM notification ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        logged,
        vec![(ids[0], "INSERT".to_string()), (ids[1], "UPDATE".to_string()), (ids[2], "DELETE".to_string())]
    );
}

#[tokio::test]
async fn events_of_a_rolled_back_transaction_never_arrive() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let ch = common::channel("tx");
    let mut l = db.listen(&[ch.clone()]).await;
    let tx = client.transaction().await.unwrap();
    tx.execute("SELECT pubsub.publish($1, 'never')", &[&ch.as_str()]).await.unwrap();
    tx.rollback().await.unwrap();
    pgpubsub::publish(&client, &ch, "after").await.unwrap();
    assert_eq!(next(&mut l).await.message().unwrap().payload, "after");
}

#[tokio::test]
async fn one_listener_many_channels_keeps_per_channel_order() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let chans: Vec<Channel> = (0..3).map(|i| common::channel(&format!("multi{i}"))).collect();
    let mut l = db.listen(&chans).await;
    for i in 0..30 {
        pgpubsub::publish(&client, &chans[i % 3], &i.to_string()).await.unwrap();
    }
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); 3];
    for _ in 0..30 {
        let e = next(&mut l).await;
        let idx = chans.iter().position(|c| c.as_str() == e.channel).unwrap();
        per[idx].push(e.message().unwrap().payload.parse().unwrap());
    }
    for (i, got) in per.iter().enumerate() {
        let want: Vec<usize> = (0..30).filter(|n| n % 3 == i).collect();
        assert_eq!(got, &want);
    }
}

/// A listener feeding a hub: a stalled subscriber misses events and is told
/// so, and never holds back the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_fans_out_and_a_stalled_subscriber_is_told_it_lagged() {
    use pgpubsub::{Delivery, Filter, Hub};
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("hub");
    let l = db.listen(&[ch.clone()]).await;
    let hub = Hub::new(16);
    let mut fast = hub.subscribe(Filter::channels([ch.as_str()]));
    let mut stalled = hub.subscribe(Filter::channels([ch.as_str()]));
    let mut other = hub.subscribe(Filter::channels(["not_this_one"]));
    tokio::spawn(hub.clone().run(l.into_positioned()));

    // The fast subscriber reads as it goes, as its own task would.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 50 {
            match tokio::time::timeout(common::WAIT, fast.recv()).await.unwrap().unwrap() {
                Delivery::Event(e) => got.push(e.event.message().unwrap().payload.parse::<i32>().unwrap()),
                other => panic!("the fast subscriber lagged: {other:?}"),
            }
        }
        got
    });
    for i in 0..50 {
        pgpubsub::publish(&client, &ch, &i.to_string()).await.unwrap();
    }
    let got = reader.await.unwrap();
    assert_eq!(got, (0..50).collect::<Vec<_>>());

    // The stalled one holds its first 16, then learns how many it missed,
    // then gets what comes next.
    let mut seen = Vec::new();
    for _ in 0..17 {
        seen.push(tokio::time::timeout(common::WAIT, stalled.recv()).await.unwrap().unwrap());
    }
    pgpubsub::publish(&client, &ch, "after").await.unwrap();
    while seen
        .last()
        .is_none_or(|d: &Delivery| !matches!(d, Delivery::Event(e) if e.event.message().unwrap().payload == "after"))
    {
        seen.push(tokio::time::timeout(common::WAIT, stalled.recv()).await.unwrap().unwrap());
    }
    assert_eq!(seen.iter().filter(|d| matches!(d, Delivery::Event(_))).count(), 17);
    match &seen[16] {
        Delivery::Lagged { missed, last_seq } => assert!(*missed == 34 && last_seq.is_some(), "{missed} {last_seq:?}"),
        other => panic!("expected a lag notice, got {other:?}"),
    }
    assert!(other.try_recv().is_none());
}

/// The wake-up and heartbeat channels are the listener's own: removing them
/// as if they were a subscriber's channel changes nothing, and an idle
/// listener is still woken at once (not at the next heartbeat, 10 s here).
#[tokio::test]
async fn the_listeners_own_channels_cannot_be_removed() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("reserved");
    let options = pgpubsub::ListenerOptions::default()
        .heartbeat(std::time::Duration::from_secs(10), std::time::Duration::from_secs(20));
    let mut l = db.listen_with(std::slice::from_ref(&ch), options).await;
    let wake = Channel::new("pubsub_wake").unwrap();
    assert!(wake.is_reserved() && Channel::new("pgpubsub_fence_x").unwrap().is_reserved());
    assert!(!ch.is_reserved());
    l.remove_channel(&wake).await;
    for i in 0..3 {
        // Idle: the listener is waiting for a wake-up.
        let publish = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            pgpubsub::publish(&client, &ch, &i.to_string()).await.unwrap();
            std::time::Instant::now()
        };
        let (sent, event) = tokio::join!(publish, next(&mut l));
        assert_eq!(event.message().unwrap().payload, i.to_string());
        let waited = sent.elapsed();
        assert!(waited < std::time::Duration::from_secs(2), "woken after {waited:?}");
    }
}

/// Appends one event on `ch` as the capturer does (`pubsub.capture_append`,
/// which wakes listeners after every append), at WAL place `n`.
async fn capture_append(client: &tokio_postgres::Client, ch: &Channel, n: i32) {
    let body = format!(r#","kind":"message","channel":"{ch}","time":"2026-12-07T00:00:00Z","payload":"{n}"}}"#);
    client
        .execute(
            "SELECT pubsub.capture_append('test', ARRAY[$1::text::pg_lsn], ARRAY[0], \
             ARRAY[pg_current_xact_id()::text::bigint & 4294967295], ARRAY[$2], ARRAY[NULL::oid], ARRAY[$3], ARRAY[NULL])",
            &[&format!("0/{:X}", n * 16), &ch.as_str(), &body],
        )
        .await
        .unwrap();
}

/// Whether a listener holds the wake lock (is the one writers wake).
async fn wake_lock_held(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' AND granted
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND classid::bigint = (8099566096075549541 >> 32) AND objid::bigint = (8099566096075549541 & 4294967295))",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Hands a listener's events over a channel, so it reads (and goes back to
/// waiting) whether the test is receiving or not.
fn drain(mut l: pgpubsub::Listener) -> tokio::sync::mpsc::UnboundedReceiver<pgpubsub::Event> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(e)) = l.recv().await {
            if tx.send(e).is_err() {
                break;
            }
        }
    });
    rx
}

async fn payload_of(rx: &mut tokio::sync::mpsc::UnboundedReceiver<pgpubsub::Event>) -> String {
    let e = tokio::time::timeout(common::WAIT, rx.recv()).await.expect("no event in time").expect("listener ended");
    e.message().unwrap().payload.to_string()
}

/// A listener the capturer alone wakes keeps the wake lock and reads the
/// log once per append. Before, each wake-up gave the lock back: a read
/// that found the append, one that found nothing, the lock taken again and
/// a read once more, three reads per append. A second listener (sleeping
/// on the first one's behalf) reads once per append too, and a writer's
/// event still reaches both after them.
#[tokio::test]
async fn listeners_the_capturer_wakes_read_once_per_append() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("captured");
    let (a, b) = (db.listen(&[ch.clone()]).await, db.listen(&[ch.clone()]).await);
    let (a_stats, b_stats) = (a.stats(), b.stats());
    let (mut a, mut b) = (drain(a), drain(b));
    let appends = 20;
    let mut before = (0, 0);
    let mut started = std::time::Instant::now();
    for n in 1..=2 + appends {
        if n == 3 {
            // Warmed up: both have read, found nothing and wait.
            before = (a_stats.snapshot().polls, b_stats.snapshot().polls);
            started = std::time::Instant::now();
        }
        // Appended only once a listener waits for it (holds the lock), so
        // each append finds them asleep, as a trickle of commits does.
        let deadline = tokio::time::Instant::now() + common::WAIT;
        while !wake_lock_held(&client).await {
            assert!(tokio::time::Instant::now() < deadline, "no listener took the wake lock");
            tokio::task::yield_now().await;
        }
        capture_append(&client, &ch, n).await;
        assert_eq!(payload_of(&mut a).await, n.to_string());
        assert_eq!(payload_of(&mut b).await, n.to_string());
    }
    // One read per append, plus what the heartbeat (each second) reads.
    let allowed = appends as u64 + 3 * (started.elapsed().as_secs() + 1);
    for (name, polls) in [("a", a_stats.snapshot().polls - before.0), ("b", b_stats.snapshot().polls - before.1)] {
        assert!(polls <= allowed, "listener {name}: {polls} reads for {appends} appends (at most {allowed})");
    }
    // A writer's event (a trigger tests the lock: it is held) reaches both.
    pgpubsub::publish(&client, &ch, "written").await.unwrap();
    assert_eq!(payload_of(&mut a).await, "written");
    assert_eq!(payload_of(&mut b).await, "written");
}

/// A listener plans its page read once (generic plans). Planned while the
/// log was empty and truncated by VACUUM, that plan was a scan of the whole
/// log, kept as the log grew: every read cost more than the last, until an
/// ANALYZE happened to replan it. The reading connection now never plans a
/// scan of the whole log.
#[tokio::test]
async fn a_listener_started_on_an_emptied_log_reads_it_through_its_index() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("emptied");
    common::emptied_log(&client, &ch).await;
    // Counted before the listener's first read.
    let before = common::LogScans::take(&client).await;

    let listener = db.listen(&[ch.clone()]).await;
    let stats = listener.stats();
    let mut rx = drain(listener);
    // It reads the empty log first (its heartbeat reads, at the latest).
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while stats.snapshot().polls < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the listener never read the log");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for n in 0..50 {
        pgpubsub::publish(&client, &ch, &format!("new {n}")).await.unwrap();
        assert_eq!(payload_of(&mut rx).await, format!("new {n}"));
    }
    // Fence: the statistics count every read (see `LogScans`).
    let polls = stats.snapshot().polls as i64;
    assert_eq!(before.whole_log_scans_after(&client, polls).await, 0, "{polls} reads scanned the whole log");
}
