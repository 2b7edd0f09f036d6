//! Payloads of every size arrive whole and byte-identical, whichever way
//! they travel (one notification, chunks, or a reference to the log).

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
async fn every_size_arrives_identical_in_chunks() {
    let db = db_with_threshold(64 << 20).await;
    let s = round_trip(&db, &SIZES).await;
    assert_eq!(s.fetched, 0);
    // 5 MB alone is over 600 chunks.
    assert!(s.chunks > 600, "{s:?}");
    assert_eq!((s.corrupt, s.malformed, s.duplicate_chunks), (0, 0, 0));
}

#[tokio::test]
async fn every_size_arrives_identical_by_reference() {
    let db = db_with_threshold(8_000).await;
    let s = round_trip(&db, &SIZES).await;
    assert_eq!((s.fetched, s.chunks), (SIZES.len() as u64, 0), "{s:?}");
}

#[tokio::test]
async fn default_threshold_chunks_mid_sizes_and_references_huge_ones() {
    let db = TestDb::new().await;
    let s = round_trip(&db, &SIZES).await;
    assert_eq!(s.fetched, 1, "only 5 MB goes by reference: {s:?}");
    assert!(s.chunks >= 4 + 13, "{s:?}");
}

/// The encoder's own boundary: a body of 7,999 bytes is one notification,
/// 8,000 bytes is chunked (pg_notify refuses payloads of 8000 bytes or more).
#[tokio::test]
async fn encoder_boundary_is_exactly_8000_bytes() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("edge");
    let mut l = db.listen(&[ch.clone()]).await;
    for (len, chunked) in [(7_999usize, false), (8_000, true), (8_001, true)] {
        let head = format!(r#"{{"seq":1,"kind":"message","channel":"{ch}","payload":""#);
        let body = format!("{head}{}\"}}", "é".repeat((len - head.len() - 2) / 2));
        let body = if body.len() < len { body.replacen("\"payload\":\"", "\"payload\":\"x", 1) } else { body };
        assert_eq!(body.len(), len);
        let before = l.stats().snapshot().chunks;
        // A seq of its own per body: a seq names one event (the log's key).
        let seq = len as i64;
        client.execute("SELECT pubsub.send($1, $2, $3)", &[&ch.as_str(), &seq, &body]).await.unwrap();
        let e = next(&mut l).await;
        assert_eq!(e.json(), body);
        assert_eq!(l.stats().snapshot().chunks > before, chunked, "{len} bytes");
    }
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
    pgpubsub::publish(&client, &ch, &"c".repeat(30_000)).await.unwrap(); // chunked
    pgpubsub::publish(&client, &ch, &"r".repeat(60_000)).await.unwrap(); // reference
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
    let (raw, mut conn) = db.config.connect(tokio_postgres::NoTls).await.unwrap();
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
