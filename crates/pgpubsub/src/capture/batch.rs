//! A batch of captured events and its one statement: `pubsub.capture_append`
//! writes the events, the capturer's position and (when it changed) the
//! channel map in one transaction, exactly once.

use std::time::Duration;

use tokio_postgres::{Client, Statement};

use crate::error::{Error, Result};
use crate::event::WalPosition;
use crate::wal::{Captured, ChannelMap};

const APPEND: &str = "SELECT pubsub.capture_append($1, $2::text[]::pg_lsn[], $3, $4, $5, $6, $7, $8, \
                      $9::text::jsonb, $10::text::pg_lsn, $11)";

/// The append statement, prepared once per session (each append then
/// costs the server a Bind/Execute only).
pub(crate) async fn prepare(side: &Client) -> Result<Statement> {
    side.prepare(APPEND).await.map_err(|e| Error::db("preparing the capturer's append", e))
}

/// Where a capturer has appended up to, as `pubsub.capture_state` keeps it.
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    /// The last event appended.
    pub(crate) appended: Option<WalPosition>,
    /// The channel map as of its place; `None` before the first one stored.
    pub(crate) map: Option<ChannelMap>,
}

/// `X/Y` and an index as a place; `None` for the "nothing yet" row values.
fn place(lsn: &str, idx: i32) -> Option<WalPosition> {
    let lsn = WalPosition::parse_lsn(lsn)?;
    (idx >= 0 && lsn > 0).then_some(WalPosition { lsn, index: idx as u32 })
}

/// Reads (and creates, if new) the state of `slot`.
pub(crate) async fn state(side: &Client, slot: &str) -> Result<State> {
    let row = side
        .query_one(
            "SELECT lsn::text, idx, channels::text, map_lsn::text, map_idx FROM pubsub.capture_state($1)",
            &[&slot],
        )
        .await
        .map_err(|e| Error::db("reading the capturer's position", e))?;
    let appended = place(row.get(0), row.get(1));
    let map = row.get::<_, Option<&str>>(2).and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok());
    let map = map.map(|json| ChannelMap::from_json(&json, place(row.get(3), row.get(4))));
    Ok(State { appended, map })
}

/// Every WAL-watched table's channel, as the table has it now: the map a
/// capturer starts from when none is stored (a new slot starts now too).
pub(crate) async fn current_map(side: &Client) -> Result<ChannelMap> {
    let channels = watches(side).await.map_err(|e| Error::db("reading the tables watched through the WAL", e))?;
    Ok(ChannelMap { channels, at: None })
}

/// Every WAL-watched table's channel, as the connection's snapshot shows them.
async fn watches(side: &Client) -> Result<std::collections::HashMap<u32, String>, tokio_postgres::Error> {
    let rows = side.query("SELECT source, channel FROM pubsub.wal_watches", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The channel map as of a new slot's start: `pubsub.wal_watches` read in
/// the snapshot the slot exported, placed at its consistent point (every
/// change that streams commits after it).
pub(crate) async fn map_in_snapshot(side: &Client, snapshot: &str, consistent_point: u64) -> Result<ChannelMap> {
    let read = async {
        side.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await?;
        // The snapshot's name comes from the server; quoted all the same.
        side.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{}'", snapshot.replace('\'', "''"))).await?;
        let channels = watches(side).await?;
        side.batch_execute("COMMIT").await?;
        Ok::<_, tokio_postgres::Error>(channels)
    };
    let channels = match read.await {
        Ok(channels) => channels,
        Err(e) => {
            let _ = side.batch_execute("ROLLBACK").await;
            return Err(Error::db("reading the watched tables in the new slot's snapshot", e));
        }
    };
    let at = Some(WalPosition { lsn: consistent_point, index: 0 });
    Ok(ChannelMap { channels, at })
}

/// Events waiting to be appended, in WAL order.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) events: Vec<Captured>,
    pub(crate) bytes: usize,
}

impl Batch {
    pub(crate) fn push(&mut self, event: Captured) {
        self.bytes += event.len();
        self.events.push(event);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Appends the batch (and `map`, if given) to the log for `slot`, in one
    /// transaction, within `timeout`. Returns how many events were new (the
    /// rest were appended before: a batch sent again). Empties the batch.
    ///
    /// # Errors
    /// When the statement fails or does not answer in time: whether it
    /// committed is then unknown, and the caller starts again from the
    /// stored state (what was appended is not appended twice).
    pub(crate) async fn append(
        &mut self,
        side: &Client,
        statement: &Statement,
        slot: &str,
        map: Option<&ChannelMap>,
        timeout: Duration,
    ) -> Result<u64> {
        let events = std::mem::take(&mut self.events);
        self.bytes = 0;
        let lsns: Vec<String> = events.iter().map(|e| e.at.lsn_text()).collect();
        let idx: Vec<i32> = events.iter().map(|e| e.at.index as i32).collect();
        let xids: Vec<i64> = events.iter().map(|e| i64::from(e.xid)).collect();
        let channels: Vec<&str> = events.iter().map(|e| e.channel.as_str()).collect();
        let sources: Vec<Option<u32>> = events.iter().map(|e| e.source).collect();
        let bodies: Vec<&str> = events.iter().map(|e| e.body.as_str()).collect();
        let payloads: Vec<Option<&str>> = events.iter().map(|e| e.payload.as_deref()).collect();
        let map_json = map.map(|m| m.to_json().to_string());
        let map_at = map.and_then(|m| m.at);
        let map_lsn = map_at.map(|a| a.lsn_text());
        let map_idx = map_at.map(|a| a.index as i32);
        // A map with no place (read from the table) is not stored: the
        // stream's own changes will be.
        let (map_json, map_lsn, map_idx) =
            if map_at.is_some() { (map_json, map_lsn, map_idx) } else { (None, None, None) };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] =
            [&slot, &lsns, &idx, &xids, &channels, &sources, &bodies, &payloads, &map_json, &map_lsn, &map_idx];
        let call = side.query_one(statement, &params);
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(row)) => Ok(row.get::<_, i64>(0) as u64),
            Ok(Err(e)) => Err(Error::db("appending captured events to the log", e)),
            Err(_) => Err(Error::ConnectionLost(format!("appending captured events: no answer within {timeout:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_empty_place_is_none() {
        assert_eq!(super::place("0/0", -1), None);
        assert_eq!(super::place("1/A", 3).map(|p| (p.lsn, p.index)), Some(((1 << 32) | 10, 3)));
    }
}
