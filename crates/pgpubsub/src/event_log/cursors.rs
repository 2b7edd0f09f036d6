//! Durable cursors: where a named subscriber stands, stored in
//! `pubsub.cursors` so it resumes there after a restart.

use super::{u64_of, LogConn};
use crate::cursor::Cursor;
use crate::error::Result;

impl LogConn {
    /// A named subscriber's stored cursor.
    pub(crate) async fn load_cursor(&self, name: &str) -> Result<Option<Cursor>> {
        let name = name.to_string();
        self.run_pg("reading a stored cursor", |c| async move {
            let row = c.query_opt("SELECT txid::text, seq FROM pubsub.cursors WHERE name = $1", &[&name]).await?;
            Ok(row.map(|r| Cursor { txid: u64_of(r.get(0)), seq: r.get(1) }))
        })
        .await
    }

    /// Stores a named subscriber's cursor (never moving it backwards).
    pub(crate) async fn save_cursor(&self, name: &str, cursor: Cursor) -> Result<()> {
        let name = name.to_string();
        self.run_pg("storing a cursor", |c| async move {
            c.execute(
                "INSERT INTO pubsub.cursors (name, txid, seq) VALUES ($1, $2::text::xid8, $3)
                 ON CONFLICT (name) DO UPDATE SET txid = EXCLUDED.txid, seq = EXCLUDED.seq, updated_at = clock_timestamp()
                 WHERE (pubsub.cursors.txid, pubsub.cursors.seq) < (EXCLUDED.txid, EXCLUDED.seq)",
                &[&name, &cursor.txid.to_string(), &cursor.seq],
            )
            .await?;
            Ok(())
        })
        .await
    }
}
