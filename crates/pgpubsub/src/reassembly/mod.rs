//! Puts chunked events back together, within fixed bounds.
//!
//! Tolerates chunks that arrive twice or out of order; checks each event's
//! size and MD5 (ours), or that its parts provably cover it (seed format, see
//! docs/protocol.md), before releasing it; and
//! bounds what it holds: at most `max_messages` incomplete events and
//! `max_bytes` of their text, each event at most `max_event_bytes`, none older
//! than `max_age`. Whatever it drops is counted in [`Stats`]. When a
//! seed-format event is complete is `seed.rs`'s to say.
//!
//! Two users. The [`Listener`](crate::Listener) puts seed-format messages
//! (foreign notifications) back together. Our own chunks (`~c:` frames) come
//! only from `watch --inline` tables, and the listener takes them as
//! wake-ups and reads the log instead; [`Reassembler::push_chunk`] is for
//! programs that read those payloads themselves.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use crate::stats::Stats;
use crate::wire::Chunk;

mod seed;

use seed::seed_verdict;

/// Bounds on reassembly memory.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Incomplete events held at once; the oldest is evicted past this.
    pub max_messages: usize,
    /// Bytes of incomplete events held at once; oldest evicted past this.
    pub max_bytes: usize,
    /// Largest event accepted, in bytes (chunked or fetched by reference).
    pub max_event_bytes: u64,
    /// How long an incomplete event waits for its missing chunks.
    pub max_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_messages: 1024, max_bytes: 64 << 20, max_event_bytes: 64 << 20, max_age: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum MsgId {
    Seq(i64),
    Seed(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    channel: Box<str>,
    id: MsgId,
}

#[derive(Debug)]
struct Partial {
    started: Instant,
    /// Text held, to keep the byte bound exact.
    held: usize,
    /// Ours: (count, bytes, md5) as the first chunk declared them.
    header: Option<(u32, u64, Box<str>)>,
    /// Seed format: whether `<id>EOF` has arrived.
    eof: bool,
    /// Seed format: whether to decide at the end of this batch: its EOF is
    /// in, and it changed since it was last decided.
    due: bool,
    /// Seed format: whether it was decided with its EOF in, so that the
    /// batch its EOF came in has ended.
    settled: bool,
    /// Seed format: whether a new part arrived in a batch after its EOF's
    /// (a sender's transaction arrives in one batch: this is not one).
    late: bool,
    /// Seed format: characters held, the sum over `parts`.
    chars: u64,
    parts: BTreeMap<u64, Box<str>>,
}

impl Partial {
    /// Marks a seed-format message whose `EOF` is in as due; `true` the first
    /// time since it was last decided.
    fn make_due(&mut self) -> bool {
        let first = self.eof && !self.due;
        self.due |= self.eof;
        first
    }
}

/// Reassembles chunked events of every channel of one listener.
#[derive(Debug)]
pub struct Reassembler {
    limits: Limits,
    stats: Arc<Stats>,
    pending: HashMap<Key, Partial>,
    held: usize,
    /// Events dropped since [`Reassembler::take_losses`] was last called.
    losses: u64,
    /// The last `max_messages` events completed, so that a chunk arriving
    /// again after its event was released is a duplicate, not a new event.
    done: HashSet<Key>,
    done_order: VecDeque<Key>,
}

impl Reassembler {
    /// An empty reassembler that counts into `stats`.
    pub fn new(limits: Limits, stats: Arc<Stats>) -> Self {
        Reassembler {
            limits,
            stats,
            pending: HashMap::new(),
            held: 0,
            losses: 0,
            done: HashSet::new(),
            done_order: VecDeque::new(),
        }
    }

    /// Drops every incomplete event (their connection is gone); returns how
    /// many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.pending.len();
        self.pending.clear();
        self.held = 0;
        self.losses += n as u64;
        n
    }

    /// Events lost (corrupt, evicted, expired, cleared) since the last call:
    /// the listener reads them back from the log.
    pub fn take_losses(&mut self) -> u64 {
        std::mem::take(&mut self.losses)
    }

    /// Incomplete events held now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Bytes of incomplete events held now.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Adds one of our chunks; returns the event text once all have arrived
    /// and its size and digest match.
    ///
    /// For a program that LISTENs on a table watched with `watch --inline`
    /// and reads the events from the payloads, which carry an event over
    /// 8000 bytes in `~c:` chunks (docs/protocol.md). pgpubsub's own
    /// [`Listener`](crate::Listener) does not call it: it reads every event
    /// from the log, and takes chunks as wake-ups.
    ///
    /// ```
    /// # use std::{sync::Arc, time::Instant};
    /// use pgpubsub::reassembly::{Limits, Reassembler};
    /// use pgpubsub::wire::{self, Frame};
    ///
    /// let mut r = Reassembler::new(Limits::default(), Arc::new(pgpubsub::Stats::default()));
    /// let event = format!(r#"{{"seq":7,"kind":"message","channel":"orders","payload":"{}"}}"#, "x".repeat(20_000));
    /// // The payloads of the notifications `watch --inline` sends for it.
    /// let payloads = wire::encode_chunks(7, &event, wire::CHUNK_DATA_BYTES);
    /// let mut whole = None;
    /// for payload in payloads.iter().rev() {
    ///     if let Ok(Frame::Chunk(chunk)) = wire::parse(payload) {
    ///         whole = whole.or(r.push_chunk("orders", &chunk, Instant::now()));
    ///     }
    /// }
    /// assert_eq!(whole, Some(event));
    /// ```
    pub fn push_chunk(&mut self, channel: &str, chunk: &Chunk<'_>, now: Instant) -> Option<String> {
        Stats::bump(&self.stats.chunks);
        if chunk.bytes > self.limits.max_event_bytes {
            // Count the event once, on its first chunk, not once per chunk.
            if chunk.index == 0 {
                Stats::bump(&self.stats.oversize);
                tracing::warn!(channel, seq = chunk.seq, bytes = chunk.bytes, "event over max_event_bytes dropped");
            }
            return None;
        }
        let key = Key { channel: channel.into(), id: MsgId::Seq(chunk.seq) };
        if self.done.contains(&key) {
            Stats::bump(&self.stats.duplicate_chunks);
            return None;
        }
        let entry = self.entry(key.clone(), now);
        let agrees = match &entry.header {
            None => {
                entry.header = Some((chunk.count, chunk.bytes, chunk.md5.into()));
                true
            }
            Some((c, b, m)) => (*c, *b, &**m) == (chunk.count, chunk.bytes, chunk.md5),
        };
        if !agrees {
            return self.drop_corrupt(&key, "chunks disagree on count, size or digest");
        }
        if !self.insert_part(&key, u64::from(chunk.index), chunk.data) {
            return None;
        }
        let p = &self.pending[&key];
        if p.parts.len() < chunk.count as usize {
            return None;
        }
        let p = self.remove(&key)?;
        self.mark_done(key);
        let text: String = p.parts.into_values().collect::<Vec<_>>().concat();
        let digest = format!("{:x}", Md5::digest(text.as_bytes()));
        if text.len() as u64 != chunk.bytes || digest != chunk.md5 {
            Stats::bump(&self.stats.corrupt);
            self.losses += 1;
            tracing::warn!(channel, seq = chunk.seq, "reassembled event fails its size or digest check; dropped");
            return None;
        }
        Some(text)
    }

    /// Adds a seed-format part. Nothing is released here: returns `true`
    /// when the message is now due, to be decided by
    /// [`Reassembler::settle_seed`] at the end of this batch (its `EOF` is in
    /// and this part is new).
    pub fn push_seed_part(&mut self, channel: &str, id: &str, offset: u64, data: &str, now: Instant) -> bool {
        Stats::bump(&self.stats.chunks);
        let key = Key { channel: channel.into(), id: MsgId::Seed(id.into()) };
        let new = !self.entry(key.clone(), now).parts.contains_key(&offset);
        if !self.insert_part(&key, offset, data) || !new {
            return false;
        }
        let Some(p) = self.pending.get_mut(&key) else { return false };
        p.chars += data.chars().count() as u64;
        p.late |= p.settled;
        p.make_due()
    }

    /// Marks a seed-format message as ended. Nothing is released here:
    /// returns `true` when the message is now due, to be decided by
    /// [`Reassembler::settle_seed`] at the end of this batch.
    pub fn push_seed_eof(&mut self, channel: &str, id: &str, now: Instant) -> bool {
        let p = self.entry(Key { channel: channel.into(), id: MsgId::Seed(id.into()) }, now);
        if p.eof {
            return false;
        }
        p.eof = true;
        p.make_due()
    }

    /// Decides a due seed-format message at the end of a batch: returns its
    /// text if its parts provably cover it (see docs/protocol.md, "Seed 004
    /// format"), else keeps it waiting. A batch is what arrived together:
    /// Postgres delivers one transaction's notifications together, so a
    /// sender's parts and `EOF` are all in by its end, in whatever order they
    /// came. Parts arriving after that are late.
    ///
    /// Call it once per `true` from `push_seed_part` or `push_seed_eof`, in
    /// that order, when nothing more has arrived; deciding at the `EOF`
    /// instead would release `5}` of `1:5}`, `EOF`, `0:{"a":`.
    pub fn settle_seed(&mut self, channel: &str, id: &str) -> Option<String> {
        let key = Key { channel: channel.into(), id: MsgId::Seed(id.into()) };
        let p = self.pending.get_mut(&key)?;
        if !std::mem::take(&mut p.due) {
            return None;
        }
        p.settled = true;
        if seed_verdict(p, false).is_err() {
            return None;
        }
        // Not remembered as done: seed 004 keys messages by row id, so the
        // same id legitimately starts a new message on the row's next change.
        let p = self.remove(&key)?;
        Some(p.parts.into_values().collect::<Vec<_>>().concat())
    }

    /// Drops incomplete events older than `max_age`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let max_age = self.limits.max_age;
        let old: Vec<Key> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.started) >= max_age)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &old {
            let Some(p) = self.remove(key) else { continue };
            self.losses += 1;
            Stats::bump(&self.stats.expired);
            let why = match key.id {
                MsgId::Seq(_) => "chunks missing",
                MsgId::Seed(_) => seed_verdict(&p, true).err().unwrap_or("complete"),
            };
            tracing::warn!(channel = &*key.channel, id = ?key.id, parts = p.parts.len(), why, "incomplete event expired; dropped");
        }
        old.len()
    }

    fn entry(&mut self, key: Key, now: Instant) -> &mut Partial {
        if !self.pending.contains_key(&key) {
            while self.pending.len() >= self.limits.max_messages.max(1) {
                self.evict_oldest();
            }
        }
        self.pending.entry(key).or_insert_with(|| Partial {
            started: now,
            held: 0,
            header: None,
            eof: false,
            due: false,
            settled: false,
            late: false,
            chars: 0,
            parts: BTreeMap::new(),
        })
    }

    /// Stores a part unless it is a duplicate; a conflicting duplicate or an
    /// event over its size limit drops the whole event. Returns whether the
    /// event is still pending.
    fn insert_part(&mut self, key: &Key, at: u64, data: &str) -> bool {
        let Some(p) = self.pending.get_mut(key) else {
            return false;
        };
        if let Some(existing) = p.parts.get(&at) {
            if **existing == *data {
                Stats::bump(&self.stats.duplicate_chunks);
                return true;
            }
            self.drop_corrupt(key, "two different chunks at one position");
            return false;
        }
        if (p.held + data.len()) as u64 > self.limits.max_event_bytes {
            self.remove(key);
            Stats::bump(&self.stats.oversize);
            tracing::warn!(channel = &*key.channel, id = ?key.id, "chunked event over max_event_bytes; dropped");
            return false;
        }
        p.held += data.len();
        p.parts.insert(at, data.into());
        self.held += data.len();
        // A hard bound: past it the oldest go, this event too if it alone
        // is over (possible when max_event_bytes > max_bytes).
        while self.held > self.limits.max_bytes && !self.pending.is_empty() {
            self.evict_oldest();
        }
        self.pending.contains_key(key)
    }

    /// Remembers a released event of ours (a bounded window of the latest;
    /// seqs are never reused, so a later chunk of one is a duplicate).
    fn mark_done(&mut self, key: Key) {
        if self.done.insert(key.clone()) {
            self.done_order.push_back(key);
        }
        while self.done_order.len() > self.limits.max_messages.max(1) {
            if let Some(old) = self.done_order.pop_front() {
                self.done.remove(&old);
            }
        }
    }

    fn drop_corrupt(&mut self, key: &Key, why: &'static str) -> Option<String> {
        self.remove(key);
        self.losses += 1;
        Stats::bump(&self.stats.corrupt);
        tracing::warn!(channel = &*key.channel, id = ?key.id, why, "corrupt chunked event dropped");
        None
    }

    fn evict_oldest(&mut self) {
        let oldest = self.pending.iter().min_by_key(|(_, p)| p.started).map(|(k, _)| k.clone());
        if let Some(key) = oldest {
            self.remove(&key);
            self.losses += 1;
            Stats::bump(&self.stats.evicted);
            tracing::warn!(channel = &*key.channel, id = ?key.id, "incomplete event evicted to stay within limits");
        }
    }

    fn remove(&mut self, key: &Key) -> Option<Partial> {
        let p = self.pending.remove(key)?;
        self.held -= p.held;
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &str, size: usize, seq: i64) -> Vec<String> {
        crate::wire::encode_chunks(seq, text, size)
    }

    /// Feeds one frame as a batch of its own (the worst a transport could
    /// do: nothing arrives together); returns what it releases.
    fn push(r: &mut Reassembler, payload: &str, now: Instant) -> Option<String> {
        match crate::wire::parse(payload).unwrap() {
            crate::wire::Frame::Chunk(c) => r.push_chunk("ch", &c, now),
            _ => push_batch(r, &[payload], now).pop(),
        }
    }

    /// Feeds seed frames that arrived together (one transaction's, as
    /// Postgres delivers them), then settles; returns what they release.
    fn push_batch(r: &mut Reassembler, frames: &[impl AsRef<str>], now: Instant) -> Vec<String> {
        let mut due = vec![];
        for f in frames {
            let (id, is_due) = match crate::wire::parse(f.as_ref()).unwrap() {
                crate::wire::Frame::SeedPart { id, offset, data } => {
                    (id, r.push_seed_part("ch", id, offset, data, now))
                }
                crate::wire::Frame::SeedEof { id } => (id, r.push_seed_eof("ch", id, now)),
                other => panic!("{other:?}"),
            };
            if is_due {
                due.push(id.to_string());
            }
        }
        due.iter().filter_map(|id| r.settle_seed("ch", id)).collect()
    }

    fn new(limits: Limits) -> (Reassembler, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        (Reassembler::new(limits, stats.clone()), stats)
    }

    #[test]
    fn reordered_and_duplicated_chunks_reassemble() {
        let (mut r, stats) = new(Limits::default());
        let text = "abcdefghij".repeat(10);
        let mut cs = chunks(&text, 7, 1);
        cs.reverse();
        cs.insert(3, cs[1].clone());
        let now = Instant::now();
        let out: Vec<String> = cs.iter().filter_map(|c| push(&mut r, c, now)).collect();
        assert_eq!(out, vec![text]);
        assert_eq!(stats.snapshot().duplicate_chunks, 1);
        assert_eq!((r.pending(), r.held_bytes()), (0, 0));
    }

    #[test]
    fn a_changed_chunk_fails_the_digest() {
        let (mut r, stats) = new(Limits::default());
        let mut cs = chunks("hello world, hello world", 5, 2);
        // Same length, one byte changed: only the digest can tell.
        cs[1].pop();
        cs[1].push('#');
        let now = Instant::now();
        assert!(cs.iter().all(|c| push(&mut r, c, now).is_none()));
        assert_eq!(stats.snapshot().corrupt, 1);
    }

    #[test]
    fn conflicting_duplicate_drops_the_event() {
        let (mut r, stats) = new(Limits::default());
        let cs = chunks("0123456789", 5, 3);
        let now = Instant::now();
        assert!(push(&mut r, &cs[0], now).is_none());
        let other = cs[0].replace(":01234", ":0123X");
        assert!(push(&mut r, &other, now).is_none());
        assert_eq!(stats.snapshot().corrupt, 1);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn missing_chunk_expires() {
        let (mut r, stats) = new(Limits { max_age: Duration::from_secs(5), ..Limits::default() });
        let cs = chunks("0123456789", 3, 4);
        let t0 = Instant::now();
        assert!(push(&mut r, &cs[0], t0).is_none());
        assert_eq!(r.expire(t0 + Duration::from_secs(1)), 0);
        assert_eq!(r.expire(t0 + Duration::from_secs(6)), 1);
        assert_eq!((stats.snapshot().expired, r.pending(), r.held_bytes()), (1, 0, 0));
    }

    #[test]
    fn limits_evict_oldest_and_refuse_oversize() {
        let (mut r, stats) = new(Limits { max_messages: 2, max_event_bytes: 100, ..Limits::default() });
        let t0 = Instant::now();
        for seq in 0..3 {
            let cs = chunks("0123456789", 5, seq);
            assert!(push(&mut r, &cs[0], t0 + Duration::from_millis(seq as u64)).is_none());
        }
        assert_eq!((r.pending(), stats.snapshot().evicted), (2, 1));
        let big = chunks(&"x".repeat(200), 50, 9);
        assert!(big.iter().all(|c| push(&mut r, c, t0).is_none()));
        assert_eq!(stats.snapshot().oversize, 1);
    }

    #[test]
    fn byte_bound_holds() {
        let (mut r, stats) = new(Limits { max_bytes: 25, ..Limits::default() });
        let t0 = Instant::now();
        for seq in 0..10 {
            let cs = chunks(&"y".repeat(40), 10, seq);
            push(&mut r, &cs[0], t0 + Duration::from_millis(seq as u64));
            assert!(r.held_bytes() <= 25);
        }
        assert!(stats.snapshot().evicted >= 7);
    }

    #[test]
    fn seed_format_by_offset_and_by_number() {
        let id = "123e4567-e89b-12d3-a456-426614174000";
        let text: String = "ü0123456789".repeat(300);
        // seed 004's counters: 0 (999 chars), 1000, 2000, ...
        let chars: Vec<char> = text.chars().collect();
        let mut frames = vec![format!("{id}0:{}", chars[..999].iter().collect::<String>())];
        let mut at = 1000;
        while at <= chars.len() {
            let end = (at - 1 + 1000).min(chars.len());
            frames.push(format!("{id}{at}:{}", chars[at - 1..end].iter().collect::<String>()));
            at += 1000;
        }
        frames.push(format!("{id}EOF"));
        let (mut r, _) = new(Limits::default());
        let now = Instant::now();
        // EOF first and parts reversed: still complete once all are in.
        frames.rotate_right(1);
        frames[1..].reverse();
        let out: Vec<String> = frames.iter().filter_map(|f| push(&mut r, f, now)).collect();
        assert_eq!(out, vec![text.clone()]);

        // Numbered 0, 1: released once a short last piece ends it ("ab",
        // "cd" alone could be the start of "abcde": see
        // seed_full_last_piece_is_not_provably_the_end).
        let numbered = [format!("{id}0:ab"), format!("{id}1:cd"), format!("{id}EOF"), format!("{id}2:e")];
        let out: Vec<String> = numbered.iter().filter_map(|f| push(&mut r, f, now)).collect();
        assert_eq!(out, vec!["abcde".to_string()]);
    }

    #[test]
    fn seed_gap_waits_then_expires() {
        let id = "abcdefabcdefabcdefabcdefabcdefabcdef";
        let (mut r, stats) = new(Limits { max_age: Duration::from_secs(1), ..Limits::default() });
        let t0 = Instant::now();
        assert!(push(&mut r, &format!("{id}0:abc"), t0).is_none());
        assert!(push(&mut r, &format!("{id}2000:xyz"), t0).is_none());
        assert!(push(&mut r, &format!("{id}EOF"), t0).is_none());
        assert_eq!(r.expire(t0 + Duration::from_secs(2)), 1);
        assert_eq!(stats.snapshot().expired, 1);
    }

    // ---- Seed 004 frames as other programs write them ----

    const ID: &str = "123e4567-e89b-12d3-a456-426614174000";

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Numbering {
        /// Chunk numbers 0, 1, 2, …
        From0,
        /// Chunk numbers 1, 2, 3, …
        From1,
        /// 0-based character offsets 0, size, 2·size, …
        Offsets,
        /// Seed 004's trigger: `substr(doc, pos, size)` for pos 0, size, …
        /// while `pos <= length(doc)`.
        Substr,
        /// 1-based character positions 1, 1 + size, 1 + 2·size, …
        Positions,
    }

    /// The parts a sender numbering this way sends for `text`, cut every
    /// `size` characters, in the order it sends them (EOF not included).
    fn seed_parts(text: &str, numbering: Numbering, size: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let piece = |a: usize, b: usize| chars[a.min(chars.len())..b.min(chars.len())].iter().collect::<String>();
        if numbering == Numbering::Substr {
            let mut out = vec![];
            let mut pos = 0;
            while pos <= chars.len() {
                // 1-based positions pos..pos+size-1, clipped to 1..=length.
                out.push(format!("{ID}{pos}:{}", piece(pos.max(1) - 1, pos + size - 1)));
                pos += size;
            }
            return out;
        }
        // An empty text is still sent as one (empty) part.
        let starts: Vec<usize> = (0..chars.len().max(1)).step_by(size).collect();
        let counter = |i: usize, at: usize| match numbering {
            Numbering::From0 => i,
            Numbering::From1 => i + 1,
            Numbering::Positions => at + 1,
            _ => at,
        };
        starts.iter().enumerate().map(|(i, &at)| format!("{ID}{}:{}", counter(i, at), piece(at, at + size))).collect()
    }

    /// A deterministic shuffle (xorshift), so failures replay.
    fn shuffled(v: &[String], seed: u64) -> Vec<String> {
        let mut v = v.to_vec();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    /// The arrival orders to try: (name, frames, whether every part
    /// arrives before the EOF).
    fn arrangements(parts: &[String]) -> Vec<(String, Vec<String>, bool)> {
        let eof = format!("{ID}EOF");
        let n = parts.len();
        assert!(n >= 4, "EOF in the middle needs at least two parts on each side");
        let with_eof_at = |v: &[String], at: usize| {
            let mut v = v.to_vec();
            v.insert(at, eof.clone());
            v
        };
        let mut out = vec![
            ("in order".to_string(), with_eof_at(parts, n), true),
            ("EOF first".to_string(), with_eof_at(parts, 0), false),
            ("EOF in the middle".to_string(), with_eof_at(parts, n / 2), false),
        ];
        let mut rev = with_eof_at(parts, n);
        rev.reverse();
        out.push(("reversed".to_string(), rev, false));
        for seed in 1..=12 {
            let s = shuffled(parts, seed);
            out.push((format!("shuffled #{seed}"), with_eof_at(&s, n), true));
            out.push((format!("shuffled #{seed}, EOF first"), with_eof_at(&s, 0), false));
            out.push((format!("shuffled #{seed}, EOF in the middle"), with_eof_at(&s, n / 2), false));
            // Every part twice, the copies shuffled in among the first.
            let mut dup = parts.to_vec();
            dup.extend(shuffled(parts, seed + 100));
            let dup = shuffled(&dup, seed + 200);
            out.push((format!("duplicated #{seed}"), with_eof_at(&dup, dup.len()), true));
            out.push((format!("duplicated #{seed}, EOF in the middle"), with_eof_at(&dup, dup.len() / 2), false));
        }
        out
    }

    /// Multi-byte text of `n` characters, so that offsets in bytes and in
    /// characters differ.
    fn multibyte(n: usize) -> String {
        "ñandú 🦤 é0123456789{}\"".chars().cycle().take(n).collect()
    }

    /// Feeds `frames`; returns what was released.
    fn feed_seed(r: &mut Reassembler, frames: &[String], now: Instant) -> Vec<String> {
        frames.iter().filter_map(|f| push(r, f, now)).collect()
    }

    /// Whether every distinct part in `frames` comes before the first EOF.
    fn parts_before_eof(frames: &[String]) -> bool {
        let eof = frames.iter().position(|f| f.ends_with("EOF")).unwrap_or(frames.len());
        frames[eof..].iter().all(|f| f.ends_with("EOF") || frames[..eof].contains(f))
    }

    /// Every arrangement of `text` sent this way is released exactly once,
    /// whole, with nothing left behind: when it arrives together (one
    /// transaction), and frame by frame except for the two arrangements only
    /// arrival order can tell apart.
    fn assert_every_order_reassembles(numbering: Numbering, text: &str, size: usize) {
        let parts = seed_parts(text, numbering, size);
        for (name, frames, _) in arrangements(&parts) {
            let (mut r, _) = new(Limits::default());
            assert_eq!(push_batch(&mut r, &frames, Instant::now()), [text], "{numbering:?}, {name}, together");
            assert_eq!((r.pending(), r.held_bytes()), (0, 0), "{numbering:?}, {name}, together");
            let eof = frames.iter().position(|f| f.ends_with("EOF")).unwrap();
            let before: Vec<&String> = parts.iter().filter(|p| frames[..eof].contains(p)).collect();
            if before.len() == 1 && before[0] == &parts[0] {
                // Part 0 alone, then EOF: a whole one-part message.
                continue;
            }
            if numbering == Numbering::From0 && before.len() == parts.len() - 1 && !before.contains(&&parts[0]) {
                // Parts 1..n, then EOF: a whole message numbered from 1.
                continue;
            }
            let (mut r, stats) = new(Limits::default());
            let now = Instant::now();
            let mut out = vec![];
            for (i, f) in frames.iter().enumerate() {
                if let Some(text) = push(&mut r, f, now) {
                    out.push(text);
                    // Nothing is held once it is released. (A copy arriving
                    // later starts a new message: seed ids are row ids.)
                    assert_eq!((r.pending(), r.held_bytes()), (0, 0), "{numbering:?}, {name}");
                    assert!(frames[i + 1..].iter().all(|f| frames[..=i].contains(f)), "{numbering:?}, {name}: early");
                }
            }
            assert!(out.len() == 1 && out[0] == text, "{numbering:?}, {name}: released {out:?}");
            assert_eq!(stats.snapshot().corrupt, 0, "{numbering:?}, {name}");
        }
    }

    #[test]
    fn seed_chunk_numbers_from_0() {
        assert_every_order_reassembles(Numbering::From0, &multibyte(3_456), 1000);
        assert_every_order_reassembles(Numbering::From0, &multibyte(101), 7);
    }

    #[test]
    fn seed_char_offsets_from_0() {
        assert_every_order_reassembles(Numbering::Offsets, &multibyte(3_456), 1000);
        assert_every_order_reassembles(Numbering::Offsets, &multibyte(101), 7);
    }

    #[test]
    fn seed_char_positions_from_1() {
        assert_every_order_reassembles(Numbering::Positions, &multibyte(3_456), 1000);
        assert_every_order_reassembles(Numbering::Positions, &multibyte(101), 7);
        let parts = seed_parts(&multibyte(2_500), Numbering::Positions, 1000);
        let counters: Vec<&str> = parts.iter().map(|p| p[ID.len()..].split_once(':').unwrap().0).collect();
        assert_eq!(counters, ["1", "1001", "2001"]);
    }

    /// Found by a test through `listen`: one transaction sends part 1, the
    /// EOF, then part 0. Decided at the EOF, `5}` was released alone and
    /// part 0 expired; decided when the batch ends, the message is whole.
    #[test]
    fn seed_part_after_its_eof_in_one_transaction_is_not_cut_off() {
        let (mut r, stats) = new(Limits::default());
        let frames = [format!("{ID}1:5}}"), format!("{ID}EOF"), format!("{ID}0:{{\"a\":")];
        assert_eq!(push_batch(&mut r, &frames, Instant::now()), [r#"{"a":5}"#]);
        assert_eq!((r.pending(), stats.snapshot().expired), (0, 0));
    }

    #[test]
    fn seed_substr_offsets() {
        assert_every_order_reassembles(Numbering::Substr, &multibyte(3_456), 1000);
        assert_every_order_reassembles(Numbering::Substr, &multibyte(101), 7);
        // The seed's own frames: 999 characters at 0, then 1000 each.
        let parts = seed_parts(&multibyte(2_500), Numbering::Substr, 1000);
        let lens: Vec<usize> = parts.iter().map(|p| p.split_once(':').unwrap().1.chars().count()).collect();
        assert_eq!(lens, [999, 1000, 501]);
        assert!(parts[1].starts_with(&format!("{ID}1000:")));
    }

    /// Numbered from 1, a message is released when all its parts came
    /// with its EOF or before, in any order. When parts come in a batch after
    /// the EOF's it waits, then expires: counted, never truncated. (Parts
    /// 1..n then EOF cannot be told from a message numbered from 0 whose part
    /// 0 is still to come.)
    #[test]
    fn seed_chunk_numbers_from_1() {
        for (text, size) in [(multibyte(3_456), 1000), (multibyte(101), 7)] {
            let parts = seed_parts(&text, Numbering::From1, size);
            for (name, frames, _) in arrangements(&parts) {
                let (mut r, _) = new(Limits::default());
                assert_eq!(push_batch(&mut r, &frames, Instant::now()), [text.as_str()], "{name}, together");
                // Frame by frame:
                let (mut r, stats) = new(Limits { max_age: Duration::from_secs(1), ..Limits::default() });
                let t0 = Instant::now();
                let out = feed_seed(&mut r, &frames, t0);
                if parts_before_eof(&frames) {
                    assert!(out.len() == 1 && out[0] == text, "{name}: released {out:?}");
                } else {
                    assert!(out.is_empty(), "{name}: released {out:?}");
                    assert_eq!(r.expire(t0 + Duration::from_secs(2)), 1, "{name}");
                    assert_eq!(stats.snapshot().expired, 1, "{name}");
                }
            }
        }
    }

    /// A sender counting offsets in bytes is not one of the numberings:
    /// on multi-byte text nothing fits, and nothing is released.
    #[test]
    fn seed_offsets_count_characters_not_bytes() {
        let text = multibyte(35);
        let (a, b) = text.split_at(text.char_indices().nth(20).unwrap().0);
        let frames = [format!("{ID}0:{a}"), format!("{ID}{}:{b}", a.len()), format!("{ID}EOF")];
        assert_ne!(a.len(), 20);
        let (mut r, _) = new(Limits::default());
        assert!(feed_seed(&mut r, &frames, Instant::now()).is_empty());
        // The same in characters is released.
        let frames = [format!("{ID}0:{a}"), format!("{ID}20:{b}"), format!("{ID}EOF")];
        let (mut r, _) = new(Limits::default());
        assert_eq!(feed_seed(&mut r, &frames, Instant::now()), vec![text.clone()]);
    }

    /// A missing part (first, middle or last), under every numbering and in
    /// every order, arriving together or frame by frame, never releases a
    /// truncated message; it expires, counted and warned about.
    #[test]
    fn seed_gap_never_releases_and_expires_with_a_warning() {
        let all = [Numbering::From0, Numbering::From1, Numbering::Offsets, Numbering::Substr, Numbering::Positions];
        for numbering in all {
            let text = multibyte(101);
            let parts = seed_parts(&text, numbering, 7);
            for missing in [0, 1, parts.len() / 2, parts.len() - 1] {
                let mut sent = parts.clone();
                sent.remove(missing);
                for (name, frames, _) in arrangements(&sent) {
                    let (mut r, _) = new(Limits::default());
                    let together = push_batch(&mut r, &frames, Instant::now());
                    if numbering == Numbering::From0 && missing == 0 {
                        // Read as a whole message numbered from 1.
                        assert_eq!(together.len(), 1, "{numbering:?}, part 0 missing, {name}, together");
                    } else {
                        assert!(together.is_empty(), "{numbering:?}, part {missing} missing, {name}: {together:?}");
                    }
                    let (mut r, stats) = new(Limits { max_age: Duration::from_secs(1), ..Limits::default() });
                    let t0 = Instant::now();
                    let out = feed_seed(&mut r, &frames, t0);
                    let what = format!("{numbering:?}, part {missing} missing, {name}");
                    if numbering == Numbering::From0 && missing == 0 && parts_before_eof(&frames) {
                        // The one ambiguity left: parts 1..n, all before
                        // their EOF, are a whole message numbered from 1.
                        let rest: String = sent.iter().map(|p| p.split_once(':').unwrap().1).collect();
                        assert_eq!(out, vec![rest], "{what}");
                        continue;
                    }
                    assert!(out.is_empty(), "{what}: released {out:?}");
                    let warnings = capture_warnings(|| assert_eq!(r.expire(t0 + Duration::from_secs(2)), 1, "{what}"));
                    assert_eq!((stats.snapshot().expired, r.pending(), r.held_bytes()), (1, 0, 0), "{what}");
                    assert!(warnings.len() == 1 && warnings[0].contains("expired"), "{what}: {warnings:?}");
                }
            }
        }
    }

    /// A text that fills its last piece exactly cannot be told from one whose
    /// further parts are still on the way (an EOF that overtook them): it
    /// waits, and expires if nothing follows. A short last piece ends it.
    #[test]
    fn seed_full_last_piece_is_not_provably_the_end() {
        for numbering in [Numbering::From0, Numbering::Offsets, Numbering::Substr] {
            // Pieces of 7, 7, 7 (substr: 6, 7, 7): the cut fills the last.
            let full = multibyte(if numbering == Numbering::Substr { 20 } else { 21 });
            let mut frames = seed_parts(&full, numbering, 7);
            assert_eq!(frames.len(), 3);
            frames.push(format!("{ID}EOF"));
            let (mut r, stats) = new(Limits { max_age: Duration::from_secs(1), ..Limits::default() });
            let t0 = Instant::now();
            assert!(feed_seed(&mut r, &frames, t0).is_empty(), "{numbering:?}");
            assert_eq!(r.expire(t0 + Duration::from_secs(2)), 1);
            assert_eq!(stats.snapshot().expired, 1);
            // Two full parts, EOF, then a short third: released whole, and
            // not at the EOF.
            let text = multibyte(18);
            let parts = seed_parts(&text, numbering, 7);
            assert_eq!(parts.len(), 3);
            let eof = format!("{ID}EOF");
            assert!(feed_seed(&mut r, &[parts[0].clone(), parts[1].clone(), eof], t0).is_empty(), "{numbering:?}");
            assert_eq!(feed_seed(&mut r, &parts[2..], t0), vec![text], "{numbering:?}");
        }
    }

    /// One part then its EOF is a whole message (the sender's order), and so
    /// is one part with its EOF in one batch; one part in a batch after its
    /// EOF's may be the first of several, and waits.
    #[test]
    fn seed_lone_part() {
        for counter in [0, 1] {
            let (mut r, stats) = new(Limits { max_age: Duration::from_secs(1), ..Limits::default() });
            let t0 = Instant::now();
            let part = format!("{ID}{counter}:{}", multibyte(50));
            let eof = format!("{ID}EOF");
            assert_eq!(feed_seed(&mut r, &[part.clone(), eof.clone()], t0), vec![multibyte(50)]);
            assert_eq!(push_batch(&mut r, &[eof.clone(), part.clone()], t0), vec![multibyte(50)]);
            assert!(feed_seed(&mut r, &[eof, part], t0).is_empty());
            assert_eq!(r.expire(t0 + Duration::from_secs(2)), 1);
            assert_eq!(stats.snapshot().expired, 1);
        }
        // seed 004's trigger on an empty text: one empty part at 0.
        let (mut r, _) = new(Limits::default());
        assert_eq!(seed_parts("", Numbering::Substr, 1000), vec![format!("{ID}0:")]);
        assert_eq!(feed_seed(&mut r, &[format!("{ID}0:"), format!("{ID}EOF")], Instant::now()), vec![String::new()]);
    }

    /// Warnings logged while `f` runs.
    fn capture_warnings(f: impl FnOnce()) -> Vec<String> {
        use std::sync::Mutex;
        struct Capture(Arc<Mutex<Vec<String>>>);
        impl tracing::Subscriber for Capture {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, e: &tracing::Event<'_>) {
                if *e.metadata().level() == tracing::Level::WARN {
                    let mut s = String::new();
                    e.record(&mut |f: &tracing::field::Field, v: &dyn std::fmt::Debug| {
                        s.push_str(&format!("{}={v:?} ", f.name()));
                    });
                    self.0.lock().unwrap().push(s);
                }
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Capture(seen.clone()), f);
        let seen = seen.lock().unwrap().clone();
        seen
    }
}
