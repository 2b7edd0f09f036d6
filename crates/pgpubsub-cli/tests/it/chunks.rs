//! Bad and foreign frames on a listened channel: each is skipped with a
//! counter, and never costs another event.

use std::time::Duration;

use pgpubsub::{Channel, Limits, ListenerOptions};
use serde_json::Value;

use crate::common::{self, next, raw_notify, until_stats, TestDb};

/// Our chunk frames for `text`, `size` bytes of text each.
fn frames(text: &str, size: usize, seq: i64) -> Vec<String> {
    pgpubsub::wire::encode_chunks(seq, text, size)
}

fn envelope(ch: &Channel, seq: i64, payload: &str) -> String {
    serde_json::json!({"seq": seq, "kind": "message", "channel": ch.as_str(), "payload": payload}).to_string()
}

#[tokio::test]
async fn duplicated_and_reordered_chunks_reassemble() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("dup");
    let mut l = db.listen(&[ch.clone()]).await;
    let body = envelope(&ch, 900, &"ünï".repeat(3000));
    let mut fs = frames(&body, 1000, 900);
    fs.reverse();
    let again = fs[2].clone();
    fs.insert(5, again);
    // Each in its own transaction: Postgres would fold identical ones in one.
    for f in &fs {
        raw_notify(&client, &ch, f).await;
    }
    let e = next(&mut l).await;
    assert_eq!(e.json(), body);
    assert_eq!(l.stats().snapshot().duplicate_chunks, 1);
}

#[tokio::test]
async fn missing_chunk_expires_and_later_events_still_arrive() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("gap");
    let limits = Limits { max_age: Duration::from_secs(1), ..Limits::default() };
    let mut l = db.listen_with(&[ch.clone()], ListenerOptions::default().limits(limits)).await;
    let fs = frames(&envelope(&ch, 901, &"x".repeat(5000)), 1000, 901);
    for f in fs.iter().skip(1) {
        raw_notify(&client, &ch, f).await;
    }
    until_stats(&l, |s| s.expired == 1).await;
    pgpubsub::publish(&client, &ch, "after the gap").await.unwrap();
    assert_eq!(next(&mut l).await.message().unwrap().payload, "after the gap");
}

#[tokio::test]
async fn malformed_corrupt_and_non_json_payloads_are_counted_not_delivered() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("bad");
    let mut l = db.listen(&[ch.clone()]).await;

    for bad in ["~c:garbage", "~x:1", "~r:abc:1", "~c:1:5:2:10:0123456789abcdef0123456789abcdef:d"] {
        raw_notify(&client, &ch, bad).await;
    }
    for not_json in ["hello", "{unclosed", ""] {
        raw_notify(&client, &ch, not_json).await;
    }
    // Right length, wrong digest.
    let body = envelope(&ch, 902, &"y".repeat(3000));
    for f in frames(&body, 1000, 902) {
        raw_notify(&client, &ch, &f.replace("yyyy", "yyyY")).await;
    }
    // A reference to an event the log does not have.
    raw_notify(&client, &ch, "~r:123456789:100").await;

    pgpubsub::publish(&client, &ch, "still fine").await.unwrap();
    assert_eq!(next(&mut l).await.message().unwrap().payload, "still fine");
    let s = l.stats().snapshot();
    assert_eq!((s.malformed, s.not_json, s.corrupt, s.fetch_failed), (4, 3, 1, 1), "{s:?}");
}

#[tokio::test]
async fn interleaved_messages_on_many_channels_do_not_mix() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let a = common::channel("mixa");
    let b = common::channel("mixb");
    let mut l = db.listen(&[a.clone(), b.clone()]).await;
    // Same seq on two channels, chunks interleaved: keyed by channel too.
    let ba = envelope(&a, 77, &"A".repeat(4000));
    let bb = envelope(&b, 77, &"B".repeat(4000));
    let (fa, fb) = (frames(&ba, 900, 77), frames(&bb, 900, 77));
    for (x, y) in fa.iter().zip(&fb) {
        raw_notify(&client, &a, x).await;
        raw_notify(&client, &b, y).await;
    }
    let mut got = [next(&mut l).await, next(&mut l).await];
    got.sort_by(|x, y| x.channel.cmp(&y.channel));
    assert_eq!((got[0].json(), got[1].json()), (ba.as_str(), bb.as_str()));
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
