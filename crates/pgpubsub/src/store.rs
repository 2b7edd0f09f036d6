//! The event-sourced store of seed 004: the latest snapshot of each
//! (bucket, id) with a version, and the history of every version. Every put
//! and remove is also a change event on the `pubsub_store` channel.

use serde_json::Value;
use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The channel on which store changes are announced.
pub const STORE_CHANNEL: &str = "pubsub_store";

/// SQLSTATE raised when an expected version does not match.
pub const VERSION_CONFLICT: &str = "PS409";

/// The latest version of one (bucket, id).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// Version, from 1, one more on every write.
    pub version: i32,
    /// The value.
    pub val: Value,
}

/// One entry of a history.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// Version this entry created.
    pub version: i32,
    /// `put` (or the caller's own type) or `delete`.
    pub kind: String,
    /// The value written; `None` for a delete.
    pub val: Option<Value>,
    /// When, ISO 8601.
    pub ts: String,
}

/// Writes a new version. With `expected`, only if the current version is
/// exactly that (0: must not exist). Returns the new version.
///
/// # Errors
/// [`Error::Db`] with SQLSTATE [`VERSION_CONFLICT`] on a version mismatch.
pub async fn put(client: &Client, bucket: &str, id: &str, val: &Value, expected: Option<i32>) -> Result<i32> {
    let row = client
        .query_one(
            "SELECT pubsub.put($1, $2, $3::text::jsonb, 'put', $4)",
            &[&bucket, &id, &val.to_string(), &expected],
        )
        .await
        .map_err(|e| Error::db("writing to the store", e))?;
    Ok(row.get(0))
}

/// The latest snapshot, if any.
///
/// # Errors
/// [`Error::NotMigrated`] without the schema.
pub async fn get(client: &Client, bucket: &str, id: &str) -> Result<Option<Snapshot>> {
    let row = client
        .query_opt("SELECT version, val::text FROM pubsub.snapshots WHERE bucket = $1 AND id = $2", &[&bucket, &id])
        .await
        .map_err(|e| Error::db("reading the store", e))?;
    Ok(row.map(|r| Snapshot { version: r.get(0), val: json(r.get(1)) }))
}

/// Deletes; returns the deleting version, `None` when there was nothing.
///
/// # Errors
/// [`Error::NotMigrated`] without the schema.
pub async fn remove(client: &Client, bucket: &str, id: &str) -> Result<Option<i32>> {
    let row = client
        .query_one("SELECT pubsub.remove($1, $2)", &[&bucket, &id])
        .await
        .map_err(|e| Error::db("deleting from the store", e))?;
    Ok(row.get(0))
}

/// Every version of (bucket, id), oldest first.
///
/// # Errors
/// [`Error::NotMigrated`] without the schema.
pub async fn history(client: &Client, bucket: &str, id: &str) -> Result<Vec<HistoryEntry>> {
    let rows = client
        .query(
            "SELECT version, type, val::text, to_json(ts)#>>'{}' FROM pubsub.history \
             WHERE bucket = $1 AND id = $2 ORDER BY version",
            &[&bucket, &id],
        )
        .await
        .map_err(|e| Error::db("reading store history", e))?;
    Ok(rows
        .iter()
        .map(|r| HistoryEntry {
            version: r.get(0),
            kind: r.get(1),
            val: r.get::<_, Option<String>>(2).map(json),
            ts: r.get(3),
        })
        .collect())
}

/// jsonb rendered by Postgres is always valid JSON.
fn json(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}
