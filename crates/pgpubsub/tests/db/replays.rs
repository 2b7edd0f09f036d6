//! Resumes sharing one read of the log ([`SharedReplays`]): each member of
//! a group gets every event once, in order, with the hub's live events
//! after; the reads are shared; and a member that subscribed after the
//! group's last read does not take that read for "caught up".
//!
//! Shown able to fail: with every read taken for "caught up", the late
//! member never gets `d`.

use std::sync::Arc;
use std::time::Duration;

use pgpubsub::{Cursor, Feed, FeedItem, Filter, Hub, Limits, LogConn, SharedReplays};

use crate::common::{self, TestDb, WAIT};

/// The next `n` events' payloads.
async fn payloads(feed: &mut Feed, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, feed.next()).await.unwrap().unwrap() {
            Some(FeedItem::Event { shared, .. }) => out.push(shared.event.message().unwrap().payload.clone()),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn resumes_from_one_position_share_reads_and_a_late_member_reads_on() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("shared");
    let log = Arc::new(LogConn::new(db.config.clone(), Duration::from_secs(10)));
    let hub = Hub::new(64);
    let replays = Arc::new(SharedReplays::new(&Limits::default()));
    let filter = Filter::channels([ch.as_str()]);
    let since = Cursor::default();
    let join = |replays: &Arc<SharedReplays>| {
        let replay = replays.replay(log.clone(), since, &[ch.as_str().to_string()]);
        Feed::with_replay(&hub, filter.clone(), Some((since, replay)))
    };
    for p in ["a", "b", "c"] {
        pgpubsub::publish(&client, &ch, p).await.unwrap();
    }
    // `waiting` holds the group's pages by never reading; `first` reads
    // them all, up to a read that says it is caught up.
    let waiting = join(&replays);
    let mut first = join(&replays);
    assert_eq!(payloads(&mut first, 3).await, ["a", "b", "c"]);
    // `first` reads on, finds nothing and waits for live events: the group's
    // second read, the one that says "caught up" to `first`.
    let second_read = async {
        while replays.reads() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        item = first.next() => panic!("nothing more was written: {item:?}"),
        done = tokio::time::timeout(WAIT, second_read) => done.unwrap(),
    }
    let reads = replays.reads();
    assert_eq!(reads, 2);

    // An event commits after that read and reaches the hub (a live
    // subscriber gets it) before `late` subscribes: the group's last read
    // cannot tell `late` it caught up; it reads on and finds it.
    let seq = pgpubsub::publish(&client, &ch, "d").await.unwrap();
    let d = pgpubsub::Event::decode(
        ch.as_str(),
        format!(r#"{{"seq":{seq},"txid":1,"kind":"message","channel":"{ch}","payload":"d"}}"#),
    )
    .unwrap();
    hub.publish_at(d, Cursor { txid: 1, seq });
    let mut late = join(&replays);
    assert_eq!(payloads(&mut late, 4).await, ["a", "b", "c", "d"]);
    assert_eq!(replays.joined(), 2, "both later resumes joined the first group");
    assert!(replays.reads() > reads, "the late member read on");

    // Live after the replay, nothing twice (`d` came once to `first`, live).
    assert_eq!(payloads(&mut first, 1).await, ["d"]);
    let seq = pgpubsub::publish(&client, &ch, "e").await.unwrap();
    let e = pgpubsub::Event::decode(
        ch.as_str(),
        format!(r#"{{"seq":{seq},"txid":2,"kind":"message","channel":"{ch}","payload":"e"}}"#),
    )
    .unwrap();
    hub.publish_at(e, Cursor { txid: 2, seq });
    assert_eq!(payloads(&mut late, 1).await, ["e"]);
    assert_eq!(payloads(&mut first, 1).await, ["e"]);
    drop(waiting);
}

/// A fast member does not make the group keep the whole backlog for a slow
/// one: past the shelf's bytes it goes on alone, and both still get every
/// event once, in order.
#[tokio::test]
async fn past_the_shelf_a_fast_member_goes_on_alone() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("shelf");
    let log = Arc::new(LogConn::new(db.config.clone(), Duration::from_secs(10)));
    let hub = Hub::new(64);
    // One page (500 events) fills the shelf.
    let replays = Arc::new(SharedReplays::new(&Limits::default()).shelf_bytes(1));
    let sql = "SELECT count(pubsub.publish($1, i::text)) FROM generate_series(1, 1200) i";
    client.execute(sql, &[&ch.as_str()]).await.unwrap();
    let join = || {
        let replay = replays.replay(log.clone(), Cursor::default(), &[ch.as_str().to_string()]);
        Feed::with_replay(&hub, Filter::channels([ch.as_str()]), Some((Cursor::default(), replay)))
    };
    let (mut slow, mut fast) = (join(), join());
    let want: Vec<String> = (1..=1200).map(|i| i.to_string()).collect();
    assert_eq!(payloads(&mut fast, 1200).await, want);
    // The group kept one page for `slow`; `fast` read the other two itself.
    assert_eq!(payloads(&mut slow, 1200).await, want);
    assert!(replays.reads() >= 5, "{}", replays.reads());
}

/// The gateway's pool resumes subscribers with the same read again and
/// again on one connection. PostgreSQL switches such a statement to a
/// generic plan after five runs; made while the log was empty (pruned,
/// truncated by VACUUM), that plan scanned the whole log, and every resume
/// after kept doing so as the log grew. The pool's connection now plans
/// each read anew: a resume near the end of a large log reads its index.
#[tokio::test]
async fn resumes_on_a_log_that_was_empty_read_it_through_its_index() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let ch = common::channel("regrown");
    common::emptied_log(&client, &ch).await;
    let log = Arc::new(LogConn::new(db.config.clone(), Duration::from_secs(10)));
    let hub = Hub::new(64);
    let replays = Arc::new(SharedReplays::new(&Limits::default()).sharing(false));
    let channels = [ch.as_str().to_string()];
    let start = common::LogScans::take(&client).await;
    // Seven resumes while the log is empty: each reads it once, finds
    // nothing and waits for live events.
    for i in 1..=7 {
        let replay = replays.replay(log.clone(), Cursor::default(), &channels);
        let mut feed = Feed::with_replay(&hub, Filter::channels([ch.as_str()]), Some((Cursor::default(), replay)));
        let read = async {
            while replays.reads() < i {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            item = feed.next() => panic!("the log is empty: {item:?}"),
            done = tokio::time::timeout(WAIT, read) => done.unwrap(),
        }
    }
    // The log grows large; ten events at its end follow `since`.
    let row = client
        .query_one(
            "SELECT pg_current_xact_id()::text, max(pubsub.publish($1, 'new ' || i)) FROM generate_series(1, 20000) i",
            &[&ch.as_str()],
        )
        .await
        .unwrap();
    let since = Cursor { txid: row.get::<_, &str>(0).parse().unwrap(), seq: row.get(1) };
    for i in 0..10 {
        pgpubsub::publish(&client, &ch, &format!("last {i}")).await.unwrap();
    }
    // Every read so far is counted before the baseline.
    start.whole_log_scans_after(&client, replays.reads() as i64).await;
    let counted = common::LogScans::take(&client).await;
    let before = replays.reads();
    let replay = replays.replay(log.clone(), since, &channels);
    let mut feed = Feed::with_replay(&hub, Filter::channels([ch.as_str()]), Some((since, replay)));
    let want: Vec<String> = (0..10).map(|i| format!("last {i}")).collect();
    assert_eq!(payloads(&mut feed, 10).await, want);
    let whole = counted.whole_log_scans_after(&client, (replays.reads() - before) as i64).await;
    assert_eq!(whole, 0, "a resume of 10 events scanned the whole log");
}
