//! The capturers' replication slots as the server sees them: how much WAL
//! each keeps (a capturer that is gone must not fill the disk unnoticed),
//! whether the server invalidated one, and dropping them.

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// One of pgpubsub's replication slots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct SlotInfo {
    /// Its name (`pgpubsub_capture…`, or an older reader's `pgpubsub_…`).
    pub name: String,
    /// Whether a session streams it now (a capturer is running).
    pub active: bool,
    /// Bytes of WAL the server keeps for it (from its restart LSN to now).
    pub retained_bytes: u64,
    /// `pg_replication_slots.wal_status`: `reserved`, `extended`,
    /// `unreserved`, or `lost` (invalidated: its changes are gone).
    pub wal_status: String,
    /// Bytes it may still fall behind before the server invalidates it,
    /// under `max_slot_wal_keep_size`; `None` when that is unlimited.
    pub safe_wal_bytes: Option<i64>,
}

/// pgpubsub's slots in this database (`pgpubsub_%`), by name.
///
/// # Errors
/// [`Error::Db`] when the server cannot be asked.
pub async fn slots(client: &Client) -> Result<Vec<SlotInfo>> {
    let rows = client
        .query(
            "SELECT slot_name::text, active,
                    coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                                                  ELSE pg_current_wal_lsn() END, restart_lsn), 0)::bigint,
                    coalesce(wal_status, 'lost'), safe_wal_size
             FROM pg_replication_slots
             WHERE slot_name LIKE 'pgpubsub\\_%' AND database = current_database()
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| Error::db("reading the replication slots", e))?;
    Ok(rows
        .iter()
        .map(|r| SlotInfo {
            name: r.get(0),
            active: r.get(1),
            retained_bytes: r.get::<_, i64>(2).max(0) as u64,
            wal_status: r.get(3),
            safe_wal_bytes: r.get(4),
        })
        .collect())
}

/// Whether the server invalidated `slot` (`wal_status = 'lost'`).
pub(crate) async fn invalidated(side: &Client, slot: &str) -> Result<bool> {
    let row = side
        .query_opt("SELECT wal_status = 'lost' FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()", &[&slot])
        .await
        .map_err(|e| Error::db("reading the replication slot", e))?;
    Ok(row.and_then(|r| r.get::<_, Option<bool>>(0)).unwrap_or(false))
}

/// Records a gap in capture for `slot`: a `resync` event on every
/// WAL-watched channel, and the capturer's state started anew.
pub(crate) async fn record_gap(side: &Client, slot: &str, reason: &str) -> Result<u64> {
    let row = side
        .query_one("SELECT pubsub.capture_reset($1, $2)", &[&slot, &reason])
        .await
        .map_err(|e| Error::db("recording the capture gap in the log", e))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// The invalidated `slot`: records the gap, then drops it (in that order: a
/// crash in between records the gap again, never not at all). The next
/// start creates the slot again, from now.
pub(crate) async fn reset(side: &Client, slot: &str) -> Result<u64> {
    let reason = format!(
        "the server invalidated replication slot {slot} (it kept more WAL than max_slot_wal_keep_size allows): \
         changes made while the capturer was behind were not captured"
    );
    let channels = record_gap(side, slot, &reason).await?;
    side.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(|e| Error::db("dropping the invalidated replication slot", e))?;
    Ok(channels)
}

/// Drops every capturer slot (`pgpubsub_capture…`) of this database that no
/// session streams; returns the names dropped and those left (active).
/// Other `pgpubsub_` slots (older direct readers') are the operator's.
///
/// # Errors
/// [`Error::Db`] when one cannot be dropped.
pub async fn drop_idle(client: &Client) -> Result<(Vec<String>, Vec<String>)> {
    let mut dropped = Vec::new();
    let mut left = Vec::new();
    for slot in slots(client).await?.into_iter().filter(|s| s.name.starts_with("pgpubsub_capture")) {
        if slot.active {
            left.push(slot.name);
            continue;
        }
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot.name])
            .await
            .map_err(|e| Error::db("dropping a replication slot", e))?;
        dropped.push(slot.name);
    }
    Ok((dropped, left))
}
