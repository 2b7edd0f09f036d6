//! What each run of the scenario writes to, and how its events come back.

use serde::Serialize;

/// What one run writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "snake_case")]
pub enum Target {
    /// A table with no trigger.
    Plain,
    /// A table with the seed's trigger: `pg_notify` of the row as JSON.
    Seed,
    /// `pubsub.watch(table, channel, true)`: the log, and the event in the
    /// NOTIFY payload.
    Inline,
    /// `pubsub.watch(table, channel)`: the log only.
    Watched,
    /// `pubsub.watch_wal(table, channel)`: no trigger; `pgpubsub capture`
    /// appends its rows to the log (only with wal_level = logical).
    Wal,
    /// A plain INSERT of the message text into a table with no trigger.
    Insert,
    /// `pubsub.publish` of the message.
    Publish,
    /// The message published through the WAL (an INSERT into
    /// `pubsub.wal_messages`), appended to the log by `pgpubsub capture`.
    PublishWal,
}

impl Target {
    /// The tables of one writer count: the four, and the WAL-watched one
    /// when the server can decode.
    pub(super) fn tables(wal: bool) -> Vec<Target> {
        let mut t = vec![Target::Plain, Target::Seed, Target::Inline, Target::Watched];
        if wal {
            t.push(Target::Wal);
        }
        t
    }

    /// The publish comparison: a plain INSERT, `publish`, and `publish_wal`
    /// when the server can decode.
    pub(super) fn publishing(wal: bool) -> Vec<Target> {
        let mut t = vec![Target::Insert, Target::Publish];
        if wal {
            t.push(Target::PublishWal);
        }
        t
    }

    /// Captured by `pgpubsub capture` (started for its runs only, so no
    /// other run has a slot consumer running).
    pub(super) fn wal(self) -> bool {
        matches!(self, Target::Wal | Target::PublishWal)
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Target::Plain => "plain",
            Target::Seed => "seed",
            Target::Inline => "inline",
            Target::Watched => "watched",
            Target::Wal => "wal",
            Target::Insert => "insert",
            Target::Publish => "publish",
            Target::PublishWal => "publish_wal",
        }
    }

    /// The channel its events arrive on, if any.
    pub(super) fn channel(self) -> Option<String> {
        match self {
            Target::Plain | Target::Insert => None,
            t => Some(format!("pgpubsub_load_{}", t.name())),
        }
    }

    /// What its writes/s are compared with.
    pub(super) fn baseline(self) -> Target {
        match self {
            Target::Insert | Target::Publish | Target::PublishWal => Target::Insert,
            _ => Target::Plain,
        }
    }
}
