//! Migrations: up is idempotent, down reverts one step, up again restores;
//! a plain migrate touches nothing outside the pubsub schema.

use crate::common::TestDb;

async fn tables_outside_pubsub(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema', 'pubsub') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn up_down_up() {
    let db = TestDb::bare().await;
    let mut client = db.client().await;

    let first = pgpubsub::migrate::up(&mut client, false).await.unwrap();
    assert_eq!(first.len(), 11);
    assert!(pgpubsub::migrate::up(&mut client, false).await.unwrap().is_empty(), "second up changes nothing");
    // Only dbmate's own bookkeeping table appears outside the schema.
    assert_eq!(tables_outside_pubsub(&client).await, vec!["public.schema_migrations".to_string()]);
    let versions: Vec<String> = client
        .query("SELECT version FROM schema_migrations ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        versions,
        vec![
            "20261121000100",
            "20261121000200",
            "20261121000300",
            "20261121000400",
            "20261130000100",
            "20261130000200",
            "20261207000100",
            "20261207000200",
            "20261207000300",
            "20261207000400",
            "20261207000500"
        ]
    );

    // With the example: job and notification appear.
    let ex = pgpubsub::migrate::up(&mut client, true).await.unwrap();
    assert_eq!(ex.iter().map(|m| m.name).collect::<Vec<_>>(), vec!["job_example"]);
    assert!(tables_outside_pubsub(&client).await.contains(&"public.job".to_string()));

    // Down, one step at a time, most recent first.
    let mut reverted = Vec::new();
    while let Some(m) = pgpubsub::migrate::down(&mut client).await.unwrap() {
        reverted.push(m.name);
    }
    assert_eq!(
        reverted,
        vec![
            "pubsub_row_views_plans",
            "pubsub_capture_wake",
            "pubsub_row_views_classes",
            "pubsub_row_views",
            "pubsub_capture",
            "pubsub_wal",
            "pubsub_log_only",
            "job_example",
            "pubsub_prune_by_key",
            "pubsub_message_payload",
            "pubsub_store",
            "pubsub_log"
        ]
    );
    let schema: Option<String> = client
        .query_one("SELECT nspname::text FROM pg_namespace WHERE nspname = 'pubsub'", &[])
        .await
        .map(|r| r.get(0))
        .ok();
    assert_eq!(schema, None);
    assert!(pgpubsub::migrate::status(&client).await.unwrap().iter().all(|s| !s.applied));

    // And up again, working as before.
    assert_eq!(pgpubsub::migrate::up(&mut client, false).await.unwrap().len(), 11);
    let ch = pgpubsub::Channel::new("again").unwrap();
    assert!(pgpubsub::publish(&client, &ch, "x").await.unwrap() > 0);
}

#[tokio::test]
async fn down_removes_triggers_from_watched_tables_and_leaves_other_versions() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    client.batch_execute("CREATE TABLE keep (id int primary key)").await.unwrap();
    pgpubsub::watch(&client, "keep", None).await.unwrap();
    client.batch_execute("CREATE TABLE keep_wal (id int primary key)").await.unwrap();
    pgpubsub::watch::watch_wal(&client, "keep_wal", None).await.unwrap();
    // A user's own dbmate migration in the same table stays put.
    client.batch_execute("INSERT INTO schema_migrations VALUES ('20990101000000')").await.unwrap();
    while pgpubsub::migrate::down(&mut client).await.unwrap().is_some() {}
    // The table works without the schema, and has no trigger left.
    client.batch_execute("INSERT INTO keep VALUES (1)").await.unwrap();
    let triggers: i64 =
        client.query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'keep'::regclass", &[]).await.unwrap().get(0);
    assert_eq!(triggers, 0);
    // Nor is any table left in a publication of ours.
    let published: i64 = client
        .query_one("SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgpubsub%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 0);
    client.batch_execute("INSERT INTO keep_wal VALUES (1)").await.unwrap();
    let left: i64 = client.query_one("SELECT count(*) FROM schema_migrations", &[]).await.unwrap().get(0);
    assert_eq!(left, 1);
}

#[tokio::test]
async fn concurrent_migrators_apply_each_step_once() {
    let db = TestDb::bare().await;
    let mut a = db.client().await;
    let mut b = db.client().await;
    let (ra, rb) = tokio::join!(pgpubsub::migrate::up(&mut a, false), pgpubsub::migrate::up(&mut b, false));
    assert_eq!(ra.unwrap().len() + rb.unwrap().len(), pgpubsub::migrate::all().iter().filter(|m| !m.example).count());
}

#[tokio::test]
async fn not_migrated_is_a_clear_error() {
    let db = TestDb::bare().await;
    let client = db.client().await;
    let ch = pgpubsub::Channel::new("x").unwrap();
    let err = pgpubsub::publish(&client, &ch, "x").await.unwrap_err();
    assert!(matches!(err, pgpubsub::Error::NotMigrated), "{err}");
    // The library says what is wrong in its own words; the binary adds how
    // to fix it in its own (`pgpubsub migrate`, tested in the CLI's tests).
    assert!(err.to_string().contains("apply its migrations first"), "{err}");
    assert!(!err.to_string().contains("pgpubsub migrate"), "{err}");
}

/// Whether the schema is missing is decided by SQLSTATE, never by the
/// message: a caller's missing table or schema stays a database error with
/// its SQLSTATE, even one named like ours (the message used to be searched
/// for "pubsub" and "payload"), and the same calls on a database without
/// the schema say it is not migrated.
#[tokio::test]
async fn a_callers_missing_table_is_not_a_missing_schema() {
    let db = TestDb::new().await;
    let client = db.client().await;
    for (table, sqlstate) in [("pubsub_orders", "42P01"), ("payload", "42P01"), ("no_such_schema.pubsub", "3F000")] {
        let err = pgpubsub::watch(&client, table, None).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some(sqlstate), "{table}: {err}");
        let err = pgpubsub::unwatch(&client, table).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some(sqlstate), "{table}: {err}");
    }
    let bare = TestDb::bare().await;
    let client = bare.client().await;
    client.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)").await.unwrap();
    for table in ["orders", "no_such_table"] {
        let err = pgpubsub::watch(&client, table, None).await.unwrap_err();
        assert!(matches!(err, pgpubsub::Error::NotMigrated), "{table}: {err}");
        let err = pgpubsub::watch::watch_wal(&client, table, None).await.unwrap_err();
        assert!(matches!(err, pgpubsub::Error::NotMigrated), "{table}: {err}");
    }
}

#[tokio::test]
async fn sql_side_refuses_bad_channels_and_non_tables() {
    let db = TestDb::new().await;
    let client = db.client().await;
    for bad in ["", "has space", "1starts_with_digit", &"x".repeat(64), "quo\"te"] {
        let err = client.execute("SELECT pubsub.publish($1, 'x')", &[&bad]).await.unwrap_err();
        assert!(err.as_db_error().unwrap().message().contains("invalid channel name"), "{bad:?}");
    }
    client.batch_execute("CREATE VIEW v AS SELECT 1 AS one").await.unwrap();
    let err = pgpubsub::watch(&client, "v", None).await.unwrap_err();
    assert!(err.to_string().contains("is not a table"), "{err}");
    let err = pgpubsub::watch(&client, "no_such_table", None).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42P01"), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    // Injection through the table name is just a name that does not exist.
    let err = pgpubsub::watch(&client, "x; DROP SCHEMA pubsub CASCADE", None).await.unwrap_err();
    assert!(err.sqlstate().is_some(), "{err}");
    assert!(pgpubsub::watch::watches(&client).await.is_ok());
}
