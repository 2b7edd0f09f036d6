//! The scratch tables of the comparison and the statements that write them.

use anyhow::Context;
use tokio_postgres::Client;

use super::Target;
use crate::load::workload::{teardown, SCHEMA};

/// The scratch schema: the four tables, the seed's trigger, the watches,
/// and the message table of the publish comparison.
pub(super) async fn setup(admin: &Client, wal: bool) -> anyhow::Result<()> {
    teardown(admin).await?;
    let mut sql = format!("CREATE SCHEMA {SCHEMA};");
    for t in Target::tables(true) {
        sql.push_str(&format!(
            "CREATE TABLE {SCHEMA}.{} (id bigserial PRIMARY KEY, writer int NOT NULL, n bigint NOT NULL, \
             t bigint NOT NULL);",
            t.name()
        ));
    }
    sql.push_str(&format!(
        "CREATE TABLE {SCHEMA}.msgs (id bigserial PRIMARY KEY, payload text NOT NULL);
         CREATE FUNCTION {SCHEMA}.seed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify('{}', row_to_json(NEW)::text); RETURN NULL; END $$;
         CREATE TRIGGER seed AFTER INSERT ON {SCHEMA}.seed FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.seed_notify();",
        Target::Seed.channel().unwrap_or_default()
    ));
    admin.batch_execute(&sql).await.context("creating the load tables")?;
    for (t, inline) in [(Target::Inline, true), (Target::Watched, false)] {
        admin
            .execute(
                "SELECT pubsub.watch($1::text::regclass, $2, $3)",
                &[&format!("{SCHEMA}.{}", t.name()), &t.channel(), &inline],
            )
            .await
            .with_context(|| format!("watching {SCHEMA}.{}", t.name()))?;
    }
    if wal {
        let t = Target::Wal;
        admin
            .execute(
                "SELECT pubsub.watch_wal($1::text::regclass, $2)",
                &[&format!("{SCHEMA}.{}", t.name()), &t.channel()],
            )
            .await
            .with_context(|| format!("watching {SCHEMA}.{} through the WAL", t.name()))?;
    }
    Ok(())
}

/// The statement a writer repeats.
pub(super) fn statement(target: Target) -> String {
    match target {
        Target::Insert => format!("INSERT INTO {SCHEMA}.msgs (payload) VALUES ($1)"),
        Target::Publish => "SELECT pubsub.publish($1, $2)".into(),
        Target::PublishWal => "INSERT INTO pubsub.wal_messages (channel, payload) VALUES ($1, $2)".into(),
        t => format!("INSERT INTO {SCHEMA}.{} (writer, n, t) VALUES ($1, $2, $3)", t.name()),
    }
}

/// A message of exactly `bytes` bytes (at least its head) that starts with
/// `writer:n:t:`, the tag the probe reads.
pub(super) fn message(writer: i32, n: i64, t: i64, bytes: usize) -> String {
    let mut m = format!("{writer}:{n}:{t}:");
    let pad = bytes.saturating_sub(m.len());
    m.push_str(&"x".repeat(pad));
    m
}
