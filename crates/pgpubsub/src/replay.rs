//! Resumes that share one read of the log.
//!
//! After a gateway restart (or a network blip) every client resumes at
//! once, and nearly all from the same position: they were all live on the
//! same hub, and every event's position is the same for all of them. Read
//! one by one, a thousand resumes are a thousand reads of the same pages,
//! enough to starve the database and time the resumes out.
//!
//! [`SharedReplays`] hands resumes from the same position on the same
//! channels to one group: one [`Tail`] reads the pages once, each page is
//! kept while some member still needs it, and every member walks the pages
//! at its own pace. Why this is the same as each member reading for
//! itself: the pages are one valid run of the tail from that position, and
//! a member's [`Feed`](crate::Feed) treats them as it treats its own (an
//! event above the member's `live_from` is skipped when it comes live). One
//! thing differs: a page read before a member subscribed to the hub cannot
//! tell it that it caught up (events committed between the read and its
//! subscription went to the hub before it was there), so such a member
//! asks the group for one more page.
//!
//! A group takes new members until its first page is dropped (every member
//! went past it); later resumes from that position start a group of their
//! own. Memory: the pages between the slowest and the fastest member, at
//! most [`SHELF_BYTES`] of events (by default); a member that needs a new page when the
//! shelf is full goes on alone, from a copy of the group's tail (a long
//! backlog and a slow member cannot hold the whole backlog in memory).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::event_log::LogConn;
use crate::feed::{Replay, ReplayPage, Replayed, PAGE_BYTES, PAGE_ROWS};
use crate::hub::Shared;
use crate::reassembly::Limits;
use crate::stats::Stats;
use crate::tail::{PageLimits, Tail};

/// The most bytes of events a group keeps for its slower members.
pub(crate) const SHELF_BYTES: usize = 64 << 20;

/// The groups of resumes sharing reads of the log; one per server.
#[derive(Debug)]
pub struct SharedReplays {
    groups: Mutex<HashMap<Key, Weak<Group>>>,
    limits: PageLimits,
    /// Pages read from the log for resumes.
    reads: AtomicU64,
    /// Resumes that joined a group already reading.
    joined: AtomicU64,
    /// Whether resumes share groups at all (off only to measure what
    /// sharing saves).
    share: bool,
    /// The most bytes of events a group keeps.
    shelf_bytes: usize,
}

/// What a group reads: from where, which channels (sorted; `None`: all).
type Key = (Cursor, Option<Vec<String>>);

/// One shared read of the log.
#[derive(Debug)]
struct Group {
    log: Arc<LogConn>,
    /// One reader at a time; the others wait for its page.
    tail: tokio::sync::Mutex<Tail>,
    shelf: Mutex<Shelf>,
    /// The most bytes of events kept.
    shelf_bytes: usize,
}

/// The pages read and who still needs them.
#[derive(Debug, Default)]
struct Shelf {
    /// The index of `pages[0]` (pages before it were dropped).
    base: usize,
    pages: VecDeque<Arc<Read>>,
    /// Bytes of events in `pages`.
    bytes: usize,
    /// The next page of each member: index → how many members.
    at: BTreeMap<usize, usize>,
}

/// One page as read, with what a member needs to use it.
#[derive(Debug)]
struct Read {
    /// The events, each with the position a member stands at once it
    /// handled it, shared by every member (rendered once for all).
    events: Vec<Arc<Shared>>,
    /// Where a subscriber stands once it has handled the page.
    position: Cursor,
    /// The page was full.
    more: bool,
    /// Events before the page were pruned: (where the reader was, where
    /// pruning reached).
    gone: Option<(Cursor, Cursor)>,
    /// When the read began: it says "caught up" only to members subscribed
    /// before then.
    began: Instant,
    /// Bytes of its events' JSON.
    bytes: usize,
}

/// What a member gets from its group.
enum Next {
    Page(Arc<Read>),
    /// The shelf is full: go on alone from this copy of the group's tail.
    Alone(Box<Tail>),
}

/// Reads the next page through `tail`, each event wrapped for sharing.
async fn read(tail: &mut Tail, log: &LogConn, reads: &AtomicU64) -> Result<Read> {
    let (began, from) = (Instant::now(), tail.position());
    let read = match tail.next_page(log).await {
        Ok(page) => {
            let (position, more, last) = (page.position, page.more, page.events.len().saturating_sub(1));
            let bytes = page.events.iter().map(|e| e.json().len()).sum();
            // As the log's own replay (`feed::LogReplay`): only the page's
            // end is final, a late commit may still land below an event
            // inside it.
            let events = page.events.into_iter().enumerate();
            let events = events.map(|(i, e)| Arc::new(Shared::new(e, if i == last { position } else { from })));
            Read { events: events.collect(), position, more, gone: None, began, bytes }
        }
        Err(Error::ResyncNeeded { cursor, pruned }) => {
            let gone = Some((cursor, pruned));
            Read { events: Vec::new(), position: pruned, more: true, gone, began, bytes: 0 }
        }
        Err(e) => return Err(e),
    };
    reads.fetch_add(1, Ordering::Relaxed);
    Ok(read)
}

impl SharedReplays {
    /// Groups reading pages as a [`Feed`](crate::Feed)'s replay does,
    /// skipping events over `limits.max_event_bytes`.
    pub fn new(limits: &Limits) -> SharedReplays {
        let limits = PageLimits { rows: PAGE_ROWS, bytes: PAGE_BYTES, max_event_bytes: limits.max_event_bytes };
        let (reads, joined) = (AtomicU64::new(0), AtomicU64::new(0));
        SharedReplays { groups: Mutex::default(), limits, reads, joined, share: true, shelf_bytes: SHELF_BYTES }
    }

    /// Keeps at most `bytes` of events per group (default 64 MiB).
    pub fn shelf_bytes(mut self, bytes: usize) -> SharedReplays {
        self.shelf_bytes = bytes;
        self
    }

    /// With `false`, every resume reads the log for itself, as without
    /// sharing (the reads are still counted): to measure what sharing saves.
    pub fn sharing(mut self, share: bool) -> SharedReplays {
        self.share = share;
        self
    }

    /// Pages read from the log for resumes so far (each one statement).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Resumes so far that shared a group another resume had started.
    pub fn joined(&self) -> u64 {
        self.joined.load(Ordering::Relaxed)
    }

    /// A replay of `channels` (empty: all) after `since`, for
    /// [`Feed::with_replay`](crate::Feed::with_replay), sharing its reads
    /// with other resumes from the same place; a new group reads through
    /// `log`.
    pub fn replay(self: &Arc<Self>, log: Arc<LogConn>, since: Cursor, channels: &[String]) -> Box<dyn Replay> {
        let mut channels = (!channels.is_empty()).then(|| channels.to_vec());
        if let Some(c) = &mut channels {
            c.sort();
            c.dedup();
        }
        let key = (since, channels);
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let joinable = groups.get(&key).filter(|_| self.share).and_then(Weak::upgrade).filter(|g| g.join());
        let group = match joinable {
            Some(g) => {
                self.joined.fetch_add(1, Ordering::Relaxed);
                g
            }
            None => {
                groups.retain(|_, g| g.strong_count() > 0);
                let tail = Tail::new(since, key.1.clone(), self.limits, Arc::new(Stats::default()));
                let shelf = Shelf { at: BTreeMap::from([(0, 1)]), ..Shelf::default() };
                let (tail, shelf) = (tokio::sync::Mutex::new(tail), Mutex::new(shelf));
                let g = Arc::new(Group { log, tail, shelf, shelf_bytes: self.shelf_bytes });
                groups.insert(key, Arc::downgrade(&g));
                g
            }
        };
        drop(groups);
        Box::new(Member { group, next: 0, subscribed: None, replays: self.clone(), alone: None })
    }
}

impl Group {
    fn shelf(&self) -> std::sync::MutexGuard<'_, Shelf> {
        self.shelf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a member at the first page, if it is still kept.
    fn join(&self) -> bool {
        let mut shelf = self.shelf();
        if shelf.base > 0 {
            return false;
        }
        *shelf.at.entry(0).or_insert(0) += 1;
        true
    }

    /// Page `i`, read now if no one has read it yet; or, when the shelf
    /// holds its most bytes already, a copy of the tail to go on
    /// alone. Cancel-safe: the tail is (a cancelled read leaves it
    /// unchanged), and a page is shelved only once read.
    async fn page(&self, i: usize, reads: &AtomicU64) -> Result<Next> {
        if let Some(read) = self.shelf().get(i) {
            return Ok(Next::Page(read));
        }
        let mut tail = self.tail.lock().await;
        // Read by the member that held the tail before us?
        if let Some(read) = self.shelf().get(i) {
            return Ok(Next::Page(read));
        }
        if self.shelf().bytes >= self.shelf_bytes {
            return Ok(Next::Alone(Box::new(tail.clone())));
        }
        let read = Arc::new(read(&mut tail, &self.log, reads).await?);
        let mut shelf = self.shelf();
        shelf.bytes += read.bytes;
        shelf.pages.push_back(read.clone());
        Ok(Next::Page(read))
    }

    /// A member moves from page `from` to `to` (`None`: it is gone); pages
    /// no member needs any more are dropped.
    fn moved(&self, from: usize, to: Option<usize>) {
        let mut shelf = self.shelf();
        if let Some(n) = shelf.at.get_mut(&from) {
            *n -= 1;
            if *n == 0 {
                shelf.at.remove(&from);
            }
        }
        if let Some(to) = to {
            *shelf.at.entry(to).or_insert(0) += 1;
        }
        let lowest = shelf.at.keys().next().copied().unwrap_or(usize::MAX);
        while shelf.base < lowest {
            let Some(read) = shelf.pages.pop_front() else { break };
            shelf.bytes -= read.bytes;
            shelf.base += 1;
        }
    }
}

impl Shelf {
    fn get(&self, i: usize) -> Option<Arc<Read>> {
        i.checked_sub(self.base).and_then(|k| self.pages.get(k)).cloned()
    }
}

/// One resume's walk through its group's pages.
struct Member {
    group: Arc<Group>,
    /// The next page to read.
    next: usize,
    /// When its first page was asked for: after its feed subscribed to the
    /// hub (a feed subscribes when it is made, and reads after).
    subscribed: Option<Instant>,
    replays: Arc<SharedReplays>,
    /// Gone on alone (the group's shelf was full), with its own tail.
    alone: Option<Box<Tail>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.alone.is_none() {
            self.group.moved(self.next, None);
        }
    }
}

impl Replay for Member {
    fn next_page(&mut self, live_from: Cursor) -> Pin<Box<dyn Future<Output = Result<ReplayPage>> + Send + '_>> {
        Box::pin(async move {
            let subscribed = *self.subscribed.get_or_insert_with(Instant::now);
            let read = match &mut self.alone {
                Some(tail) => Arc::new(read(tail, &self.group.log, &self.replays.reads).await?),
                None => match self.group.page(self.next, &self.replays.reads).await? {
                    Next::Page(read) => {
                        self.group.moved(self.next, Some(self.next + 1));
                        self.next += 1;
                        read
                    }
                    Next::Alone(mut tail) => {
                        // Leaves the group (its pages are for the others),
                        // then reads for itself from where the group is.
                        let read = Arc::new(read(&mut tail, &self.group.log, &self.replays.reads).await?);
                        self.group.moved(self.next, None);
                        self.alone = Some(tail);
                        read
                    }
                },
            };
            if read.gone.is_some() {
                return Ok(ReplayPage { gone: read.gone, ..ReplayPage::default() });
            }
            // "Caught up" only from a read that began after this member
            // subscribed.
            let caught_up = read.events.is_empty() && !read.more && read.began >= subscribed;
            let events = read
                .events
                .iter()
                .map(|shared| {
                    let e = &shared.event;
                    let at = e.seq.zip(e.txid).map(|(seq, txid)| Cursor { txid, seq });
                    Replayed { comes_live: at.is_some_and(|c| c > live_from), shared: shared.clone() }
                })
                .collect();
            Ok(ReplayPage { events, position: read.position, caught_up, gone: None })
        })
    }
}
