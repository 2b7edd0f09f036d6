//! The workload: a scratch schema with watched tables, and writers that fill
//! them. Every row carries (writer, n) to count losses and `t`, the writer's
//! clock when the statement was sent, to measure latency. A batch is one
//! multi-row INSERT (one statement, one transaction), so `t` is the moment
//! its commit began.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgpubsub::db::Config;
use tokio_postgres::Client;

use super::probe::now_us;

/// Schema the load test owns (dropped and made anew on every run).
pub const SCHEMA: &str = "pgpubsub_load";

/// Which trigger the tables carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// None: the cost of the write alone.
    None,
    /// A trigger that only does `pg_notify(channel, row_to_json(NEW))`.
    NotifyOnly,
    /// pgpubsub's capture trigger (log, and a wake-up while a listener waits).
    Pubsub,
    /// pgpubsub's capture trigger in `watch --inline` mode (log, and the
    /// event in the payload), so a bare LISTEN baseline has payloads to read.
    PubsubInline,
}

/// The channel of table `i`.
pub fn channel(i: usize) -> String {
    format!("pgpubsub_load_{i}")
}

/// Creates `tables` fresh tables with the given trigger.
pub async fn setup(client: &Client, tables: usize, trigger: Trigger) -> anyhow::Result<()> {
    teardown(client).await?;
    let mut sql = format!("CREATE SCHEMA {SCHEMA};");
    sql.push_str(&format!(
        "CREATE FUNCTION {SCHEMA}.notify_only() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify(TG_ARGV[0], row_to_json(NEW)::text); RETURN NULL; END $$;"
    ));
    for i in 0..tables {
        sql.push_str(&format!(
            "CREATE TABLE {SCHEMA}.t{i} (id bigserial PRIMARY KEY, writer int NOT NULL, n bigint NOT NULL, \
             t bigint NOT NULL, pad text NOT NULL);"
        ));
        if trigger == Trigger::NotifyOnly {
            sql.push_str(&format!(
                "CREATE TRIGGER notify_only AFTER INSERT ON {SCHEMA}.t{i} FOR EACH ROW \
                 EXECUTE FUNCTION {SCHEMA}.notify_only('{}');",
                channel(i)
            ));
        }
    }
    client.batch_execute(&sql).await.context("creating the load tables")?;
    if matches!(trigger, Trigger::Pubsub | Trigger::PubsubInline) {
        let inline = trigger == Trigger::PubsubInline;
        for i in 0..tables {
            client
                .execute(
                    "SELECT pubsub.watch($1::text::regclass, $2, $3)",
                    &[&format!("{SCHEMA}.t{i}"), &channel(i), &inline],
                )
                .await
                .context("watching a load table")?;
        }
    }
    Ok(())
}

/// Drops the scratch schema and the load events from the log.
pub async fn teardown(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
             DO $$ BEGIN
               IF to_regclass('pubsub.events') IS NOT NULL THEN
                 DELETE FROM pubsub.events WHERE channel LIKE 'pgpubsub\\_load\\_%';
               END IF;
               IF to_regclass('pubsub.wal_watches') IS NOT NULL THEN
                 DELETE FROM pubsub.wal_watches WHERE channel LIKE 'pgpubsub\\_load\\_%';
                 DELETE FROM pubsub.wal_messages WHERE channel LIKE 'pgpubsub\\_load\\_%';
               END IF;
             END $$;"
        ))
        .await
        .context("dropping the load schema")
}

/// What the writers are to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub writers: usize,
    pub batch: u64,
    pub rows: Option<u64>,
    pub duration: Option<Duration>,
    /// Rows per second in all (None: as fast as possible).
    pub rate: Option<f64>,
    pub payload: usize,
    pub tables: usize,
    /// Also update and then delete every row (3 events per row).
    pub mixed: bool,
    /// No rows: plain `pg_notify` of `payload` bytes, `batch` per
    /// transaction (the database's own byte rate).
    pub raw: bool,
    /// No rows: `pubsub.publish` of `payload` bytes, `batch` per transaction.
    pub publish: bool,
}

/// What the writers did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    pub rows: u64,
    pub events: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Written {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the writers to the end of the plan; `progress` counts rows written.
pub async fn write(config: &Config, plan: &Plan, progress: Arc<AtomicU64>) -> anyhow::Result<Written> {
    let pad = Arc::new("x".repeat(plan.payload));
    let start = Instant::now();
    let deadline = plan.duration.map(|d| start + d);
    let per_writer = plan.rows.map(|r| r.div_ceil(plan.writers as u64));
    let mut tasks = Vec::new();
    for w in 0..plan.writers {
        let client = pgpubsub::db::connect(config).await.context("connecting a writer")?;
        // A custom plan folds each parameter into a fresh plan: a copy of
        // every megabyte payload per statement, which doubled the cost of
        // writing 1 MB events (docs/performance.md). Generic plans pass the
        // parameters by reference, as a prepared statement reused by an
        // application does after its first five runs.
        client.batch_execute("SET plan_cache_mode = force_generic_plan").await.context("configuring a writer")?;
        let (pad, progress, plan) = (pad.clone(), progress.clone(), plan.clone());
        let quota = per_writer.map(|q| q.min(plan.rows.unwrap_or(u64::MAX).saturating_sub(q * w as u64)));
        tasks
            .push(tokio::spawn(async move { writer(client, w as i32, quota, deadline, &plan, &pad, &progress).await }));
    }
    let mut rows = 0;
    for t in tasks {
        rows += t.await.context("a writer panicked")??;
    }
    let elapsed = start.elapsed();
    let events = if plan.mixed { rows * 3 } else { rows };
    Ok(Written { rows, events, bytes: rows * plan.payload as u64, elapsed })
}

async fn writer(
    client: Client,
    w: i32,
    quota: Option<u64>,
    deadline: Option<Instant>,
    plan: &Plan,
    pad: &str,
    progress: &AtomicU64,
) -> anyhow::Result<u64> {
    let raw = client
        .prepare("SELECT count(pg_notify($1, g::text || ':' || $2)) FROM generate_series($3::bigint, $4::bigint) g")
        .await?;
    // The message is `writer:n:t:pad`, for the probes.
    let publish = client
        .prepare(
            "SELECT count(pubsub.publish($1, $2::int || ':' || g || ':' || $3::bigint || ':' || $4)) \
             FROM generate_series($5::bigint, $6::bigint) g",
        )
        .await?;
    let mut inserts = Vec::new();
    let mut mutations = Vec::new();
    for i in 0..plan.tables.min(if plan.raw || plan.publish { 0 } else { usize::MAX }) {
        inserts.push(
            client
                .prepare(&format!(
                    "INSERT INTO {SCHEMA}.t{i} (writer, n, t, pad) SELECT $1, g, $2, $3 FROM generate_series($4::bigint, $5::bigint) g"
                ))
                .await?,
        );
        mutations.push(
            client
                .prepare(&format!(
                    "WITH u AS (UPDATE {SCHEMA}.t{i} SET t = $3 WHERE writer = $1 AND n BETWEEN $2 AND $4 RETURNING id)
                     SELECT count(*) FROM u"
                ))
                .await?,
        );
    }
    let deletes: Vec<_> = {
        let mut v = Vec::new();
        for i in 0..plan.tables.min(if plan.raw || plan.publish { 0 } else { usize::MAX }) {
            v.push(
                client.prepare(&format!("DELETE FROM {SCHEMA}.t{i} WHERE writer = $1 AND n BETWEEN $2 AND $3")).await?,
            );
        }
        v
    };
    // Pacing: each writer's share of the rate, one batch at a time.
    let interval = plan.rate.map(|r| Duration::from_secs_f64(plan.batch as f64 * plan.writers as f64 / r.max(1e-3)));
    let mut next = Instant::now();
    let mut n: u64 = 0;
    let mut k = 0usize;
    loop {
        if quota.is_some_and(|q| n >= q) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let count = quota.map_or(plan.batch, |q| plan.batch.min(q - n));
        if let Some(iv) = interval {
            tokio::time::sleep_until(next.into()).await;
            next += iv;
        }
        let table = k % plan.tables;
        let (lo, hi) = (n as i64, (n + count - 1) as i64);
        if plan.raw || plan.publish {
            if plan.raw {
                // Each payload made unique, or Postgres folds them into one.
                client.query_one(&raw, &[&channel(table), &pad, &lo, &hi]).await?;
            } else {
                client.query_one(&publish, &[&channel(table), &w, &now_us(), &pad, &lo, &hi]).await?;
            }
            n += count;
            k += 1;
            progress.fetch_add(count, Ordering::Relaxed);
            continue;
        }
        client.execute(&inserts[table], &[&w, &now_us(), &pad, &lo, &hi]).await?;
        if plan.mixed {
            client.query_one(&mutations[table], &[&w, &lo, &now_us(), &hi]).await?;
            client.execute(&deletes[table], &[&w, &lo, &hi]).await?;
        }
        n += count;
        k += 1;
        progress.fetch_add(count, Ordering::Relaxed);
    }
    Ok(n)
}
