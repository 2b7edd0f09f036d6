//! A subscriber's position in the event log, safe against late commits.
//!
//! Sequence numbers are handed out before commit, so seq 100 can commit after
//! seq 101 was delivered; resuming from "seq > 101" would skip 100 forever. A
//! cursor is therefore a pair (txid, seq), compared as a pair, and it only
//! ever moves below the oldest transaction that might still commit
//! (`pg_snapshot_xmin`): every event at or below it is final. See
//! docs/delivery.md.

use std::fmt;
use std::str::FromStr;

/// Everything at or below this (txid, seq) has been delivered, and no event
/// can still appear below it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// Transaction id (`xid8`) of the last event covered.
    pub txid: u64,
    /// Its sequence; 0 means "before every event of `txid`".
    pub seq: i64,
}

impl Cursor {
    /// The position just before every event of transaction `txid` and later
    /// ones: what a snapshot's xmin allows.
    pub fn before_txid(txid: u64) -> Self {
        Cursor { txid, seq: 0 }
    }
}

/// `txid:seq`, the form used in the `pubsub.cursors` table and in resume
/// tokens.
impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.txid, self.seq)
    }
}

/// Why a cursor string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cursor {0:?}: expected <txid>:<seq>, two non-negative integers")]
pub struct InvalidCursor(pub String);

impl FromStr for Cursor {
    type Err = InvalidCursor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidCursor(s.chars().take(64).collect());
        let (t, q) = s.split_once(':').ok_or_else(bad)?;
        let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(t) || !digits(q) {
            return Err(bad());
        }
        Ok(Cursor { txid: t.parse().map_err(|_| bad())?, seq: q.parse().map_err(|_| bad())? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_txid_then_seq() {
        let late_commit = Cursor { txid: 5, seq: 100 };
        let early = Cursor { txid: 6, seq: 101 };
        assert!(late_commit < early);
        assert!(Cursor::before_txid(6) < early && Cursor::before_txid(6) > late_commit);
    }

    #[test]
    fn round_trips_and_refuses_junk() {
        let c = Cursor { txid: 123, seq: 456 };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        for bad in ["", "1", "1:", ":1", "-1:2", "1:-2", "a:b", "1:2:3", "+1:2", "99999999999999999999:1"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
    }
}
