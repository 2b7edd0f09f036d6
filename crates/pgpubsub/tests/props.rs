//! Property tests for the decoders: the frame parser, chunk reassembly and
//! event decoding never panic, never exceed their bounds, and reassemble
//! exactly what was sent whatever the order and duplication of chunks.
//!
//! `PROPTEST_CASES=N` sets how hard they try (256 by default); the long run
//! is `scripts/fuzz` (see docs/delivery.md). Inputs that once failed are kept
//! in `tests/props.proptest-regressions` and replayed first; `tests/corpus/` holds
//! hand-picked payloads replayed on every run.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpubsub::internals::{json_string, Logged};
use pgpubsub::reassembly::{Limits, Reassembler};
use pgpubsub::wire::{self, Frame};
use pgpubsub::{Event, Stats};
use proptest::prelude::*;

fn encode(text: &str, size: usize, seq: i64) -> Vec<String> {
    wire::encode_chunks(seq, text, size)
}

/// Feeds one payload the way the listener does, as a batch of its own
/// (nothing arrived with it); returns a completed text.
fn feed(r: &mut Reassembler, channel: &str, payload: &str, now: Instant) -> Option<String> {
    match wire::parse(payload) {
        Ok(Frame::Chunk(c)) => r.push_chunk(channel, &c, now),
        Ok(Frame::SeedPart { id, offset, data }) => {
            r.push_seed_part(channel, id, offset, data, now).then(|| r.settle_seed(channel, id)).flatten()
        }
        Ok(Frame::SeedEof { id }) => r.push_seed_eof(channel, id, now).then(|| r.settle_seed(channel, id)).flatten(),
        Ok(Frame::Whole(t)) => Some(t.to_string()),
        Ok(Frame::Ref { .. }) | Err(_) => None,
    }
}

/// Feeds seed frames that arrived together (one transaction's), then
/// settles the messages that are due, as the listener does at the end of a
/// batch; returns what they release.
fn feed_batch(r: &mut Reassembler, frames: &[String], now: Instant) -> Vec<String> {
    let mut due = vec![];
    for f in frames {
        let (id, is_due) = match wire::parse(f) {
            Ok(Frame::SeedPart { id, offset, data }) => (id, r.push_seed_part("ch", id, offset, data, now)),
            Ok(Frame::SeedEof { id }) => (id, r.push_seed_eof("ch", id, now)),
            other => panic!("{other:?}"),
        };
        if is_due {
            due.push(id.to_string());
        }
    }
    due.iter().filter_map(|id| r.settle_seed("ch", id)).collect()
}

/// A deterministic shuffle (xorshift) driven by a generated seed.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// A seed-format message for `text` cut into pieces of `size` characters and
/// numbered one of four ways (chunk numbers from 0 or 1, character offsets
/// from 0, positions from 1), then its EOF; and whether a reader can prove
/// it whole (one part, or a last piece shorter than the others).
fn seed_frames(text: &str, size: usize, numbering: u8) -> (Vec<String>, bool) {
    let id = "123e4567-e89b-12d3-a456-426614174000";
    let chars: Vec<char> = text.chars().collect();
    let pieces: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
    let mut frames: Vec<String> = pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let counter = match numbering {
                0 => i,
                1 => i + 1,
                2 => i * size,
                _ => i * size + 1,
            };
            format!("{id}{counter}:{piece}")
        })
        .collect();
    frames.push(format!("{id}EOF"));
    let provable = pieces.len() == 1 || pieces.last().map_or(0, |p| p.chars().count()) < size;
    (frames, provable)
}

fn reassembler(limits: Limits) -> (Reassembler, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    (Reassembler::new(limits, stats.clone()), stats)
}

/// Payloads that look like frames, or nearly: the interesting space.
fn framey() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "~[cr]:[0-9:a-f~]{0,60}.{0,20}",
        "~c:[0-9]{1,3}:[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,4}:[0-9a-f]{32}:.{0,40}",
        "~r:[0-9]{0,25}:[0-9]{0,25}",
        "[A-Za-z0-9_-]{36}([0-9]{1,6}:.{0,30}|EOF)",
        "\\{.{0,60}\\}",
    ]
}

proptest! {
    /// A message logged apart renders to JSON of exactly the length
    /// counted, whose payload decodes to the text stored, whatever it is.
    #[test]
    fn a_payload_logged_apart_renders_exactly(payload in any::<String>(), seq in 0i64..1 << 40) {
        let head = format!(r#"{{"seq":{seq},"txid":1,"kind":"message","channel":"c","time":"t"}}"#);
        let logged = Logged::new(head, Some(payload.clone()));
        let len = logged.json_len();
        let json = logged.clone().into_json().unwrap();
        prop_assert_eq!(json.len() as u64, len);
        // The event built from the parts is the one decoding the JSON gives.
        let moved = logged.into_event("c", len).unwrap();
        prop_assert_eq!(moved.json(), json.as_str());
        let e = Event::decode("c", json).unwrap();
        prop_assert_eq!(e.seq, Some(seq));
        prop_assert_eq!(&e.message().unwrap().payload, &payload);
        prop_assert_eq!(&moved.message().unwrap().payload, &payload);
    }

    /// The eight-bytes-at-a-time escaper agrees with serde_json on any text,
    /// dense with characters to escape or not.
    #[test]
    fn json_strings_escape_as_serde_json_does(s in prop_oneof![any::<String>(), "[\\x00-\\x21\"\\\\a-c\u{7f}é]{0,40}"]) {
        let mut out = String::new();
        json_string::write(&mut out, &s);
        let want = serde_json::to_string(&s).unwrap();
        prop_assert_eq!(out, want.clone());
        prop_assert_eq!(json_string::len(s.as_bytes()), want.len());
    }

    #[test]
    fn parsing_any_payload_never_panics(p in framey()) {
        let _ = wire::parse(&p);
    }

    #[test]
    fn decoding_any_text_never_panics_and_json_is_one_line(p in framey()) {
        if let Ok(e) = Event::decode("ch", p) {
            prop_assert!(!e.json().contains('\n'));
            prop_assert!(serde_json::from_str::<serde_json::Value>(e.json()).is_ok());
        }
    }

    #[test]
    fn any_json_value_decodes(v in arb_json()) {
        let e = Event::decode("ch", v.to_string()).unwrap();
        prop_assert!(!e.json().contains('\n'));
    }

    #[test]
    fn chunks_in_any_order_with_duplicates_reassemble_exactly_once(
        text in "\\PC{1,400}",
        size in 1usize..64,
        order in any::<prop::sample::Index>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
    ) {
        let mut frames = encode(&text, size, 7);
        for d in &dups {
            let f = frames[d.index(frames.len())].clone();
            frames.push(f);
        }
        // A deterministic shuffle driven by the generated index.
        let k = order.index(frames.len().max(1));
        frames.rotate_left(k);
        frames.reverse();
        let (mut r, stats) = reassembler(Limits::default());
        let now = Instant::now();
        let out: Vec<String> = frames.iter().filter_map(|f| feed(&mut r, "ch", f, now)).collect();
        prop_assert_eq!(out, vec![text]);
        prop_assert_eq!(stats.snapshot().corrupt, 0);
        prop_assert_eq!(r.pending(), 0);
    }

    /// A seed-format message that arrives together, in any order and with
    /// repeats, is released whole, once, when it can be proven whole, and
    /// never released cut or reordered.
    #[test]
    fn seed_frames_arriving_together_in_any_order_reassemble_exactly(
        text in "\\PC{1,300}",
        size in 1usize..40,
        numbering in 0u8..4,
        seed in any::<u64>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
    ) {
        let (mut frames, provable) = seed_frames(&text, size, numbering);
        for d in &dups {
            let f = frames[d.index(frames.len())].clone();
            frames.push(f);
        }
        shuffle(&mut frames, seed);
        let (mut r, stats) = reassembler(Limits::default());
        let out = feed_batch(&mut r, &frames, Instant::now());
        if provable {
            prop_assert_eq!(out, vec![text]);
            prop_assert_eq!(r.pending(), 0);
        } else {
            prop_assert!(out.is_empty(), "{:?}", out);
        }
        prop_assert_eq!(stats.snapshot().corrupt, 0);
    }

    #[test]
    fn any_mix_of_frames_stays_within_bounds(
        payloads in prop::collection::vec(framey(), 0..200),
        max_messages in 1usize..8,
        max_bytes in 1usize..500,
    ) {
        let limits = Limits { max_messages, max_bytes, max_event_bytes: 1000, max_age: Duration::from_secs(30) };
        let (mut r, _) = reassembler(limits);
        let now = Instant::now();
        for (i, p) in payloads.iter().enumerate() {
            let channel = if i % 3 == 0 { "a" } else { "b" };
            if let Some(text) = feed(&mut r, channel, p, now) {
                // Released text never exceeds the event limit (whole frames are
                // bounded by Postgres, not by us).
                prop_assert!(text.len() <= 1000 || wire::parse(p) == Ok(Frame::Whole(p)));
            }
            prop_assert!(r.pending() <= max_messages);
            prop_assert!(r.held_bytes() <= max_bytes);
        }
        r.expire(now + Duration::from_secs(31));
        prop_assert_eq!((r.pending(), r.held_bytes()), (0, 0));
    }

    #[test]
    fn a_flipped_byte_is_caught(text in "[a-z]{20,200}", at in any::<prop::sample::Index>()) {
        let mut frames = encode(&text, 16, 9);
        let i = at.index(frames.len());
        // Change the last character of one chunk's data, same length.
        let last = frames[i].pop().unwrap();
        frames[i].push(if last == 'z' { 'y' } else { 'z' });
        let (mut r, stats) = reassembler(Limits::default());
        let now = Instant::now();
        let out: Vec<String> = frames.iter().filter_map(|f| feed(&mut r, "ch", f, now)).collect();
        prop_assert!(out.is_empty());
        prop_assert_eq!(stats.snapshot().corrupt, 1);
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "\\PC{0,20}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("(seq|kind|channel|op|new|old|payload|txid|[a-z]{1,5})", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every file in tests/corpus: parsed, decoded and fed, without a panic.
#[test]
fn corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut n = 0;
    let (mut r, _) = reassembler(Limits::default());
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let _ = wire::parse(line);
            let _ = Event::decode("ch", line.to_string());
            let _ = feed(&mut r, "ch", line, Instant::now());
            n += 1;
        }
    }
    assert!(n >= 20, "corpus has only {n} payloads");
}
