//! Counters a listener keeps, shared with whoever wants to read them
//! (the CLI's summary, the gateway's `/metrics`). Relaxed atomics: each is an
//! independent tally, read for reporting only.

use std::sync::atomic::{AtomicU64, Ordering};

/// Declares a struct of relaxed atomic counters, its plain snapshot, and
/// `snapshot()`: the listener's [`Stats`] here, the capturer's
/// `CaptureStats` too.
macro_rules! counters {
    ($(#[$sdoc:meta])* $stats:ident, $(#[$ndoc:meta])* $snapshot:ident,
     $( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        $(#[$sdoc])*
        #[derive(Debug, Default)]
        pub struct $stats {
            $( $(#[$doc])* pub $name: std::sync::atomic::AtomicU64, )*
        }

        $(#[$ndoc])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct $snapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl $stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> $snapshot {
                $snapshot { $( $name: self.$name.load(std::sync::atomic::Ordering::Relaxed), )* }
            }
        }
    };
}
pub(crate) use counters;

counters! {
    /// Live counters of one listener.
    Stats,
    /// A copy of [`Stats`] at one moment.
    StatsSnapshot,
    /// Notifications received from Postgres (wake-ups and foreign ones).
    notifications,
    /// Wake-ups received: writers telling a waiting listener to read.
    wakeups,
    /// Reads of the log.
    polls,
    /// Events delivered to the subscriber (log and foreign).
    events,
    /// Foreign notifications delivered (not from the log).
    foreign,
    /// Foreign notifications dropped because the subscriber was behind
    /// (they are not in the log: live only).
    foreign_dropped,
    /// Seed-format chunks received.
    chunks,
    /// Chunks received twice with the same content, ignored.
    duplicate_chunks,
    /// Payloads that start like a frame but do not parse.
    malformed,
    /// Logged rows that are not events of ours (skipped).
    not_json,
    /// Seed-format messages whose parts disagree or overlap.
    corrupt,
    /// Incomplete seed-format messages dropped after `max_age`.
    expired,
    /// Incomplete messages evicted to stay under the message or byte limit.
    evicted,
    /// Events refused for being larger than `max_event_bytes`.
    oversize,
    /// Times the listening connection was replaced.
    reconnects,
    /// Times the log had been pruned past a subscriber's position.
    resyncs,
    /// Gauge: `pg_notification_queue_usage()` at the last heartbeat, in
    /// millionths.
    queue_usage_ppm,
    /// Gauge: round trip of the last heartbeat, in microseconds.
    heartbeat_rtt_us,
}

impl Stats {
    pub(crate) fn set_queue_usage(&self, usage: f64) {
        self.queue_usage_ppm.store((usage * 1e6) as u64, Ordering::Relaxed);
    }

    pub(crate) fn set_heartbeat_rtt(&self, rtt: std::time::Duration) {
        self.heartbeat_rtt_us.store(rtt.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
