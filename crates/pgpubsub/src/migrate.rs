//! The schema, as dbmate migrations embedded in the binary.
//!
//! The files under `db/migrations` (the `pubsub` schema) and `db/examples`
//! (the seed's `job` example), in this crate's folder so that the
//! published crate carries them, are in dbmate's format: `-- migrate:up` and
//! `-- migrate:down` sections, applied versions recorded in
//! `schema_migrations`. So `dbmate up` on the same folder does what
//! [`up`] does, and either tool sees what the other applied.
//!
//! Each migration runs in its own transaction, and a migrator holds an
//! advisory lock throughout, so two racing on one database apply each step once.

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// One migration file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Migration {
    /// The version: the file name's numeric prefix, as dbmate records it.
    pub version: &'static str,
    /// The rest of the file name, without `.sql`.
    pub name: &'static str,
    /// Whether this belongs to the examples set rather than the core schema.
    pub example: bool,
    up: &'static str,
    down: &'static str,
}

macro_rules! embed {
    ($example:expr, $dir:literal, $file:literal) => {
        ($example, $file, include_str!(concat!("../db/", $dir, "/", $file)))
    };
}

/// (example?, file name, text) of every embedded file, in version order.
const FILES: &[(bool, &str, &str)] = &[
    embed!(false, "migrations", "20261121000100_pubsub_log.sql"),
    embed!(false, "migrations", "20261121000200_pubsub_store.sql"),
    embed!(false, "migrations", "20261121000300_pubsub_message_payload.sql"),
    embed!(false, "migrations", "20261121000400_pubsub_prune_by_key.sql"),
    embed!(true, "examples", "20261121000900_job_example.sql"),
    embed!(false, "migrations", "20261130000100_pubsub_log_only.sql"),
    embed!(false, "migrations", "20261130000200_pubsub_wal.sql"),
    embed!(false, "migrations", "20261207000100_pubsub_capture.sql"),
    embed!(false, "migrations", "20261207000200_pubsub_row_views.sql"),
    embed!(false, "migrations", "20261207000300_pubsub_row_views_classes.sql"),
    embed!(false, "migrations", "20261207000400_pubsub_capture_wake.sql"),
    embed!(false, "migrations", "20261207000500_pubsub_row_views_plans.sql"),
];

/// Every embedded migration, core and examples, in version order.
///
/// # Panics
/// Never at run time for the shipped files: a unit test parses them all.
pub fn all() -> Vec<Migration> {
    FILES
        .iter()
        .map(|&(example, file, text)| parse(file, text, example).expect("embedded migrations parse (tested)"))
        .collect()
}

/// Splits a dbmate file into its up and down sections.
fn parse(file: &'static str, text: &'static str, example: bool) -> Option<Migration> {
    let stem = file.strip_suffix(".sql")?;
    let (version, name) = stem.split_once('_')?;
    let up_at = text.find("-- migrate:up")?;
    let down_at = text.find("-- migrate:down")?;
    if down_at < up_at || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Migration { version, name, example, up: &text[up_at..down_at], down: &text[down_at..] })
}

/// A migration and whether it is applied.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Status {
    /// The migration.
    pub migration: Migration,
    /// Whether its version is in `schema_migrations`.
    pub applied: bool,
}

const LOCK: &str = "SELECT pg_advisory_lock(hashtext('pgpubsub migrate'))";
const UNLOCK: &str = "SELECT pg_advisory_unlock(hashtext('pgpubsub migrate'))";
const TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (version varchar(128) PRIMARY KEY)";

/// Applies every pending migration: the core schema, and the examples too
/// when `examples` is set. Returns those applied now (none when all were).
///
/// # Errors
/// [`Error::Migration`] naming the step that failed; earlier steps stay applied.
pub async fn up(client: &mut Client, examples: bool) -> Result<Vec<Migration>> {
    lock(client).await?;
    let result = up_locked(client, examples).await;
    unlock(client).await;
    result
}

/// Reverts the most recent applied pgpubsub migration (other versions in
/// `schema_migrations`, a user's own, are left alone). Returns it, or `None`
/// when none is applied.
///
/// # Errors
/// [`Error::Migration`] when the down section fails; nothing is changed then.
pub async fn down(client: &mut Client) -> Result<Option<Migration>> {
    lock(client).await?;
    let result = down_locked(client).await;
    unlock(client).await;
    result
}

/// A session-level lock, taken outside any transaction: each transaction
/// that starts after it sees the catalog as the previous holder left it (an
/// advisory lock inside a transaction would not refresh that view, and two
/// `CREATE TABLE IF NOT EXISTS` would collide).
async fn lock(client: &Client) -> Result<()> {
    client.batch_execute(LOCK).await.map_err(|e| Error::db("taking the migration lock", e))
}

/// Released explicitly; a lost connection releases it too.
async fn unlock(client: &Client) {
    if let Err(e) = client.batch_execute(UNLOCK).await {
        tracing::warn!(error = %e, "could not release the migration lock");
    }
}

async fn up_locked(client: &mut Client, examples: bool) -> Result<Vec<Migration>> {
    client.batch_execute(TABLE).await.map_err(|e| Error::db("creating schema_migrations", e))?;
    let applied_before = status(client).await?;
    let mut applied = Vec::new();
    for s in applied_before.into_iter().filter(|s| !s.applied && (examples || !s.migration.example)) {
        let m = s.migration;
        let fail = |source| Error::Migration { version: m.version.into(), name: m.name.into(), source };
        let tx = client.transaction().await.map_err(fail)?;
        tx.batch_execute(m.up).await.map_err(fail)?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&m.version]).await.map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        applied.push(m);
    }
    Ok(applied)
}

async fn down_locked(client: &mut Client) -> Result<Option<Migration>> {
    let last = status(client).await?.into_iter().rev().find(|s| s.applied);
    let Some(Status { migration: m, .. }) = last else {
        return Ok(None);
    };
    let fail = |source| Error::Migration { version: m.version.into(), name: m.name.into(), source };
    let tx = client.transaction().await.map_err(fail)?;
    tx.batch_execute(m.down).await.map_err(fail)?;
    tx.execute("DELETE FROM schema_migrations WHERE version = $1", &[&m.version]).await.map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    tracing::info!(version = m.version, name = m.name, "reverted migration");
    Ok(Some(m))
}

/// Every embedded migration with whether it is applied.
///
/// # Errors
/// [`Error::Db`] when `schema_migrations` cannot be read.
pub async fn status(client: &Client) -> Result<Vec<Status>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(|e| Error::db("reading schema_migrations", e))?
        .get(0);
    let versions: Vec<String> = if exists {
        client
            .query("SELECT version::text FROM schema_migrations", &[])
            .await
            .map_err(|e| Error::db("reading schema_migrations", e))?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    Ok(all().into_iter().map(|m| Status { applied: versions.iter().any(|v| v == m.version), migration: m }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_files_are_dbmate_files_in_order() {
        let all = all();
        assert_eq!(all.len(), FILES.len());
        for m in &all {
            assert!(m.up.starts_with("-- migrate:up") && m.up.len() > 20, "{}", m.version);
            assert!(m.down.starts_with("-- migrate:down") && m.down.len() > 20, "{}", m.version);
            assert_eq!(m.version.len(), 14);
        }
        assert!(all.windows(2).all(|w| w[0].version < w[1].version));
        assert!(all.iter().filter(|m| m.example).all(|m| !m.up.contains("pubsub.")));
    }

    /// A file added to a folder but not to `FILES` would never be applied.
    #[test]
    fn every_file_of_the_folders_is_embedded() {
        for (dir, example) in [("migrations", false), ("examples", true)] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("db").join(dir);
            let mut on_disk: Vec<String> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".sql"))
                .collect();
            on_disk.sort();
            let embedded: Vec<&str> = FILES.iter().filter(|f| f.0 == example).map(|f| f.1).collect();
            assert_eq!(on_disk, embedded, "{}", path.display());
        }
    }

    #[test]
    fn parse_rejects_files_without_sections() {
        assert!(parse("1_x.sql", "select 1", false).is_none());
        assert!(parse("1_x.sql", "-- migrate:down\n-- migrate:up\n", false).is_none());
        assert!(parse("x_y.sql", "-- migrate:up\n-- migrate:down\n", false).is_none());
    }
}
