//! One read of the log: the page of events after a position, and those the
//! still-open transactions added, with the snapshot they were read in (see
//! `tail.rs` for why both).

use super::{in_progress, u64_of, LogConn, Logged, Unreadable};
use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::event::Event;

/// One row read back from the log.
#[derive(Debug)]
pub(crate) struct LogRow {
    /// Its place in the log.
    pub cursor: Cursor,
    /// Its channel.
    pub channel: String,
    /// The event, unless over the size limit or not one of ours.
    pub event: Result<Event, Unreadable>,
}

/// What one read of the log returns: rows and the snapshot they were read
/// with, so the reader knows which transactions may still add rows below.
#[derive(Debug)]
pub(crate) struct Poll {
    /// The rows, in (txid, seq) order.
    pub rows: Vec<LogRow>,
    /// More rows matched than the page could hold.
    pub more: bool,
    /// Transactions in progress when the rows were read (`pg_snapshot_xip`).
    pub in_progress: Vec<u64>,
    /// The highest (txid, seq) retention has removed.
    pub pruned: Cursor,
}

/// One read of the log (see [`LogConn::poll`]): a first row with the
/// snapshot and retention's mark, then the page in (txid, seq) order. Rows
/// past the byte budget come back `past`, without their text: they say
/// there is more. Lean on purpose (a reader runs it once per append under
/// load): no sort or window over the texts, no join to the header row.
const POLL: &str = "SELECT NULL::text AS txid, NULL::int8 AS seq, NULL::text AS channel, NULL::text AS body, NULL::text AS payload,
                           NULL::int8 AS len, NULL::bool AS past, pg_current_snapshot()::text AS snap, r.pruned_txid::text, r.pruned_seq
                    FROM pubsub.retention r
                    UNION ALL
                    SELECT p.txid::text, p.seq, p.channel,
                           CASE WHEN p.len <= $8::int8 AND NOT p.past THEN p.body END, CASE WHEN p.len <= $8::int8 AND NOT p.past THEN p.payload END,
                           p.len, p.past, NULL, NULL, NULL
                    FROM (SELECT page.*, ((sum(page.len) OVER (ORDER BY page.txid, page.seq ROWS UNBOUNDED PRECEDING))::int8 - page.len >= $7::int8
                                          AND row_number() OVER (ORDER BY page.txid, page.seq ROWS UNBOUNDED PRECEDING) > 1) AS past
                          FROM ((SELECT e.txid, e.seq, e.channel, e.body, e.payload, e.len
                                 FROM unnest($4::text[]::xid8[], $5::int8[]) o(t, s)
                                 CROSS JOIN LATERAL (
                                     SELECT x.txid, x.seq, x.channel, x.body, x.payload,
                                            (octet_length(x.body) + coalesce(octet_length(x.payload), 0))::bigint AS len
                                     FROM pubsub.events x
                                     WHERE (x.txid, x.seq) > (o.t, o.s)
                                       AND (x.txid, x.seq) <= (o.t, 9223372036854775807::bigint)
                                       AND ($1::text[] IS NULL OR x.channel = ANY($1))
                                     ORDER BY x.txid, x.seq LIMIT $6::int8) e)
                                UNION ALL
                                (SELECT e.txid, e.seq, e.channel, e.body, e.payload,
                                        (octet_length(e.body) + coalesce(octet_length(e.payload), 0))::bigint
                                 FROM pubsub.events e
                                 WHERE (e.txid, e.seq) > ($2::text::xid8, $3::int8) AND ($1::text[] IS NULL OR e.channel = ANY($1))
                                 ORDER BY e.txid, e.seq LIMIT $6::int8)
                                ORDER BY txid, seq LIMIT $6::int8) page) p";

impl LogConn {
    /// Reads the events on `channels` (all when `None`) that follow `after`
    /// in (txid, seq) order, and those of the `open` transactions (txid, and
    /// the last seq already read of it): at most `rows` of them and, past
    /// the first, at most `bytes` stored. Events over `max_event_bytes` come
    /// back as [`Unreadable::TooLarge`]. The rows are what one snapshot
    /// shows, and the snapshot's in-progress list comes with them.
    ///
    /// Row-level security applies: a role sees a row change only if it may
    /// SELECT the table it came from.
    ///
    /// Each open transaction is read through its own range of the
    /// (txid, seq) index (a row comparison on both ends: PostgreSQL's
    /// estimate for `txid = …` is poor, and a join on it scanned the whole
    /// log).
    pub(crate) async fn poll(
        &self,
        channels: Option<&[String]>,
        after: Cursor,
        open: &[(u64, i64)],
        rows: i64,
        bytes: i64,
        max_event_bytes: i64,
    ) -> Result<Poll> {
        let channels = channels.map(<[String]>::to_vec);
        let open_txids: Vec<String> = open.iter().map(|(t, _)| t.to_string()).collect();
        let open_seqs: Vec<i64> = open.iter().map(|(_, s)| *s).collect();
        self.run_pg("reading the log", |c| async move {
            let statement = self.prepared(&c, POLL).await?;
            let found = c
                .query(
                    &statement,
                    &[
                        &channels,
                        &after.txid.to_string(),
                        &after.seq,
                        &open_txids,
                        &open_seqs,
                        &rows,
                        &bytes,
                        &max_event_bytes,
                    ],
                )
                .await?;
            // The header row: no txid (not a schema of ours without one).
            let Some(header) = found.iter().find(|r| r.get::<_, Option<&str>>(0).is_none()) else {
                return Ok(None);
            };
            let snap: &str = header.get(7);
            let pruned = Cursor { txid: u64_of(header.get(8)), seq: header.get(9) };
            let mut page: Vec<_> = found.iter().filter(|r| r.get::<_, Option<&str>>(0).is_some()).collect();
            let page_rows = page.len() as i64;
            // In order whatever order the rows came in (UNION ALL promises none).
            page.sort_by_key(|r| (u64_of(r.get(0)), r.get::<_, i64>(1)));
            let mut rows_out = Vec::with_capacity(page.len());
            for r in page {
                if r.get::<_, bool>(6) {
                    break;
                }
                let channel: String = r.get(2);
                let event = match r.get::<_, Option<String>>(3) {
                    Some(body) => Logged::new(body, r.get(4)).into_event(&channel, max_event_bytes as u64),
                    None => Err(Unreadable::TooLarge(r.get::<_, i64>(5) as u64)),
                };
                rows_out.push(LogRow { cursor: Cursor { txid: u64_of(r.get(0)), seq: r.get(1) }, channel, event });
            }
            let more = page_rows >= rows || (rows_out.len() as i64) < page_rows;
            Ok(Some(Poll { rows: rows_out, more, in_progress: in_progress(snap), pruned }))
        })
        .await?
        .ok_or(Error::NotMigrated)
    }
}
