//! Counters a listener keeps, shared with whoever wants to read them
//! (the CLI's summary, the gateway's `/metrics`). Relaxed atomics: each is an
//! independent tally, read for reporting only.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters of one listener.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A copy of [`Stats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
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
