//! The hand-over from a table's snapshot to its changes in the log, exact:
//! no change the snapshot already holds comes again, none it lacks is
//! missed.
//!
//! A shape's rows are read in one `REPEATABLE READ` transaction whose
//! snapshot `S` is kept (`pg_current_snapshot()`: `xmin:xmax:xip`). The
//! log is then read from before `S.xmin` ([`Handover::start`]): every
//! transaction below it had finished when `S` was taken, so its rows are in
//! the snapshot and its events before that position. From there an event
//! is *in the snapshot* when the transaction that made the change is
//! visible in `S` ([`Handover::covers`]): the writer's own transaction for
//! a trigger-captured event (`txid`), the source transaction for one
//! captured from the WAL (`source_txid`). Those are skipped; every other
//! event is new to the subscriber.
//!
//! The check is needed until [`Handover::until`]: past it no event can be
//! in the snapshot (for trigger-captured tables, `S.xmax`; for tables
//! captured from the WAL, the `xmax` of a snapshot taken once the capturer
//! had appended everything committed before `S`). A subscriber that drops
//! inside that window resumes with the hand-over in its position
//! ([`Position`]), so the check goes on where it stopped.

use std::fmt;
use std::str::FromStr;

use crate::cursor::Cursor;
use crate::event::Event;

/// A PostgreSQL snapshot (`pg_snapshot`): which transactions it sees.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// Every transaction below it had finished.
    pub xmin: u64,
    /// Every transaction at or above it had not started.
    pub xmax: u64,
    /// In progress when it was taken, between the two.
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Whether a transaction that committed is visible in this snapshot.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// `xmin:xmax:xip,xip`, pg_snapshot's text form.
impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

/// Why a snapshot or position did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid position {0:?}: expected <txid>:<seq>, or <txid>:<seq>~<xmin>:<xmax>:<xip,...>~<until> after a shape's snapshot")]
pub struct InvalidPosition(pub String);

/// The most transactions in progress a snapshot in a position may list
/// (`max_connections` bounds them on the server; this bounds what a client
/// may send).
pub const MAX_XIP: usize = 10_000;

impl FromStr for Snapshot {
    type Err = InvalidPosition;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidPosition(s.chars().take(64).collect());
        let number =
            |x: &str| (!x.is_empty() && x.bytes().all(|b| b.is_ascii_digit())).then(|| x.parse::<u64>().ok()).flatten();
        let mut parts = s.splitn(3, ':');
        let xmin = parts.next().and_then(number).ok_or_else(bad)?;
        let xmax = parts.next().and_then(number).ok_or_else(bad)?;
        let list = parts.next().ok_or_else(bad)?;
        let xip = match list {
            "" => Vec::new(),
            l if l.split(',').count() > MAX_XIP => return Err(bad()),
            l => l.split(',').map(|x| number(x).ok_or_else(bad)).collect::<Result<_, _>>()?,
        };
        if xmin > xmax {
            return Err(bad());
        }
        Ok(Snapshot { xmin, xmax, xip })
    }
}

/// Where a shape's changes begin, and which of them its snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handover {
    /// The snapshot the rows were read in.
    pub snapshot: Snapshot,
    /// Past this position no event can be in the snapshot.
    pub until: Cursor,
}

impl Handover {
    /// A hand-over from `snapshot` for trigger-captured tables: events in
    /// the snapshot are those of its visible transactions, all below `xmax`.
    pub fn new(snapshot: Snapshot) -> Handover {
        let until = Cursor::before_txid(snapshot.xmax);
        Handover { snapshot, until }
    }

    /// Where the log is read from: before the oldest transaction the
    /// snapshot may not have seen.
    pub fn start(&self) -> Cursor {
        Cursor::before_txid(self.snapshot.xmin)
    }

    /// Whether the snapshot already holds `event`'s change (so it is
    /// skipped). Only row changes and messages of the log are judged;
    /// anything else is new.
    pub fn covers(&self, event: &Event) -> bool {
        match event.source_txid.or(event.txid) {
            Some(xid) => event.seq.is_some() && self.snapshot.sees(xid),
            None => false,
        }
    }

    /// Whether a subscriber standing at `position` still needs the check.
    pub fn open_at(&self, position: Cursor) -> bool {
        position < self.until
    }
}

/// A subscriber's position on a shape: where it stands in the log, and the
/// hand-over while it is still open (`<cursor>~<snapshot>~<until txid>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// Where it stands in the log.
    pub cursor: Cursor,
    /// The snapshot hand-over, while the cursor is before its end.
    pub handover: Option<Handover>,
}

impl Position {
    /// `cursor` with `handover`, dropped once the cursor is past its end.
    pub fn new(cursor: Cursor, handover: Option<&Handover>) -> Position {
        Position { cursor, handover: handover.filter(|h| h.open_at(cursor)).cloned() }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.handover {
            None => write!(f, "{}", self.cursor),
            Some(h) => write!(f, "{}~{}~{}", self.cursor, h.snapshot, h.until.txid),
        }
    }
}

impl FromStr for Position {
    type Err = InvalidPosition;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidPosition(s.chars().take(64).collect());
        let mut parts = s.split('~');
        let cursor = parts.next().unwrap_or_default().parse::<Cursor>().map_err(|_| bad())?;
        let handover = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => None,
            (Some(snapshot), Some(until), None) => {
                let snapshot = snapshot.parse::<Snapshot>()?;
                let digits = !until.is_empty() && until.bytes().all(|b| b.is_ascii_digit());
                let until = until.parse::<u64>().ok().filter(|_| digits).ok_or_else(bad)?;
                if until < snapshot.xmax {
                    return Err(bad());
                }
                Some(Handover { snapshot, until: Cursor::before_txid(until) })
            }
            _ => return Err(bad()),
        };
        Ok(Position::new(cursor, handover.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_what_finished_before_it() {
        let s: Snapshot = "100:110:102,105".parse().unwrap();
        assert!(s.sees(99) && s.sees(100) && s.sees(101) && s.sees(109));
        assert!(!s.sees(102) && !s.sees(105) && !s.sees(110) && !s.sees(200));
        assert_eq!(s.to_string(), "100:110:102,105");
        assert_eq!("7:7:".parse::<Snapshot>().unwrap().to_string(), "7:7:");
        for bad in ["", "1", "1:2", "2:1:", "1:2:x", "1:2:3,", "a:b:", "-1:2:"] {
            assert!(bad.parse::<Snapshot>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_position_carries_the_handover_while_it_is_open() {
        let h = Handover::new("100:110:105".parse().unwrap());
        assert_eq!(h.start(), Cursor::before_txid(100));
        let inside = Position::new(Cursor { txid: 104, seq: 7 }, Some(&h));
        let text = inside.to_string();
        assert_eq!(text, "104:7~100:110:105~110");
        assert_eq!(text.parse::<Position>().unwrap(), inside);
        let past = Position::new(Cursor { txid: 110, seq: 1 }, Some(&h));
        assert_eq!(past.to_string(), "110:1");
        assert_eq!("5:6".parse::<Position>().unwrap(), Position { cursor: Cursor { txid: 5, seq: 6 }, handover: None });
        for bad in ["5:6~", "5:6~1:2:~", "5:6~1:2:~1", "5:6~1:2:~x", "5:6~1:2:~3~4", "x~1:2:~3", "5:6~1:2:3:4~5"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }
}
