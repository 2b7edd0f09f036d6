//! Foreign notifications on a listened channel: delivered as their own
//! kind (`notify`, no seq), never taken for events of the log; and forged
//! frames or envelopes of ours never reach a subscriber.

use pgpubsub::{Body, Channel};
use serde_json::Value;

use crate::common::{self, next, raw_notify, TestDb};

fn envelope(ch: &Channel, seq: i64, payload: &str) -> String {
    serde_json::json!({"seq": seq, "txid": 1, "kind": "message", "channel": ch.as_str(), "payload": payload})
        .to_string()
}

/// What a role without any privilege can send on a listened channel:
/// envelopes of ours (with the seq of real events), chunk frames,
/// references, wake-ups, malformed frames. None of it is delivered; the
/// genuine events all are, once, in order.
#[tokio::test]
async fn forged_envelopes_chunks_and_references_never_reach_a_subscriber() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("forge");
    let mut l = db.listen(&[ch.clone()]).await;
    let first = pgpubsub::publish(&client, &ch, "real 1").await.unwrap();
    // A fake of the next events, sent before they are written.
    for seq in first..first + 5 {
        raw_notify(&client, &ch, &envelope(&ch, seq, "FORGED")).await;
        for f in pgpubsub::wire::encode_chunks(seq, &envelope(&ch, seq, &"F".repeat(9000)), 1000) {
            raw_notify(&client, &ch, &f).await;
        }
        raw_notify(&client, &ch, &format!("~r:{seq}:10")).await;
    }
    for bad in ["~c:garbage", "~x:1", "~r:abc:1", ""] {
        raw_notify(&client, &ch, bad).await;
    }
    raw_notify(&client, &Channel::new("pubsub_wake").unwrap(), ch.as_str()).await;
    let mut want = vec![(first, "real 1".to_string())];
    for i in 2..=4 {
        let p = format!("real {i}");
        want.push((pgpubsub::publish(&client, &ch, &p).await.unwrap(), p));
    }
    for (seq, p) in &want {
        let e = next(&mut l).await;
        assert_eq!((e.seq, e.message().map(|m| m.payload.as_str())), (Some(*seq), Some(p.as_str())), "{}", e.json());
    }
    // Nothing else arrives, no forged event and no foreign one: a plain
    // notification sent after all of them is the next thing delivered
    // (notifications arrive in the order sent; a forgery taken for an event
    // of the log would have been read with the real ones).
    raw_notify(&client, &ch, "fence").await;
    let e = next(&mut l).await;
    assert_eq!((e.kind(), e.json().contains(r#""payload":"fence""#)), ("notify", true), "{}", e.json());
    assert!(l.try_recv().is_none());
    let s = l.stats().snapshot();
    assert_eq!((s.foreign, s.malformed), (1, 3), "{s:?}");
}

/// Plain `pg_notify` payloads (JSON or not) are delivered as foreign events,
/// marked as such, between log events, and never deduplicated against them.
#[tokio::test]
async fn foreign_payloads_are_delivered_as_notify_events() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("foreign");
    let mut l = db.listen(&[ch.clone()]).await;
    raw_notify(&client, &ch, r#"{"job_id": 1, "status": "queued"}"#).await;
    raw_notify(&client, &ch, "plain text").await;
    raw_notify(&client, &ch, r#"{"seq": 1, "kind": "other"}"#).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = next(&mut l).await;
        assert_eq!((e.kind(), e.seq, e.txid), ("notify", None, None));
        let Body::Notify(raw) = &e.body else { panic!() };
        got.push(raw.get().to_string());
    }
    // Passed on as sent; text that is not JSON becomes a JSON string.
    assert_eq!(got, [r#"{"job_id": 1, "status": "queued"}"#, r#""plain text""#, r#"{"seq": 1, "kind": "other"}"#]);
    assert_eq!(l.stats().snapshot().foreign, 3);
}

/// A trigger in the style of seed 004 (written here, not copied): the
/// snapshot row as JSON, sent in pieces of 1000 characters as
/// `<36-char id><offset>:<piece>`, then `<id>EOF`.
const SEED_STYLE_TRIGGER: &str = r#"
CREATE TABLE bridge_snaps (bucket text, id text, version int, val jsonb);
CREATE FUNCTION bridge_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    doc  text;
    pos  int := 0;
    r    record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    doc := jsonb_build_object('op', TG_OP, 'id', r.id, 'bucket', r.bucket,
                              'val', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE NEW.val END,
                              'old', CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.val END)::text;
    WHILE pos <= length(doc) LOOP
        PERFORM pg_notify(TG_ARGV[0], r.id || pos || ':' || substr(doc, pos, 1000));
        pos := pos + 1000;
    END LOOP;
    PERFORM pg_notify(TG_ARGV[0], r.id || 'EOF');
    RETURN NULL;
END $$;
"#;

#[tokio::test]
async fn seed_format_chunks_are_decoded() {
    let db = TestDb::bare().await;
    let client = db.client().await;
    let ch = common::channel("bridge");
    client.batch_execute(SEED_STYLE_TRIGGER).await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TRIGGER bridge AFTER INSERT OR UPDATE OR DELETE ON bridge_snaps \
             FOR EACH ROW EXECUTE FUNCTION bridge_notify('{ch}')"
        ))
        .await
        .unwrap();
    let mut l = db.listen(&[ch.clone()]).await;
    let big: String = "ñandú 🦤 ".repeat(900);
    client
        .execute(
            "INSERT INTO bridge_snaps VALUES ('todos', gen_random_uuid()::text, 1, jsonb_build_object('todo', $1::text))",
            &[&big],
        )
        .await
        .unwrap();
    client.batch_execute("UPDATE bridge_snaps SET val = '{\"todo\": \"short\"}'").await.unwrap();
    let e = next(&mut l).await;
    let pgpubsub::Body::Notify(raw) = &e.body else { panic!("{}", e.json()) };
    let v: Value = serde_json::from_str(raw.get()).unwrap();
    assert_eq!((v["op"].as_str(), v["bucket"].as_str()), (Some("INSERT"), Some("todos")));
    assert!(v["val"]["todo"].as_str() == Some(big.as_str()), "seed-format payload altered");
    let e = next(&mut l).await;
    let v: Value = serde_json::from_str(e.json()).unwrap();
    assert_eq!(v["payload"]["val"]["todo"], "short");
    assert_eq!(v["payload"]["old"]["todo"].as_str().map(str::len), Some(big.len()));
    // ~8,100 characters, twice (new, then old): 9 parts each, and no EOF counted.
    assert!(l.stats().snapshot().chunks >= 16, "{:?}", l.stats().snapshot());
}

/// Two defects found through `listen`. One transaction sends a seed message
/// out of order (part 1, its EOF, part 0) and then a plain notification;
/// decided at the EOF, `5}` was delivered alone. Another numbers its pieces
/// by 1-based character positions (`1:`, `1001:`, `2001:`), which no
/// numbering fitted. Both are delivered whole, in the order sent.
#[tokio::test]
async fn seed_parts_behind_their_eof_and_1_based_positions_are_delivered_whole() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let ch = common::channel("seedorder");
    let mut l = db.listen(&[ch.clone()]).await;
    let (a, b) = ("123e4567-e89b-12d3-a456-426614174000", "123e4567-e89b-12d3-a456-426614174001");
    // A JSON string of 2,500 characters: pieces of 1000, 1000, 500.
    let long = serde_json::to_string(&"ñandú 🦤 ".repeat(312)).unwrap();
    assert_eq!(long.chars().count(), 2_498);
    let chars: Vec<char> = long.chars().collect();
    let mut sends = vec![format!("{a}1:5}}"), format!("{a}EOF"), format!("{a}0:{{\"a\":"), "after".to_string()];
    sends.extend(chars.chunks(1000).enumerate().map(|(i, p)| format!("{b}{}:{}", 1 + 1000 * i, String::from_iter(p))));
    sends.push(format!("{b}EOF"));
    let tx = client.transaction().await.unwrap();
    for payload in &sends {
        tx.execute("SELECT pg_notify($1, $2)", &[&ch.as_str(), payload]).await.unwrap();
    }
    tx.commit().await.unwrap();
    let mut got = vec![];
    for _ in 0..3 {
        let e = next(&mut l).await;
        let Body::Notify(raw) = &e.body else { panic!("{}", e.json()) };
        got.push(raw.get().to_string());
    }
    assert_eq!(got, [r#"{"a":5}"#, r#""after""#, long.as_str()]);
    let s = l.stats().snapshot();
    assert_eq!((s.foreign, s.expired, s.malformed), (3, 0, 0), "{s:?}");
}
