//! Payloads of every size arrive whole and byte-identical, whichever way
//! they are stored (in the body, or a large message's payload apart), read
//! back from the log.

use pgpubsub::{Channel, ListenerOptions};

use crate::common::{self, next, TestDb};

/// Exactly `bytes` bytes of text mixing 1- to 4-byte characters and
/// characters JSON must escape, so chunk boundaries fall inside characters.
fn payload(bytes: usize) -> String {
    const PATTERN: [char; 8] = ['a', 'é', '€', '😀', '"', '\\', '\n', '\u{1}'];
    let mut s = String::with_capacity(bytes);
    for c in PATTERN.iter().cycle() {
        if s.len() == bytes {
            break;
        }
        s.push(if s.len() + c.len_utf8() <= bytes { *c } else { 'z' });
    }
    s
}

/// A database whose encoder sends bodies over `threshold` bytes by reference.
async fn db_with_threshold(threshold: u64) -> TestDb {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("ALTER DATABASE {} SET pubsub.ref_threshold = {threshold}", db.name))
        .await
        .unwrap();
    db
}

async fn round_trip(db: &TestDb, sizes: &[usize]) -> pgpubsub::StatsSnapshot {
    let client = db.client().await;
    let ch = common::channel("size");
    let mut l = db.listen(&[ch.clone()]).await;
    for &n in sizes {
        let sent = payload(n);
        assert_eq!(sent.len(), n);
        let seq = pgpubsub::publish(&client, &ch, &sent).await.unwrap();
        let e = next(&mut l).await;
        assert_eq!(e.seq, Some(seq));
        let got = &e.message().unwrap().payload;
        assert!(got == &sent, "payload of {n} bytes altered (got {} bytes)", got.len());
    }
    l.stats().snapshot()
}

const SIZES: [usize; 6] = [7_998, 7_999, 8_000, 8_001, 100_000, 5_000_000];

#[tokio::test]
async fn every_size_arrives_identical_from_the_log() {
    let db = TestDb::new().await;
    let s = round_trip(&db, &SIZES).await;
    // Nothing of it travelled in a notification.
    assert_eq!((s.chunks, s.foreign, s.malformed), (0, 0, 0), "{s:?}");
}

#[tokio::test]
async fn a_large_row_never_fails_the_write_and_arrives_whole() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client.batch_execute("CREATE TABLE docs (id int PRIMARY KEY, body text)").await.unwrap();
    let ch = common::channel("docs");
    pgpubsub::watch(&client, "docs", Some(&ch)).await.unwrap();
    let mut l = db.listen(&[ch]).await;
    for (id, n) in [(1, 20_000usize), (2, 300_000), (3, 20_000_000)] {
        let text = payload(n).replace('\u{1}', "x");
        client.execute("INSERT INTO docs VALUES ($1, $2)", &[&id, &text]).await.unwrap();
        let e = next(&mut l).await;
        #[derive(serde::Deserialize)]
        struct Doc {
            id: i32,
            body: String,
        }
        let doc: Doc = e.change().unwrap().new_as().unwrap().unwrap();
        assert_eq!(doc.id, id);
        assert!(doc.body == text, "row of {n} bytes altered");
    }
}

#[tokio::test]
async fn events_over_the_listener_limit_are_dropped_and_counted() {
    let db = db_with_threshold(50_000).await;
    let client = db.client().await;
    let ch = Channel::new(common::unique("limit")).unwrap();
    let limits = pgpubsub::Limits { max_event_bytes: 20_000, ..Default::default() };
    let mut l = db.listen_with(&[ch.clone()], ListenerOptions::default().limits(limits)).await;
    pgpubsub::publish(&client, &ch, &"c".repeat(30_000)).await.unwrap(); // in the body
    pgpubsub::publish(&client, &ch, &"r".repeat(60_000)).await.unwrap(); // logged apart
    pgpubsub::publish(&client, &ch, "small").await.unwrap();
    assert_eq!(next(&mut l).await.message().unwrap().payload, "small");
    let s = l.stats().snapshot();
    assert_eq!(s.oversize, 2, "{s:?}");
}

/// The raw notifications, seen by a bare LISTEN connection: every one under
/// 8000 bytes, and cuts that back off from inside a character.
#[tokio::test]
async fn chunks_stay_under_the_limit_and_cut_between_characters() {
    use futures_util::StreamExt;
    use tokio_postgres::AsyncMessage;

    let db = TestDb::new().await;
    let ch = common::channel("raw");
    let (raw, mut conn) = pgpubsub::db::open(&db.config).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    raw.batch_execute(&format!("LISTEN \"{ch}\"")).await.unwrap();

    // The encoder itself, on a body whose layout is known: one ASCII byte,
    // then 3-byte characters starting at offsets 1, 4, 7, … Offset 7,800 is
    // the last byte of a character, so the first cut must move back to 7,798.
    let body = format!("a{}", "€".repeat(10_000));
    let client = db.client().await;
    client.execute("SELECT pubsub.send($1, 1, $2)", &[&ch.as_str(), &body]).await.unwrap();

    let mut datas = Vec::new();
    let mut frames = Vec::new();
    loop {
        let p = tokio::time::timeout(common::WAIT, rx.recv()).await.unwrap().unwrap();
        frames.push(p.clone());
        assert!(p.len() < 8000, "a notification of {} bytes", p.len());
        let Ok(pgpubsub::wire::Frame::Chunk(c)) = pgpubsub::wire::parse(&p) else { panic!("not a chunk: {p:.80}") };
        datas.push(c.data.len());
        if datas.len() == c.count as usize {
            break;
        }
    }
    assert_eq!(datas[0], 7_798, "{datas:?}");
    assert_eq!(frames, pgpubsub::wire::encode_chunks(1, &body, pgpubsub::wire::CHUNK_DATA_BYTES));
    assert!(datas.iter().all(|&n| n <= 7_800), "{datas:?}");
    assert_eq!(datas.iter().sum::<usize>(), body.len());
}

/// Every character JSON escapes (all of U+0000 is refused by PostgreSQL
/// text, so from U+0001), DEL, multi-byte ones, repeated past `bytes`.
fn every_escape(bytes: usize) -> String {
    let unit: String = (1u8..0x80).map(char::from).chain(['é', '€', '😀', '\u{2028}']).collect();
    unit.repeat(bytes / unit.len() + 1)
}

/// How a message over the reference threshold is logged: envelope in body,
/// payload apart and unescaped.
async fn logged_apart(client: &tokio_postgres::Client, seq: i64) -> (String, Option<String>, String) {
    let r = client
        .query_one("SELECT body, payload, pubsub.event_json(e) FROM pubsub.events e WHERE seq = $1", &[&seq])
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test]
async fn large_messages_are_logged_unescaped_and_arrive_as_postgres_renders_them() {
    let db = db_with_threshold(8_000).await;
    let client = db.client().await;
    let ch = common::channel("apart");
    let mut l = db.listen(&[ch.clone()]).await;
    for sent in [every_escape(9_000), payload(300_000), every_escape(2_000_000)] {
        let seq = pgpubsub::publish(&client, &ch, &sent).await.unwrap();
        let (body, stored, rendered) = logged_apart(&client, seq).await;
        assert!(stored.as_deref() == Some(sent.as_str()), "the payload is stored as sent");
        assert!(!body.contains("payload") && body.ends_with('}'), "{body}");
        // What PostgreSQL itself renders, to_json and all, is what arrives.
        let e = next(&mut l).await;
        assert_eq!(e.seq, Some(seq));
        assert!(e.json() == rendered, "rendered differently: {:.200}", e.json());
        assert!(e.message().unwrap().payload == sent);
        assert!(e.json().starts_with(body.strip_suffix('}').unwrap()));
    }
    let s = l.stats().snapshot();
    assert_eq!(s.not_json, 0, "{s:?}");
}

#[tokio::test]
async fn messages_under_the_threshold_are_logged_as_delivered() {
    let db = db_with_threshold(300_000).await;
    let client = db.client().await;
    let ch = common::channel("whole");
    // Over the threshold once escaped, under it as sent: still one body, by reference.
    let sent = "\u{1}".repeat(100_000);
    let seq = pgpubsub::publish(&client, &ch, &sent).await.unwrap();
    let (body, stored, rendered) = logged_apart(&client, seq).await;
    assert_eq!(stored, None);
    assert_eq!(body, rendered);
    assert!(body.len() > 600_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_renders_messages_logged_apart() {
    let db = db_with_threshold(8_000).await;
    let client = db.client().await;
    let ch = common::channel("apart_catchup");
    let name = common::unique("apart");
    let options = || ListenerOptions::default().name(name.clone());
    db.listen_with(&[ch.clone()], options()).await.close().await.unwrap();
    // While it is down: only the log has these.
    let sent = [every_escape(50_000), "small".to_string(), payload(1_000_000)];
    let mut seqs = Vec::new();
    for p in &sent {
        seqs.push(pgpubsub::publish(&client, &ch, p).await.unwrap());
    }
    let mut l = db.listen_with(&[ch.clone()], options()).await;
    for (p, seq) in sent.iter().zip(seqs) {
        let e = next(&mut l).await;
        assert_eq!(e.seq, Some(seq));
        assert!(e.message().unwrap().payload == *p);
        assert!(e.json() == logged_apart(&client, seq).await.2);
    }
}

/// The listener's limit is on the JSON delivered, not the bytes stored:
/// 10,000 control characters are 10 kB stored and 60 kB as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_limit_counts_the_rendered_json_live_and_in_catch_up() {
    let db = db_with_threshold(8_000).await;
    let client = db.client().await;
    let ch = Channel::new(common::unique("apart_limit")).unwrap();
    let name = common::unique("limit");
    let limits = pgpubsub::Limits { max_event_bytes: 20_000, ..Default::default() };
    let options = || ListenerOptions::default().limits(limits.clone()).name(name.clone());
    let mut l = db.listen_with(&[ch.clone()], options()).await;
    pgpubsub::publish(&client, &ch, &"\u{1}".repeat(10_000)).await.unwrap();
    pgpubsub::publish(&client, &ch, &"x".repeat(10_000)).await.unwrap();
    assert_eq!(next(&mut l).await.message().unwrap().payload, "x".repeat(10_000));
    assert_eq!(l.stats().snapshot().oversize, 1);
    l.close().await.unwrap();

    pgpubsub::publish(&client, &ch, &"\u{1}".repeat(10_000)).await.unwrap();
    pgpubsub::publish(&client, &ch, "after").await.unwrap();
    let mut l = db.listen_with(&[ch.clone()], options()).await;
    // At least once: the x's may come again; the refused one never comes.
    let mut got = next(&mut l).await.message().unwrap().payload.clone();
    while got != "after" {
        assert_eq!(got, "x".repeat(10_000));
        got = next(&mut l).await.message().unwrap().payload.clone();
    }
    assert!(l.stats().snapshot().oversize >= 1, "{:?}", l.stats().snapshot());
}

/// A hand-written row with its payload apart but no envelope to put it in
/// is skipped and counted; the next event is untouched.
#[tokio::test]
async fn a_logged_payload_without_an_envelope_is_refused() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("apart_bad");
    let mut l = db.listen(&[ch.clone()]).await;
    for body in ["[]", "{}", "not json"] {
        let seq: i64 = client.query_one("SELECT nextval('pubsub.events_seq')", &[]).await.unwrap().get(0);
        client
            .execute(
                "INSERT INTO pubsub.events (seq, channel, body, payload) VALUES ($1, $2, $3, 'p')",
                &[&seq, &ch.as_str(), &body],
            )
            .await
            .unwrap();
        common::raw_notify(&client, &ch, &format!("~r:{seq}:{}", body.len() + 1)).await;
    }
    pgpubsub::publish(&client, &ch, "fine").await.unwrap();
    assert_eq!(next(&mut l).await.message().unwrap().payload, "fine");
    let s = l.stats().snapshot();
    assert_eq!(s.not_json, 3, "{s:?}");
}

/// Reverting the migration puts each payload back into its body.
#[tokio::test]
async fn migrating_down_renders_payloads_into_bodies() {
    let db = db_with_threshold(8_000).await;
    let mut client = db.client().await;
    let ch = common::channel("apart_down");
    let sent = every_escape(20_000);
    let seq = pgpubsub::publish(&client, &ch, &sent).await.unwrap();
    let rendered = logged_apart(&client, seq).await.2;
    // Down to just before the migration that logs payloads apart.
    while let Some(m) = pgpubsub::migrate::down(&mut client).await.unwrap() {
        if m.name == "pubsub_message_payload" {
            break;
        }
    }
    let body: String = client.query_one("SELECT body FROM pubsub.events WHERE seq = $1", &[&seq]).await.unwrap().get(0);
    assert!(body == rendered);
    // The older schema publishes as before; up again logs large ones apart.
    let old = pgpubsub::publish(&client, &ch, &sent).await.unwrap();
    pgpubsub::migrate::up(&mut client, false).await.unwrap();
    assert_eq!(logged_apart(&client, old).await.1, None);
    let new = pgpubsub::publish(&client, &ch, &sent).await.unwrap();
    assert!(logged_apart(&client, new).await.1.is_some());
}

/// Large and small messages in one transaction arrive in the order they were
/// published, and a forged reference notified among them changes nothing.
#[tokio::test]
async fn mixed_sizes_and_a_forged_reference_keep_the_published_order() {
    let db = db_with_threshold(20_000).await;
    let client = db.client().await;
    let ch = common::channel("order");
    let mut l = db.listen(&[ch.clone()]).await;
    let sizes = [300_000usize, 10, 50_000, 12_000, 2_000_000, 5, 30_000, 1_000_000, 9_000, 25_000];
    let mut sent = Vec::new();
    // One transaction: every notification arrives at once, at commit.
    client.batch_execute("BEGIN").await.unwrap();
    for round in 0..4 {
        for (i, &n) in sizes.iter().enumerate() {
            if round == 2 && i == 3 {
                common::raw_notify(&client, &ch, "~r:999999999:100").await; // no such event
            }
            let p = format!("{round}:{i}:{}", payload(n));
            sent.push((pgpubsub::publish(&client, &ch, &p).await.unwrap(), p));
        }
    }
    client.batch_execute("COMMIT").await.unwrap();
    for (seq, p) in &sent {
        let e = next(&mut l).await;
        assert_eq!(e.seq, Some(*seq));
        assert!(e.message().unwrap().payload == *p, "event {seq} altered");
    }
}
