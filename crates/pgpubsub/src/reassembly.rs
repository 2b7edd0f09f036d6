//! Puts chunked events back together, within fixed bounds.
//!
//! Tolerates chunks that arrive twice or out of order; checks each event's
//! size and MD5 (ours) or contiguity (seed format) before releasing it; and
//! bounds what it holds: at most `max_messages` incomplete events and
//! `max_bytes` of their text, each event at most `max_event_bytes`, none older
//! than `max_age`. Whatever it drops is counted in [`Stats`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use crate::stats::Stats;
use crate::wire::Chunk;

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
    parts: BTreeMap<u64, Box<str>>,
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

    /// Adds a seed-format part.
    pub fn push_seed_part(&mut self, channel: &str, id: &str, offset: u64, data: &str, now: Instant) -> Option<String> {
        Stats::bump(&self.stats.chunks);
        let key = Key { channel: channel.into(), id: MsgId::Seed(id.into()) };
        self.entry(key.clone(), now);
        if !self.insert_part(&key, offset, data) {
            return None;
        }
        self.try_finish_seed(&key)
    }

    /// Marks a seed-format message as ended.
    pub fn push_seed_eof(&mut self, channel: &str, id: &str, now: Instant) -> Option<String> {
        let key = Key { channel: channel.into(), id: MsgId::Seed(id.into()) };
        self.entry(key.clone(), now).eof = true;
        self.try_finish_seed(&key)
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
            self.remove(key);
            self.losses += 1;
            Stats::bump(&self.stats.expired);
            tracing::warn!(channel = &*key.channel, id = ?key.id, "incomplete event expired; dropped");
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

    fn try_finish_seed(&mut self, key: &Key) -> Option<String> {
        let p = self.pending.get(key)?;
        if !p.eof || !seed_contiguous(&p.parts) {
            return None;
        }
        // Not remembered as done: seed 004 keys messages by row id, so the
        // same id legitimately starts a new message on the row's next change.
        let p = self.remove(key)?;
        Some(p.parts.into_values().collect::<Vec<_>>().concat())
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

/// Whether seed-format parts cover the text with no gap. Two counters are in
/// use in the wild: chunk numbers 0, 1, 2, … and character offsets (seed 004's
/// trigger: `substr(text, counter, 1000)` with counter 0, 1000, 2000, …, where
/// the one at 0 carries 999 characters because `substr` starts at 1).
fn seed_contiguous(parts: &BTreeMap<u64, Box<str>>) -> bool {
    // Senders always send at least one part before EOF; an EOF that
    // overtook its parts waits for them.
    if parts.is_empty() {
        return false;
    }
    let numbered = parts.keys().enumerate().all(|(i, &k)| k == i as u64);
    if numbered {
        return true;
    }
    let mut next: Option<u64> = None;
    for (&at, data) in parts {
        let start = at.max(1);
        if next.is_some_and(|n| n != start) || (next.is_none() && start != 1) {
            return false;
        }
        next = Some(start + data.chars().count() as u64);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &str, size: usize, seq: i64) -> Vec<String> {
        crate::wire::encode_chunks(seq, text, size)
    }

    fn push(r: &mut Reassembler, payload: &str, now: Instant) -> Option<String> {
        match crate::wire::parse(payload).unwrap() {
            crate::wire::Frame::Chunk(c) => r.push_chunk("ch", &c, now),
            crate::wire::Frame::SeedPart { id, offset, data } => r.push_seed_part("ch", id, offset, data, now),
            crate::wire::Frame::SeedEof { id } => r.push_seed_eof("ch", id, now),
            other => panic!("{other:?}"),
        }
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

        let numbered = [format!("{id}0:ab"), format!("{id}1:cd"), format!("{id}EOF")];
        let out: Vec<String> = numbered.iter().filter_map(|f| push(&mut r, f, now)).collect();
        assert_eq!(out, vec!["abcd".to_string()]);
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
}
