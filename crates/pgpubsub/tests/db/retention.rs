//! Retention: what `pubsub.prune` deletes by age and by count, and the mark
//! it leaves for subscribers behind it.

use std::time::Duration;

use pgpubsub::retention::{prune, Retention};

use crate::common::{self, TestDb};

/// Publishes one message per age (minutes ago, by created_at); returns the seqs.
async fn aged(client: &tokio_postgres::Client, minutes_ago: &[i32]) -> Vec<i64> {
    let ch = common::channel("aged");
    let mut seqs = Vec::new();
    for &m in minutes_ago {
        let seq = pgpubsub::publish(client, &ch, &format!("{m} minutes ago")).await.unwrap();
        client
            .execute(
                "UPDATE pubsub.events SET created_at = clock_timestamp() - make_interval(mins => $2) WHERE seq = $1",
                &[&seq, &m],
            )
            .await
            .unwrap();
        seqs.push(seq);
    }
    seqs
}

async fn left(client: &tokio_postgres::Client) -> Vec<i64> {
    client.query("SELECT seq FROM pubsub.events ORDER BY seq", &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

async fn mark(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT pruned_seq FROM pubsub.retention", &[]).await.unwrap().get(0)
}

const HOUR: Option<Duration> = Some(Duration::from_secs(3600));

#[tokio::test]
async fn by_age_the_old_go_and_the_young_stay() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let s = aged(&client, &[300, 120, 61, 59, 1, 0]).await;
    assert_eq!(prune(&client, Retention::new(HOUR, None)).await.unwrap(), 3);
    assert_eq!(left(&client).await, s[3..]);
    assert_eq!(mark(&client).await, s[2]);
    // Nothing more is old enough.
    assert_eq!(prune(&client, Retention::new(HOUR, None)).await.unwrap(), 0);
    // Everything old: all of it goes.
    assert_eq!(prune(&client, Retention::new(Some(Duration::ZERO), None)).await.unwrap(), 3);
    assert!(left(&client).await.is_empty());
}

/// The oldest first along the key: an old event behind a younger one (a
/// late commit) waits for a later prune; the log keeps at least the policy.
#[tokio::test]
async fn by_age_an_old_event_behind_a_young_one_waits() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let s = aged(&client, &[120, 5, 120, 5]).await;
    assert_eq!(prune(&client, Retention::new(HOUR, None)).await.unwrap(), 1);
    assert_eq!(left(&client).await, s[1..]);
}

#[tokio::test]
async fn by_count_and_by_both_the_larger_cut_wins() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let s = aged(&client, &[300, 200, 100, 3, 2, 1]).await;
    assert_eq!(prune(&client, Retention::new(None, Some(5))).await.unwrap(), 1);
    assert_eq!(left(&client).await, s[1..]);
    // Age would keep 3, count keeps 4: age wins.
    assert_eq!(prune(&client, Retention::new(HOUR, Some(4))).await.unwrap(), 2);
    assert_eq!(left(&client).await, s[3..]);
    // Count keeps 1, age would keep 3: count wins.
    assert_eq!(prune(&client, Retention::new(HOUR, Some(1))).await.unwrap(), 2);
    assert_eq!(left(&client).await, s[5..]);
    assert_eq!(mark(&client).await, s[4]);
    assert_eq!(prune(&client, Retention::default()).await.unwrap(), 0);
}

/// On an empty log nothing happens and the mark stays.
#[tokio::test]
async fn an_empty_log_prunes_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    assert_eq!(prune(&client, Retention::new(HOUR, Some(0))).await.unwrap(), 0);
    assert_eq!(mark(&client).await, 0);
}
