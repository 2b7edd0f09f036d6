//! Reading the log, and becoming the listener writers wake when a read
//! finds nothing (see the [listener](super) docs): the wake lock, taken on
//! one generation of the log connection, and given back once woken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use super::Listener;
use crate::cursor::Cursor;
use crate::error::Result;
use crate::event_log::WaitLock;
use crate::hub::Shared;
use crate::stats::Stats;

/// Whether this listener is the one writers wake, or sleeps on behalf of
/// the one that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waiting {
    /// Not waiting: reads find events, or writers are in flight.
    No,
    /// Holds the wake lock, taken on this generation of the log connection.
    Mine(u64),
    /// Another listener holds it; wake-ups reach us too.
    Peer,
}

/// Wake-ups, from the reading task to the listener: raised on every one
/// (coalescing), and whether any since the last read came from something
/// other than the capturer (a writer, a reconnect, the heartbeat).
#[derive(Debug, Default)]
pub(crate) struct Wake {
    notify: Notify,
    others: AtomicBool,
}

impl Wake {
    /// A wake-up; `capturer`: sent by the capturer's append, which sends
    /// one after every append whether anyone waits or not.
    pub(crate) fn raise(&self, capturer: bool) {
        if !capturer {
            self.mark_others();
        }
        self.notify.notify_one();
    }

    /// Marks the next read as not woken by the capturer alone.
    pub(crate) fn mark_others(&self) {
        self.others.store(true, Ordering::Release);
    }

    /// Until the next wake-up (or one raised since the last call).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Whether something other than the capturer woke us since the lock
    /// was last given back.
    fn others(&self) -> bool {
        self.others.load(Ordering::Acquire)
    }

    /// The lock was given back (or was not held): what asked for it is done.
    fn clear_others(&self) {
        self.others.store(false, Ordering::Release);
    }
}

impl Listener {
    /// A page's events: to hand over, or, with row-level authorization, to
    /// decide first.
    fn take(&mut self, events: Vec<crate::Event>) {
        match self.class {
            None => self.ready.extend(events),
            Some(_) => {
                let shared = events.into_iter().map(|e| Arc::new(Shared::new(e, Cursor::default())));
                self.unseen.extend(shared);
            }
        }
    }

    /// What the reading role sees of the events read: ready to hand over.
    /// Cancel-safe: they stay unseen until decided.
    pub(super) async fn decide(&mut self) -> Result<()> {
        let Some(class) = self.class.clone() else { return Ok(()) };
        let seen = class.see(&self.log, &self.unseen).await?;
        self.unseen.clear();
        self.ready.extend(seen.into_iter().map(|s| Arc::try_unwrap(s).map_or_else(|s| s.event.clone(), |s| s.event)));
        Ok(())
    }

    /// Reads one page; when it is empty, moves towards waiting.
    ///
    /// Woken by the capturer alone, a waiting listener stays the one
    /// writers wake: the capturer wakes it after every append anyway, and
    /// keeping the lock means no read to find nothing, no lock to take
    /// again and no read after that, so a steady stream of captured events
    /// costs the database one read per append per listener. Woken by a
    /// writer (or the heartbeat, or a reconnect), it gives the lock back, so
    /// busy writers stop sending wake-ups, as before.
    ///
    /// Cancel-safe: a read dropped midway leaves `due` set and the reason
    /// to give the lock back standing, so the next read does what this one
    /// was to do.
    pub(super) async fn read(&mut self) -> Result<()> {
        let keep = !self.wake.others()
            && match self.waiting {
                Waiting::Mine(generation) => generation == self.log.generation(),
                Waiting::Peer => true,
                Waiting::No => false,
            };
        if keep {
            Stats::bump(&self.stats.polls);
            let page = self.tail.next_page(&self.log).await?;
            self.page_end = Some(page.position);
            self.due = page.more;
            self.take(page.events);
            return Ok(());
        }
        if let Waiting::Mine(generation) = self.waiting {
            if generation == self.log.generation() {
                // Woken (or the heartbeat): writers may stop sending wake-ups.
                self.log.stop_waiting().await?;
            }
            self.waiting = Waiting::No;
        } else if self.waiting == Waiting::Peer {
            self.waiting = Waiting::No;
        }
        // Given back (or never held): what asked for it is done.
        self.wake.clear_others();
        self.due = false;
        Stats::bump(&self.stats.polls);
        let started = Instant::now();
        let page = self.tail.next_page(&self.log).await?;
        let found = !page.events.is_empty() || page.more;
        self.page_end = Some(page.position);
        self.take(page.events);
        if found {
            self.due = true;
            self.pause = self.options.poll_min;
            if !page.more {
                self.not_before = Some(started + self.options.linger);
            }
            return Ok(());
        }
        // Nothing new. Become the waiting listener (or find the one that
        // is), then read once more: a writer that sent no wake-up has
        // finished by now, and its events are visible.
        // Assumed taken until the answer says otherwise: a call cancelled
        // here must not leave the lock held and forgotten.
        self.waiting = Waiting::Mine(self.log.generation());
        match self.log.try_wait().await? {
            WaitLock::Busy => {
                self.waiting = Waiting::No;
                return Ok(());
            }
            WaitLock::Mine => self.waiting = Waiting::Mine(self.log.generation()),
            WaitLock::Peer => self.waiting = Waiting::Peer,
        }
        Stats::bump(&self.stats.polls);
        let page = self.tail.next_page(&self.log).await?;
        self.page_end = Some(page.position);
        if !page.events.is_empty() || page.more {
            self.take(page.events);
            self.due = true;
        }
        Ok(())
    }
}
