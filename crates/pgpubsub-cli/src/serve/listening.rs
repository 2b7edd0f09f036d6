//! Which channels the gateway LISTENs on, for foreign notifications (a plain
//! `pg_notify` is heard only on a channel LISTENed to; log events need no
//! LISTEN). A channel is LISTENed to while some subscriber asks for it and
//! UNLISTENed when the last one leaves; the channels the listener was
//! started with stay.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use pgpubsub::Channel;
use tokio::sync::mpsc;

/// The most channels the gateway LISTENs on for subscribers (each is one
/// entry in PostgreSQL's listen list of the connection); past it, foreign
/// notifications of further channels are not heard (log events still are).
pub const MAX_LISTENED: usize = 10_000;

/// What the listener's task is asked to do.
#[derive(Debug)]
pub enum Change {
    /// LISTEN on it.
    Listen(Channel),
    /// UNLISTEN it.
    Unlisten(Channel),
}

/// The channels LISTENed to, and how many subscribers hold each.
#[derive(Debug)]
pub struct Listening {
    held: Mutex<HashMap<String, usize>>,
    /// Listened from the start, never unlistened.
    fixed: HashSet<String>,
    changes: mpsc::UnboundedSender<Change>,
}

impl Listening {
    /// `fixed`: the channels the listener was started with.
    pub fn new(fixed: &[Channel]) -> (Arc<Listening>, mpsc::UnboundedReceiver<Change>) {
        let (changes, rx) = mpsc::unbounded_channel();
        let fixed = fixed.iter().map(|c| c.as_str().to_string()).collect();
        (Arc::new(Listening { held: Mutex::new(HashMap::new()), fixed, changes }), rx)
    }

    /// Makes sure the listener LISTENs on `channels` while the returned
    /// guard lives.
    pub fn hold<'a>(self: &Arc<Self>, channels: impl IntoIterator<Item = &'a str>) -> Held {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut mine = Vec::new();
        for c in channels {
            if self.fixed.contains(c) {
                continue;
            }
            let Ok(channel) = Channel::new(c) else { continue };
            if channel.is_reserved() {
                continue;
            }
            let full = held.len() >= MAX_LISTENED;
            match held.get_mut(c) {
                Some(n) => *n += 1,
                None if full => {
                    tracing::warn!(channel = c, "not LISTENing: {MAX_LISTENED} channels already are");
                    continue;
                }
                None => {
                    held.insert(c.to_string(), 1);
                    let _ = self.changes.send(Change::Listen(channel));
                }
            }
            mine.push(c.to_string());
        }
        Held { listening: self.clone(), channels: mine }
    }

    /// Channels LISTENed to for subscribers now (besides the fixed ones).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn release(&self, channels: &[String]) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for c in channels {
            let Some(n) = held.get_mut(c) else { continue };
            *n -= 1;
            if *n == 0 {
                held.remove(c);
                if let Ok(channel) = Channel::new(c.as_str()) {
                    let _ = self.changes.send(Change::Unlisten(channel));
                }
            }
        }
    }
}

/// A subscriber's hold on its channels' LISTEN; released on drop.
#[derive(Debug)]
pub struct Held {
    listening: Arc<Listening>,
    channels: Vec<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.listening.release(&self.channels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_while_held_and_unlistens_after_the_last() {
        let (l, mut rx) = Listening::new(&[Channel::new("fixed").unwrap()]);
        let a = l.hold(["x", "fixed", "pubsub_wake", "pgpubsub_fence_1"]);
        let b = l.hold(["x"]);
        assert!(matches!(rx.try_recv(), Ok(Change::Listen(c)) if c.as_str() == "x"));
        assert!(rx.try_recv().is_err(), "the fixed and reserved channels and a second hold send nothing");
        drop(a);
        assert!(rx.try_recv().is_err(), "still held by b");
        drop(b);
        assert!(matches!(rx.try_recv(), Ok(Change::Unlisten(c)) if c.as_str() == "x"));
        assert_eq!(l.held(), 0);
    }
}
