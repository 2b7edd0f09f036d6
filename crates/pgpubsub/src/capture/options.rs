//! How a capturer works, and the counters it keeps.

use std::time::Duration;

/// How a [`Capturer`](super::Capturer) works. The defaults suit most; see each field.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CaptureOptions {
    /// Names the slot: `pgpubsub_capture_<name>`; `None`: `pgpubsub_capture`.
    /// Slots are per cluster: two databases of one cluster need two names.
    pub name: Option<String>,
    /// Most events per append (default 2,000)...
    pub batch_rows: usize,
    /// ...and most bytes (default 8 MiB): a capturer catching up confirms
    /// (and, killed, re-reads) at most this much at a time.
    pub batch_bytes: usize,
    /// Appends begin at most this often (default 5 ms), and a change read
    /// waits at most this long to be appended: a lone change after a quiet
    /// spell is appended at once, and under a stream of commits what
    /// arrives meanwhile goes in the same append, so concurrent writers
    /// share appends (and the database's work per event falls, readers' too:
    /// they read once per append).
    pub linger: Duration,
    /// How often the confirmed position is sent to the server (default 250 ms).
    pub status_interval: Duration,
    /// A standby tries to take the slot this often (default 1 s).
    pub standby_poll: Duration,
    /// How often the slot's retained WAL is measured (default 5 s).
    pub health_interval: Duration,
    /// Warn when the slot keeps more WAL than this (default 1 GiB).
    pub retained_warn_bytes: u64,
    /// No message from the server (not even a keepalive) for this long
    /// means the connection is dead (default 75 s: the server sends a
    /// keepalive every `wal_sender_timeout / 2`, 30 s by default).
    pub idle_timeout: Duration,
    /// Longest an append may take before its connection is presumed dead.
    pub statement_timeout: Duration,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            name: None,
            batch_rows: 2000,
            batch_bytes: 8 << 20,
            linger: Duration::from_millis(5),
            status_interval: Duration::from_millis(250),
            standby_poll: Duration::from_secs(1),
            health_interval: Duration::from_secs(5),
            retained_warn_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(75),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

impl CaptureOptions {
    /// The defaults, with the slot named after `name`.
    pub fn named(name: Option<String>) -> Self {
        CaptureOptions { name, ..CaptureOptions::default() }
    }
}

crate::stats::counters! {
    /// Live counters and gauges of a capturer (relaxed atomics, for
    /// reporting: `/metrics`, the load report).
    CaptureStats,
    /// A copy of [`CaptureStats`] at one moment.
    CaptureSnapshot,
    /// Events appended to the log.
    events,
    /// Appends (one transaction each).
    batches,
    /// Source transactions read whole.
    transactions,
    /// Events read again after a restart and not appended twice.
    skipped,
    /// WAL messages that did not parse.
    malformed,
    /// Sessions replaced after a failure.
    reconnects,
    /// Slots re-created after the server invalidated them (each a resync in the log).
    resets,
    /// Gauge: 1 while this capturer holds the slot, 0 standing by.
    active,
    /// Gauge: bytes of WAL the slot keeps, at the last measure.
    retained_bytes,
    /// Gauge: commit-to-append lag of the last batch's newest event, in microseconds.
    lag_us,
}
