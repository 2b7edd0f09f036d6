//! Watching tables and publishing messages: what writes the log.

use tokio_postgres::Client;

use crate::channel::Channel;
use crate::error::{Error, Result};

/// Publishes `payload` on `channel` through `pubsub.publish`: logged (a
/// waiting listener is woken; no payload travels in a notification). Any size
/// and any text; it arrives byte for byte. Returns the event's sequence.
///
/// Runs in the client's current transaction if one is open, so the message
/// is delivered only if that transaction commits.
///
/// Each call prepares its statement anew, so PostgreSQL plans it with the
/// payload folded in, one more copy of it. When publishing megabytes in a
/// loop, `SET plan_cache_mode = force_generic_plan` on the session saves
/// that copy (20–25% faster for 1 MB messages; docs/performance.md).
///
/// # Errors
/// [`Error::NotMigrated`] without the `pubsub` schema; [`Error::Db`] otherwise.
pub async fn publish(client: &Client, channel: &Channel, payload: &str) -> Result<i64> {
    let row = client
        .query_one("SELECT pubsub.publish($1, $2)", &[&channel.as_str(), &payload])
        .await
        .map_err(|e| Error::db("publishing", e))?;
    Ok(row.get(0))
}

/// Attaches the capture trigger to `table` (a name, optionally
/// schema-qualified, parsed by Postgres) so its changes are events on
/// `channel`, by default the table's own name. Returns the channel.
///
/// # Errors
/// [`Error::Db`] when the table does not exist (SQLSTATE `42P01`) or is not a
/// table, or the channel name is invalid.
pub async fn watch(client: &Client, table: &str, channel: Option<&Channel>) -> Result<Channel> {
    watch_with(client, table, channel, false).await
}

/// [`watch`], and with `inline` also each event's JSON in its NOTIFY payload
/// (chunked past 8000 bytes): the seeds' way, for programs that read
/// payloads themselves. Readable by every role that can LISTEN.
///
/// # Errors
/// As [`watch`].
pub async fn watch_with(client: &Client, table: &str, channel: Option<&Channel>, inline: bool) -> Result<Channel> {
    let context = "watching the table";
    let sql = "SELECT pubsub.watch($1::text::regclass, $2, $3)";
    let statement = client.prepare(sql).await.map_err(|e| Error::db(context, e))?;
    let row = client
        .query_one(&statement, &[&table, &channel.map(Channel::as_str), &inline])
        .await
        .map_err(|e| Error::db_running(context, e))?;
    Ok(Channel::new(row.get::<_, String>(0))?)
}

/// Detaches the capture trigger; returns whether the table was watched.
///
/// # Errors
/// [`Error::Db`] when the table does not exist.
pub async fn unwatch(client: &Client, table: &str) -> Result<bool> {
    let context = "unwatching the table";
    let statement =
        client.prepare("SELECT pubsub.unwatch($1::text::regclass)").await.map_err(|e| Error::db(context, e))?;
    let row = client.query_one(&statement, &[&table]).await.map_err(|e| Error::db_running(context, e))?;
    Ok(row.get(0))
}

/// Every watched table and its channel.
///
/// # Errors
/// [`Error::NotMigrated`] without the `pubsub` schema.
pub async fn watches(client: &Client) -> Result<Vec<(String, String)>> {
    let rows = client
        .query("SELECT \"table\"::text, channel FROM pubsub.watches ORDER BY 1", &[])
        .await
        .map_err(|e| Error::db("listing watched tables", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Watches `table` through the WAL (`pubsub.watch_wal`): no trigger; the
/// [capturer](crate::capture) appends its changes to the log on `channel`
/// (by default the table's name). Replaces a trigger watch of the table.
/// Needs `wal_level = logical` for the capturer to stream, not to watch.
///
/// # Errors
/// As [`watch`]; also when the caller does not own the table and the
/// `pgpubsub` publication.
pub async fn watch_wal(client: &Client, table: &str, channel: Option<&Channel>) -> Result<Channel> {
    let context = "watching the table through the WAL";
    let statement =
        client.prepare("SELECT pubsub.watch_wal($1::text::regclass, $2)").await.map_err(|e| Error::db(context, e))?;
    let row = client
        .query_one(&statement, &[&table, &channel.map(Channel::as_str)])
        .await
        .map_err(|e| Error::db_running(context, e))?;
    Ok(Channel::new(row.get::<_, String>(0))?)
}

/// Publishes `payload` on `channel` through the WAL: the
/// [capturer](crate::capture) appends it to the log. An INSERT into
/// `pubsub.wal_messages` (the role needs INSERT on it); SQL
/// callers granted EXECUTE instead can use `pubsub.publish_wal`, which
/// costs a function call more. Runs in the client's current transaction, if
/// one is open.
///
/// # Errors
/// [`Error::NotMigrated`] without the table; [`Error::Db`] otherwise
/// (SQLSTATE 42501 without the grant).
pub async fn publish_wal(client: &Client, channel: &Channel, payload: &str) -> Result<()> {
    client
        .execute("INSERT INTO pubsub.wal_messages (channel, payload) VALUES ($1, $2)", &[&channel.as_str(), &payload])
        .await
        .map_err(|e| Error::db("publishing through the WAL", e))?;
    Ok(())
}
