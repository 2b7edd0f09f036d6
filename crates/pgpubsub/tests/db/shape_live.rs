//! A live shape in the library: [`Shape::snapshot`], then a [`Listener`]
//! from the hand-over's start, with [`Shape::after`] deciding each event.
//! Writers run throughout, and a transaction held open across the snapshot
//! puts every write committed meanwhile inside the hand-over window. At the
//! end the rows held equal a `SELECT` of the shape, and no change met a row
//! it did not fit (an INSERT of a key held, an UPDATE or DELETE of one not
//! held): each change came exactly once, none the snapshot held.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use pgpubsub::shape::{Filter, Seen, Shape, SnapshotPart};
use pgpubsub::{Channel, Listener, ListenerOptions, Op, View};
use serde_json::Value;

use crate::common::{self, TestDb, WAIT};

/// Rows held, by id; and changes that did not fit them.
#[derive(Default)]
struct Held {
    rows: BTreeMap<i64, Value>,
    misfits: u64,
    applied: u64,
}

impl Held {
    fn apply(&mut self, e: &pgpubsub::Event) {
        let c = e.change().unwrap();
        let id = |raw: &Option<Box<serde_json::value::RawValue>>| -> i64 {
            serde_json::from_str::<Value>(raw.as_ref().unwrap().get()).unwrap()["id"].as_i64().unwrap()
        };
        let fits = match (c.op, c.view) {
            (Op::Insert, _) | (Op::Update, Some(View::Enter)) => {
                let new: Value = serde_json::from_str(c.new.as_ref().unwrap().get()).unwrap();
                self.rows.insert(id(&c.new), new).is_none()
            }
            (Op::Update, Some(View::Leave)) => self.rows.remove(&id(&c.key)).is_some(),
            (Op::Update, _) => {
                let held = self.rows.remove(&id(&c.old)).is_some();
                self.rows.insert(id(&c.new), serde_json::from_str(c.new.as_ref().unwrap().get()).unwrap());
                held
            }
            (Op::Delete, _) => self.rows.remove(&id(&c.old)).is_some(),
            _ => true,
        };
        self.applied += 1;
        self.misfits += u64::from(!fits);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shape_followed_by_a_listener_holds_what_select_shows() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let ch = common::channel("shape");
    admin
        .batch_execute(&format!(
            "CREATE TABLE items (id int PRIMARY KEY, status text, qty int);
             INSERT INTO items SELECT g, (ARRAY['new','paid','void'])[1 + g % 3], g % 50 FROM generate_series(1, 200) g;
             SELECT pubsub.watch('items', '{ch}');"
        ))
        .await
        .unwrap();

    // Writers, and a transaction held open before the snapshot.
    let writing = Arc::new(AtomicBool::new(true));
    let writes = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (client, writing, writes) = (db.client().await, writing.clone(), writes.clone());
        writers.push(tokio::spawn(async move {
            let mut n = w;
            while writing.load(Ordering::Relaxed) {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let id = 1 + (n >> 33) % 260;
                let sql = match (n >> 20) % 5 {
                    0 => format!("INSERT INTO items VALUES ({id}, 'paid', {}) ON CONFLICT DO NOTHING", n % 50),
                    1 => format!("UPDATE items SET status = 'paid' WHERE id = {id}"),
                    2 => format!("UPDATE items SET status = 'new', qty = {} WHERE id = {id}", n % 50),
                    3 => format!("DELETE FROM items WHERE id = {id}"),
                    _ => format!("UPDATE items SET qty = {} WHERE id = {id}", n % 50),
                };
                let _ = client.batch_execute(&sql).await;
                writes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let held_open = db.client().await;
    held_open.batch_execute("BEGIN; INSERT INTO items VALUES (10000, 'paid', 1)").await.unwrap();
    let before = writes.load(Ordering::Relaxed);
    while writes.load(Ordering::Relaxed) < before + 50 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let filter = Filter::parse("status = 'paid' and qty < 40").unwrap();
    let shape = Arc::new(Shape::resolve(&admin, "items", Some(&filter), None).await.unwrap());
    assert_eq!(shape.channel, ch.as_str());
    let mut parts = shape.snapshot(pgpubsub::db::connect(&db.url.parse().unwrap()).await.unwrap(), None).await.unwrap();
    let mut held = Held::default();
    let handover = loop {
        match parts.next().await.unwrap().unwrap() {
            SnapshotPart::Rows(rows) => {
                for r in rows {
                    let v: Value = serde_json::from_str(&r).unwrap();
                    held.rows.insert(v["id"].as_i64().unwrap(), v);
                }
            }
            SnapshotPart::Done { handover, .. } => break handover,
        }
    };
    let options = ListenerOptions::default().since(handover.start());
    let mut listener =
        Listener::connect(&db.url.parse().unwrap(), &[Channel::new(ch.as_str()).unwrap()], options).await.unwrap();
    held_open.batch_execute("COMMIT").await.unwrap();
    let before = writes.load(Ordering::Relaxed);
    while writes.load(Ordering::Relaxed) < before + 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    writing.store(false, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    // The fence: written last, in the shape.
    admin.batch_execute("INSERT INTO items VALUES (0, 'paid', 0)").await.unwrap();
    while !held.rows.contains_key(&0) {
        let e = tokio::time::timeout(WAIT, listener.recv()).await.expect("the fence never came").unwrap().unwrap();
        match shape.after(Some(&handover), &e) {
            Seen::Hidden => {}
            Seen::Same => held.apply(&e),
            Seen::As(e) => held.apply(&e),
        }
    }
    let want: BTreeMap<i64, Value> = admin
        .query("SELECT row_to_json(t)::text FROM (SELECT * FROM items WHERE status = 'paid' AND qty < 40) t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(r.get(0)).unwrap();
            (v["id"].as_i64().unwrap(), v)
        })
        .collect();
    assert_eq!(held.rows, want);
    assert!(held.rows.contains_key(&10000), "the row of the transaction held open came after the snapshot");
    assert_eq!(held.misfits, 0, "changes that did not fit what was held ({} applied)", held.applied);
    assert!(held.applied > 20, "{} changes applied", held.applied);
}
