//! The wire format: what one notification payload is. See docs/protocol.md.
//!
//! A payload is one of:
//! - a whole event: JSON text (ours always starts with `{"seq" :`, but any
//!   JSON a foreign trigger sends is accepted too);
//! - a chunk of ours: `~c:<seq>:<index>:<count>:<bytes>:<md5>:<data>`;
//! - a reference to a logged event: `~r:<seq>:<bytes>`;
//! - a chunk in the format of seed 004, as triggers already written that way
//!   emit: `<id><offset>:<data>` then `<id>EOF`, the id 36 characters.
//!
//! Parsing borrows from the payload and never panics: anything else is a
//! [`FrameError`].

/// One notification payload, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole event in one notification.
    Whole(&'a str),
    /// One chunk of a large event.
    Chunk(Chunk<'a>),
    /// A large event left in the log, to be fetched by sequence.
    Ref {
        /// The event's sequence in `pubsub.events`.
        seq: i64,
        /// Its size in bytes, known before fetching so a limit can refuse it.
        bytes: u64,
    },
    /// A seed-format chunk: part of the text starting at `offset`.
    SeedPart {
        /// The message id (36 characters, typically a UUID).
        id: &'a str,
        /// The sender's counter (a character offset in seed 004's trigger).
        offset: u64,
        /// The text carried.
        data: &'a str,
    },
    /// The end marker of a seed-format message.
    SeedEof {
        /// The message id.
        id: &'a str,
    },
}

/// One chunk of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// Sequence of the event this chunk belongs to (its message id).
    pub seq: i64,
    /// Position of this chunk, from 0.
    pub index: u32,
    /// How many chunks make the event.
    pub count: u32,
    /// Size of the whole event in bytes.
    pub bytes: u64,
    /// MD5 of the whole event, 32 lowercase hex digits.
    pub md5: &'a str,
    /// The text carried.
    pub data: &'a str,
}

/// Why a payload is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed frame: {0}")]
pub struct FrameError(pub &'static str);

/// Length of a seed-format message id.
pub const SEED_ID_LEN: usize = 36;

/// Data bytes per chunk in the SQL encoder (`pubsub.send`).
pub const CHUNK_DATA_BYTES: usize = 7800;

/// Our chunk frames for `body`, each carrying at most `data_bytes` bytes cut
/// on a character boundary: what `pubsub.send` emits for a body of this
/// size (with [`CHUNK_DATA_BYTES`]) on a table watched with `watch
/// --inline`. pgpubsub never sends chunks from Rust: this is the reference
/// encoder, against which `tests/db/sizes.rs` checks the SQL one, and with
/// which a program that reads `watch --inline` payloads can test its
/// decoder (see [`Reassembler::push_chunk`](crate::reassembly::Reassembler::push_chunk)).
pub fn encode_chunks(seq: i64, body: &str, data_bytes: usize) -> Vec<String> {
    use md5::{Digest, Md5};
    let digest = format!("{:x}", Md5::digest(body.as_bytes()));
    let mut pieces = Vec::with_capacity(body.len() / data_bytes.max(1) + 1);
    let mut rest = body;
    while !rest.is_empty() {
        let mut cut = data_bytes.max(1).min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            // A budget smaller than one character: the character whole.
            cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    let count = pieces.len();
    pieces.iter().enumerate().map(|(i, p)| format!("~c:{seq}:{i}:{count}:{}:{digest}:{p}", body.len())).collect()
}

/// Classifies one payload.
///
/// # Errors
/// A payload that starts like one of our frames (`~`) but does not parse as
/// one; a seed-looking payload is only taken as one when it parses fully, so
/// a foreign payload is never mistaken for a broken chunk.
pub fn parse(payload: &str) -> Result<Frame<'_>, FrameError> {
    if let Some(rest) = payload.strip_prefix("~c:") {
        return parse_chunk(rest).map(Frame::Chunk);
    }
    if let Some(rest) = payload.strip_prefix("~r:") {
        let (seq, bytes) = rest.split_once(':').ok_or(FrameError("reference has no size"))?;
        return Ok(Frame::Ref { seq: number(seq, "reference seq")?, bytes: number(bytes, "reference size")? });
    }
    if payload.starts_with('~') {
        return Err(FrameError("unknown frame type after '~'"));
    }
    Ok(parse_seed(payload).unwrap_or(Frame::Whole(payload)))
}

fn parse_chunk(rest: &str) -> Result<Chunk<'_>, FrameError> {
    let mut parts = rest.splitn(6, ':');
    let mut next = |what| parts.next().ok_or(FrameError(what));
    let seq = number(next("chunk has no seq")?, "chunk seq")?;
    let index: u32 = number(next("chunk has no index")?, "chunk index")?;
    let count: u32 = number(next("chunk has no count")?, "chunk count")?;
    let bytes = number(next("chunk has no size")?, "chunk size")?;
    let md5 = next("chunk has no digest")?;
    let data = next("chunk has no data")?;
    if count == 0 || index >= count {
        return Err(FrameError("chunk index out of range"));
    }
    if md5.len() != 32 || !md5.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(FrameError("chunk digest is not 32 lowercase hex digits"));
    }
    if data.len() as u64 > bytes {
        return Err(FrameError("chunk carries more than its event's size"));
    }
    Ok(Chunk { seq, index, count, bytes, md5, data })
}

fn parse_seed(payload: &str) -> Option<Frame<'_>> {
    let id = payload.get(..SEED_ID_LEN)?;
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return None;
    }
    let rest = &payload[SEED_ID_LEN..];
    if rest == "EOF" {
        return Some(Frame::SeedEof { id });
    }
    let (offset, data) = rest.split_once(':')?;
    if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Frame::SeedPart { id, offset: offset.parse().ok()?, data })
}

fn number<T: std::str::FromStr>(s: &str, what: &'static str) -> Result<T, FrameError> {
    // FromStr for integers accepts a leading '+'; the format has none.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FrameError(what));
    }
    s.parse().map_err(|_| FrameError(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn whole_json_is_whole() {
        assert_eq!(parse(r#"{"a":1}"#), Ok(Frame::Whole(r#"{"a":1}"#)));
        assert_eq!(parse("not json"), Ok(Frame::Whole("not json")));
        assert_eq!(parse(""), Ok(Frame::Whole("")));
    }

    #[test]
    fn our_chunk_parses_and_keeps_colons_in_data() {
        let p = format!("~c:42:1:3:100:{MD5}:a:b:c");
        let Ok(Frame::Chunk(c)) = parse(&p) else { panic!("{p}") };
        assert_eq!((c.seq, c.index, c.count, c.bytes, c.data), (42, 1, 3, 100, "a:b:c"));
    }

    #[test]
    fn broken_chunks_are_errors() {
        for p in [
            "~c:".to_string(),
            "~c:1:0:2:10".to_string(),
            format!("~c:x:0:2:10:{MD5}:d"),
            format!("~c:1:2:2:10:{MD5}:d"),
            format!("~c:1:0:0:10:{MD5}:d"),
            format!("~c:1:0:2:1:{MD5}:toolong"),
            "~c:1:0:2:10:XYZ:d".to_string(),
            format!("~c:+1:0:2:10:{MD5}:d"),
            format!("~c:99999999999999999999:0:2:10:{MD5}:d"),
            "~r:1".to_string(),
            "~r:a:1".to_string(),
            "~z:1".to_string(),
        ] {
            assert!(parse(&p).is_err(), "{p}");
        }
    }

    #[test]
    fn reference() {
        assert_eq!(parse("~r:7:300000"), Ok(Frame::Ref { seq: 7, bytes: 300_000 }));
    }

    #[test]
    fn seed_format() {
        let id = "123e4567-e89b-12d3-a456-426614174000";
        assert_eq!(
            parse(&format!("{id}1000:{{\"x\":1}}")),
            Ok(Frame::SeedPart { id, offset: 1000, data: "{\"x\":1}" })
        );
        assert_eq!(parse(&format!("{id}EOF")), Ok(Frame::SeedEof { id }));
        // A bare id, or an id followed by anything else, is a plain payload.
        assert_eq!(parse(id), Ok(Frame::Whole(id)));
        let odd = format!("{id}EOFX");
        assert_eq!(parse(&odd), Ok(Frame::Whole(&odd)));
        // Multi-byte text in the first 36 bytes is not an id and must not panic.
        let mb = "é".repeat(40);
        assert_eq!(parse(&mb), Ok(Frame::Whole(&mb)));
    }
}
