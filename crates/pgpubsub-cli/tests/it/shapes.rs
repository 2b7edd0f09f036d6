//! Live shapes through the gateway: a table's rows that match a filter,
//! with the columns asked for, as a snapshot, then a `ready` marker, then
//! each change once (entering and leaving the filter included), over SSE
//! and WebSocket; a resume sends no snapshot again; a resync sends it
//! again, marked; bad shapes get clear errors. (The convergence test under
//! writers and gateway kills is the JS client's, `clients/js/test/shape.test.js`.)

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, TestDb, WAIT};
use crate::serve::{curl, next_sse, now_s, serve, sse, token, Sse, Ws, SECRET};

/// `items`, watched on a channel of its own, with five rows.
async fn items(db: &TestDb) -> String {
    let ch = common::unique("items");
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE items (id int PRIMARY KEY, status text, qty int, note text);
             INSERT INTO items SELECT g, CASE WHEN g % 2 = 0 THEN 'paid' ELSE 'new' END, g * 10, 'n' || g
                 FROM generate_series(1, 5) g;
             SELECT pubsub.watch('items', '{ch}');"
        ))
        .await
        .unwrap();
    ch
}

/// Records up to and including the first `ready`: the rows, and the marker.
fn snapshot(rx: &std::sync::mpsc::Receiver<Sse>) -> (Vec<Value>, Sse) {
    let mut rows = Vec::new();
    loop {
        let e = next_sse(rx);
        match e.event.as_str() {
            "snapshot" => {
                let v: Value = serde_json::from_str(&e.data).unwrap();
                assert_eq!(v["key"], json!(["id"]), "{v}");
                rows.extend(v["rows"].as_array().unwrap().iter().cloned());
            }
            "ready" => return (rows, e),
            other => panic!("before ready: {other} {}", e.data),
        }
    }
}

/// The next change's (op, view, key id, new, old).
fn change(rx: &std::sync::mpsc::Receiver<Sse>) -> ((String, Value, Value, Value, Value), Option<String>) {
    loop {
        let e = next_sse(rx);
        assert_ne!(e.event, "snapshot", "a snapshot where changes were due: {}", e.data);
        if e.event == "change" {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            let seen = (
                v["op"].as_str().unwrap().into(),
                v["view"].clone(),
                v["key"]["id"].clone(),
                v["new"].clone(),
                v["old"].clone(),
            );
            return (seen, e.id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shape_is_its_snapshot_then_its_changes_and_a_resume_sends_no_snapshot() {
    let db = TestDb::new().await;
    let ch = items(&db).await;
    let server = serve(&db, &ch, &[]);
    let url = format!(
        "http://{}/events?table=items&filter={}&columns=status&snapshot=true",
        server.addr,
        form_urlencoded::byte_serialize(b"status = 'paid' or qty > 45").collect::<String>()
    );
    let (mut c, rx) = sse(&url, None);
    let (mut rows, ready) = snapshot(&rx);
    rows.sort_by_key(|r| r["id"].as_i64());
    let row = |id: i32, status: &str| json!({"id": id, "status": status});
    assert_eq!(rows, vec![row(2, "paid"), row(4, "paid"), row(5, "new")]);
    let marker: Value = serde_json::from_str(&ready.data).unwrap();
    assert_eq!(marker["rows"], 3);
    assert_eq!(ready.id.as_deref(), marker["id"].as_str());

    let w = db.client().await;
    w.batch_execute(
        "UPDATE items SET status = 'paid' WHERE id = 1;   -- enters
         UPDATE items SET status = 'new' WHERE id = 2;    -- leaves
         UPDATE items SET note = 'x' WHERE id = 4;        -- stays (only its columns sent)
         UPDATE items SET note = 'y' WHERE id = 3;        -- outside: not sent
         DELETE FROM items WHERE id = 5;                  -- leaves with its row
         INSERT INTO items VALUES (6, 'new', 1, 'n');     -- outside
         INSERT INTO items VALUES (7, 'paid', 1, 'n');    -- inside
         UPDATE items SET id = 8 WHERE id = 7;            -- its key changes
         TRUNCATE items;
         INSERT INTO items VALUES (100, 'paid', 0, 'fence');",
    )
    .await
    .unwrap();
    let n = Value::Null;
    let expect = vec![
        ("UPDATE".to_string(), json!("enter"), json!(1), row(1, "paid"), n.clone()),
        ("UPDATE".into(), json!("leave"), json!(2), n.clone(), n.clone()),
        ("UPDATE".into(), n.clone(), json!(4), row(4, "paid"), row(4, "paid")),
        ("DELETE".into(), n.clone(), json!(5), n.clone(), row(5, "new")),
        ("INSERT".into(), n.clone(), json!(7), row(7, "paid"), n.clone()),
        ("UPDATE".into(), n.clone(), json!(8), row(8, "paid"), row(7, "paid")),
        ("TRUNCATE".into(), n.clone(), n.clone(), n.clone(), n.clone()),
        ("INSERT".into(), n.clone(), json!(100), row(100, "paid"), n.clone()),
    ];
    let mut got = Vec::new();
    let mut last_id = None;
    while got.len() < expect.len() {
        let (seen, id) = change(&rx);
        got.push(seen);
        last_id = id;
    }
    assert_eq!(got, expect);
    let _ = c.kill();

    // Resuming: no snapshot, the changes after the position. A position is
    // commit-safe: held back to the oldest transaction open when it was
    // read (any in the cluster: other tests' too), so it may repeat what
    // was read since then (docs/delivery.md), never skip.
    w.batch_execute("INSERT INTO items VALUES (101, 'paid', 0, 'after')").await.unwrap();
    let (mut again, rx) = sse(&url, last_id.as_deref());
    loop {
        let (seen, _) = change(&rx);
        if seen.2 == json!(101) {
            assert_eq!(seen.0, "INSERT");
            break;
        }
        assert!(got.contains(&seen), "after resuming, neither a repeat nor the next change: {seen:?}");
    }
    let _ = again.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shape_over_websocket_and_a_resync_sends_the_snapshot_again() {
    let db = TestDb::new().await;
    let ch = items(&db).await;
    let server = serve(&db, &ch, &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)).await.unwrap();
    let filter = json!({"col": "qty", "op": ">=", "value": 30});
    let request = json!({"table": "items", "filter": filter, "snapshot": true, "ack": true});
    ws.send(Message::Text(request.to_string().into())).await.unwrap();
    let subscribed = next(&mut ws).await;
    assert_eq!(subscribed, json!({"type": "subscribed", "id": null}), "no position before the rows");
    let rows = next(&mut ws).await;
    assert_eq!(rows["type"], "snapshot");
    let mut got = rows["rows"].as_array().unwrap().clone();
    got.sort_by_key(|r| r["id"].as_i64());
    let ids: Vec<i64> = got.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [3, 4, 5]);
    assert_eq!(got[0], json!({"id": 3, "status": "new", "qty": 30, "note": "n3"}));
    let ready = next(&mut ws).await;
    assert_eq!((ready["type"].as_str(), ready["rows"].as_i64()), (Some("ready"), Some(3)));
    let position = ready["id"].as_str().unwrap().to_string();
    db.client().await.batch_execute("UPDATE items SET qty = 1 WHERE id = 3").await.unwrap();
    let leave = next(&mut ws).await;
    assert_eq!((leave["event"]["view"].as_str(), &leave["event"]["key"]), (Some("leave"), &json!({"id": 3})));
    let _ = ws.close(None).await;

    // The log loses what came after the position: resuming from it reads
    // the snapshot again, marked as such.
    let client = db.client().await;
    client
        .batch_execute("UPDATE items SET qty = 99 WHERE id = 1; UPDATE items SET qty = 98 WHERE id = 2")
        .await
        .unwrap();
    let policy = pgpubsub::retention::Retention::new(None, Some(1));
    assert!(pgpubsub::retention::prune(&client, policy).await.unwrap() >= 2);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)).await.unwrap();
    let request = json!({"table": "items", "filter": filter, "snapshot": true, "since": position});
    ws.send(Message::Text(request.to_string().into())).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let v = next(&mut ws).await;
        match v["type"].as_str() {
            Some("resync") => seen.push(format!("resync snapshot={}", v["snapshot"])),
            Some("snapshot") => {
                let mut ids: Vec<i64> =
                    v["rows"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect();
                ids.sort_unstable(); // a snapshot comes in no particular order
                seen.push(format!("rows {ids:?}"));
            }
            Some("ready") => break,
            _ => panic!("{v}"),
        }
    }
    assert_eq!(seen, ["resync snapshot=true", "rows [1, 2, 4, 5]"]);
}

/// The next WebSocket message that is not a heartbeat, as JSON.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "heartbeat" {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shapes_get_clear_errors() {
    let db = TestDb::new().await;
    let ch = items(&db).await;
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE unwatched (id int PRIMARY KEY); CREATE TABLE keyless (x int);
             SELECT pubsub.watch('keyless', '{ch}');"
        ))
        .await
        .unwrap();
    let server = serve(&db, &ch, &["--jwt-secret", SECRET]);
    let q = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let reader = token(SECRET, json!({"exp": now_s() + 600, "read": [ch]}));
    let bearer = format!("Authorization: Bearer {reader}");
    let cases = [
        ("table=nope&snapshot=true".to_string(), 400, "no table"),
        ("table=unwatched&snapshot=true".into(), 400, "not watched"),
        ("table=keyless&snapshot=true".into(), 400, "no primary key"),
        ("table=items&columns=nope".into(), 400, "unknown column"),
        (format!("table=items&filter={}", q("qty >")), 400, "filter syntax error"),
        (format!("table=items&filter={}", q("qty = 'x'")), 400, "filter"),
        (format!("table=items&filter={}", q("nope = 1")), 400, "unknown column"),
        (format!("filter={}", q("qty = 1")), 400, "name it with table"),
        (format!("table=items&channel={ch}&snapshot=true"), 400, "its channel is its table's"),
        ("table=items&snapshot=maybe".into(), 400, "expected true or false"),
        (format!("table=items&since={}", q("1:2~3:2:~5")), 400, "invalid position"),
    ];
    for (query, status, says) in cases {
        let (code, body) = curl("GET", &format!("http://{}/events?{query}", server.addr), None, &[&bearer]);
        assert_eq!(code, status, "{query}: {body}");
        assert!(body.to_string().contains(says), "{query}: {body}");
    }
    // A token that may not read the table's channel gets none of its rows.
    let other = token(SECRET, json!({"exp": now_s() + 600, "read": ["something_else"]}));
    let (code, body) = curl(
        "GET",
        &format!("http://{}/events?table=items&snapshot=true", server.addr),
        None,
        &[&format!("Authorization: Bearer {other}")],
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.to_string().contains("may not read channel"), "{body}");
}
