//! When a seed-format event (parts numbered by the sender, then `EOF`; see
//! docs/protocol.md) is provably complete, whatever order its parts came in.

use std::collections::BTreeMap;

use super::Partial;

/// The ways senders number seed-format parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// Chunk numbers from `0` or `1`: counters `from`, `from + 1`, ….
    Chunks { from: u64 },
    /// 0-based character offsets: each counter is the number of characters
    /// before its piece (0, 1000, 2000, … for pieces of 1000).
    Offsets,
    /// seed 004's trigger, `substr(text, counter, size)` for counter 0,
    /// size, 2·size, …: 1-based character positions, except the first
    /// part's 0, which therefore carries `size - 1` characters.
    Substr,
    /// 1-based character positions: each counter is the position of its
    /// piece's first character (1, 1001, 2001, … for pieces of 1000), as
    /// `substr(text, counter, size)` reads them counting from 1.
    Positions,
}

/// How a numbering's reading of the parts ends.
#[derive(Debug, PartialEq, Eq)]
enum Fit {
    /// The parts do not tile the text from its start under this numbering,
    /// or not with one fixed piece size (yet: a gap may still fill).
    No,
    /// They tile it, and the last piece is as long as the others: further
    /// parts may still come.
    FullEnd,
    /// They tile it, and the last piece is shorter than the others: a sender
    /// cutting pieces of one size sends a short piece only last.
    ShortEnd,
}

/// Whether a seed-format message can be released: `Ok` once its parts
/// provably cover it, else why it waits.
///
/// Asked at the end of a batch (notifications that arrived together: all of
/// one transaction's), once the message's `EOF` is in.
///
/// Senders cut the text into pieces of one size `C` characters, the last
/// shorter or equal (seed 004's first piece is `C - 1`), number them one of
/// the [`Numbering`] ways, and send `EOF` after the parts, all in one
/// transaction. In whatever order they arrived, a message is released when
/// its `EOF` is in and:
///
/// - its parts start at the numbering's first counter (0; 1 for 1-based
///   positions) and tile the text under it, every piece but the last `C`
///   characters and the last shorter. A short piece can only be the last,
///   and the tiling leaves no gap: proof in any arrival order. Where two
///   numberings fit (pieces of one character numbered 0, 1, 2 …), both read
///   the same text: parts concatenated in counter order.
/// - or no part arrived in a batch after the `EOF`'s (`late`), and the parts
///   are either one lone part at counter 0 or 1 (the whole of a short
///   message), or tile the text numbered from 1 with a short last piece.
///   Arriving together is the evidence here: parts 1..n and `EOF` cannot
///   otherwise be told from a message numbered from 0 whose part 0 is still
///   on the way.
///
/// Everything else waits, and expires at `max_age`: a gap; a last piece of
/// the full size (a text of exactly `k·C` characters, or `k·C - 1` in seed
/// 004's cut), which cannot be told from a message whose `EOF` overtook its
/// last parts; a lone part, or a message numbered from 1, with parts in a
/// batch after its `EOF`'s; pieces of uneven sizes.
///
/// `exact` walks every plausible numbering to say precisely why a message
/// waits (for the expiry warning); without it, a numbering whose last piece
/// is not shorter than its first is not walked, so that a message decided at
/// the end of several batches costs about one walk.
pub(super) fn seed_verdict(p: &Partial, exact: bool) -> Result<(), &'static str> {
    if !p.eof {
        return Err("no EOF yet");
    }
    let (Some((&first, first_piece)), Some((&last, last_piece))) =
        (p.parts.first_key_value(), p.parts.last_key_value())
    else {
        return Err("EOF but no parts");
    };
    if first > 1 {
        return Err("the first part is missing");
    }
    let n = p.parts.len() as u64;
    if n == 1 {
        return if p.late { Err("one part, after its EOF: it may be the first of several") } else { Ok(()) };
    }
    // Cheap tests of the last counter first, so that the full walk runs
    // about once per message, however many parts it has.
    let (first_len, last_len) = (first_piece.chars().count() as u64, last_piece.chars().count() as u64);
    let before_last = p.chars - last_len;
    let candidates = [
        (Numbering::Chunks { from: first }, last - first == n - 1),
        (Numbering::Offsets, first == 0 && last == before_last),
        (Numbering::Substr, first == 0 && last == before_last + 1),
        (Numbering::Positions, first == 1 && last == before_last + 1),
    ];
    let mut why = "a gap: no numbering fits the parts yet";
    for (numbering, plausible) in candidates {
        if !plausible {
            continue;
        }
        // The piece size is the first piece's (substr: plus one).
        let size = first_len + u64::from(numbering == Numbering::Substr);
        if !exact && last_len >= size {
            why = "the last piece is full-size: more parts may follow";
            continue;
        }
        // Proof in any order: counted from 0, or 1-based positions (with
        // pieces of one character these are chunk numbers from 1).
        let any_order = first == 0 || (numbering == Numbering::Positions && size > 1);
        match seed_fit(&p.parts, numbering) {
            Fit::No => {}
            Fit::FullEnd => why = "the last piece is full-size: more parts may follow",
            Fit::ShortEnd if any_order || !p.late => return Ok(()),
            Fit::ShortEnd => why = "numbered from 1 with parts after the EOF's batch: part 0 may still come",
        }
    }
    Err(why)
}

/// How `parts` (two or more) fit `numbering`.
fn seed_fit(parts: &BTreeMap<u64, Box<str>>, numbering: Numbering) -> Fit {
    let n = parts.len();
    // Characters before the current piece, and the piece size `C`.
    let mut before = 0u64;
    let mut size = 0u64;
    for (i, (&at, piece)) in parts.iter().enumerate() {
        let len = piece.chars().count() as u64;
        let (expected, slot) = match numbering {
            Numbering::Chunks { from } => (from + i as u64, len),
            Numbering::Offsets => (before, len),
            Numbering::Substr if i == 0 => (0, len + 1),
            Numbering::Substr | Numbering::Positions => (before + 1, len),
        };
        if at != expected {
            return Fit::No;
        }
        if i == 0 {
            size = slot;
        } else if i < n - 1 && slot != size {
            return Fit::No;
        } else if i == n - 1 {
            return match len.cmp(&size) {
                std::cmp::Ordering::Less => Fit::ShortEnd,
                std::cmp::Ordering::Equal => Fit::FullEnd,
                std::cmp::Ordering::Greater => Fit::No,
            };
        }
        before += len;
    }
    Fit::No
}
