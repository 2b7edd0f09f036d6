//! The command line: flags, their environment variables and defaults.
//!
//! Precedence: flags, then the environment, then `.env` in the working
//! directory (loaded into the environment first, never overriding it), then
//! the defaults below.

use clap::{Args, Parser, Subcommand};
use pgpubsub::Channel;

/// PostgreSQL as a pub/sub service: row changes and messages, typed, complete
/// and in order, over LISTEN/NOTIFY.
#[derive(Debug, Parser)]
#[command(name = "pgpubsub", version)]
pub struct Cli {
    /// Connection string (URL or key=value). Read after parsing so that an
    /// invalid one is reported without echoing its password.
    #[arg(long, env = "DATABASE_URL", global = true, default_value = pgpubsub::db::DEFAULT_DATABASE_URL,
          value_name = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Pretty, multi-line output of each event.
    #[arg(long, env = "DEBUG", global = true, value_name = "DEBUG", value_parser = parse_bool,
          default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub debug: bool,

    /// How log lines (on stderr) look: `text` for people, `json` (one
    /// object per line) for a log collector.
    #[arg(long, env = "PGPUBSUB_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to do; without one, `listen`.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// `listen`'s options, for a bare `pgpubsub`.
    #[command(flatten)]
    pub listen: ListenArgs,
}

impl Cli {
    /// Parses the command line (exits with clap's message on an error).
    /// Global flags (`--database-url`, `--log-format`, `--debug`) go before
    /// or after a subcommand; `listen`'s own flags, given bare (`pgpubsub
    /// --json`), are refused with a subcommand.
    pub fn parse_args() -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        let mut command = Cli::command();
        let matches = command.get_matches_mut();
        if let Some((sub, _)) = matches.subcommand() {
            let listen = ListenArgs::augment_args(clap::Command::new("listen"));
            for arg in listen.get_arguments() {
                let id = arg.get_id().as_str();
                if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                    let flag = arg.get_long().map_or_else(|| id.to_string(), |l| format!("--{l}"));
                    command
                        .error(
                            clap::error::ErrorKind::ArgumentConflict,
                            if sub == "listen" {
                                format!("{flag} goes after `listen`: pgpubsub listen {flag} ...")
                            } else {
                                format!("{flag} is an option of `listen`, not of `{sub}`")
                            },
                        )
                        .exit();
                }
            }
        }
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `spans`).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every event on the channels, one line each (the logging mode).
    Listen(ListenArgs),
    /// Apply (default), revert or list the schema migrations.
    Migrate(MigrateArgs),
    /// Capture a table's changes as events (no table: list watched tables).
    Watch(WatchArgs),
    /// Stop capturing a table's changes.
    Unwatch {
        /// The table, optionally schema-qualified.
        table: String,
    },
    /// Publish a message of any size.
    Publish(PublishArgs),
    /// Delete old events from the log (by age and/or count).
    Prune(RetentionArgs),
    /// The HTTP gateway: SSE and WebSocket subscribe, publish, health, metrics.
    Serve(crate::serve::ServeArgs),
    /// Append the changes of tables watched with `watch --wal` to the log,
    /// from the WAL (one active capturer per database; others stand by).
    Capture(crate::cmd::capture::CaptureArgs),
    /// Copy the channels' events into NATS JetStream (one active bridge per
    /// name; others stand by).
    Bridge(crate::bridge::BridgeArgs),
    /// The load test: writers, pgpubsub's listener and a bare baseline.
    #[cfg(feature = "load")]
    Load(crate::load::LoadArgs),
    /// The gateway's fan-out with real WebSocket clients.
    #[command(hide = true)]
    #[cfg(feature = "load")]
    LoadFanout(crate::load::fanout::FanoutArgs),
    /// The bare LISTEN loop `load --baseline` runs beside pgpubsub.
    #[command(hide = true)]
    #[cfg(feature = "load")]
    LoadBaseline(crate::load::baseline::BaselineArgs),
    /// Events/s and latency through the bridge beside the plain listener.
    #[command(hide = true)]
    #[cfg(feature = "load")]
    LoadBridge(crate::bridge::bench::BenchArgs),
    /// Run the whole flow once: migrate, watch a demo table, write rows,
    /// print the events that arrive.
    Demo,
}

/// Options of `listen`.
#[derive(Debug, Args, Clone)]
pub struct ListenArgs {
    /// The channels to listen on.
    #[command(flatten)]
    pub channels: Channels,

    /// One JSON object per event per line on stdout (logs stay on stderr).
    #[arg(long)]
    pub json: bool,

    /// Stamp each event with the time it was printed: a `received_at`
    /// member (RFC 3339, UTC, microseconds) in JSON, a leading field in lines.
    #[arg(long)]
    pub received_at: bool,

    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Largest event accepted, in bytes; larger ones are dropped and counted.
    #[arg(long, env = "PGPUBSUB_MAX_EVENT_BYTES", default_value_t = 64 << 20, value_name = "BYTES")]
    pub max_event_bytes: u64,

    /// Seconds an incomplete chunked event waits for its missing chunks.
    #[arg(long, env = "PGPUBSUB_CHUNK_TIMEOUT", default_value_t = 30, value_name = "SECONDS")]
    pub chunk_timeout: u64,

    /// Durable subscriber name: its cursor is stored in the database, and a
    /// restart resumes after the last event printed.
    #[arg(long, env = "PGPUBSUB_NAME", value_name = "NAME")]
    pub name: Option<String>,

    /// After a read that found less than a page, the least time before the
    /// next read begins (the library's `linger`, default 2ms). For
    /// measurements: longer carries more events per read under load, at up
    /// to that much more latency.
    #[arg(long, env = "PGPUBSUB_LINGER", value_name = "DURATION", value_parser = parse_duration, hide = true)]
    pub linger: Option<std::time::Duration>,

    /// Prune the log while listening (every minute), by these bounds.
    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Also run the capturer in this process: tables watched with `watch
    /// --wal` (and `publish --wal` messages) are appended to the log from
    /// the WAL (`pgpubsub capture` does it as a process of its own). Needs
    /// wal_level = logical and a role with REPLICATION. See docs/delivery.md.
    #[arg(long)]
    pub capture: bool,
}

/// Retention bounds.
#[derive(Debug, Args, Clone, Default)]
pub struct RetentionArgs {
    /// Delete events older than this (e.g. 7d, 12h, 30m).
    #[arg(long, env = "PGPUBSUB_RETENTION_AGE", value_name = "DURATION", value_parser = parse_duration)]
    pub max_age: Option<std::time::Duration>,
    /// Keep at most this many of the newest events.
    #[arg(long, env = "PGPUBSUB_RETENTION_COUNT", value_name = "N")]
    pub max_count: Option<i64>,
}

impl RetentionArgs {
    /// As the library's policy.
    pub fn policy(&self) -> pgpubsub::retention::Retention {
        pgpubsub::retention::Retention::new(self.max_age, self.max_count)
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 7d, 12h, 30m, 90s)"))
}

/// The channels a command works on: `--channel`, repeated or
/// comma-separated, else `PUB_SUB_CHANNEL` (the seed's name), else the
/// seed's `job_channel`. `listen`'s (`serve` has its own: none means every
/// channel, and patterns).
#[derive(Debug, Args, Clone)]
pub struct Channels {
    /// Channels (repeat, or separate with commas).
    #[arg(
        long = "channel",
        short = 'c',
        env = "PUB_SUB_CHANNEL",
        value_name = "PUB_SUB_CHANNEL",
        value_delimiter = ',',
        default_value = "job_channel"
    )]
    pub list: Vec<Channel>,
}

/// Options of `migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// up (default), down (revert the last step) or status.
    #[arg(value_enum, default_value = "up")]
    pub action: MigrateAction,
    /// Also apply the seed's `job` example (tables job and notification).
    #[arg(long)]
    pub example: bool,
}

/// What `migrate` does.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the most recent one.
    Down,
    /// List migrations and watched tables.
    Status,
}

/// Options of `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The table, optionally schema-qualified; omit to list watched tables.
    pub table: Option<String>,
    /// Channel for its events (default: the table's name).
    #[arg(long, short = 'c')]
    pub channel: Option<Channel>,
    /// Also notify each event's JSON in the payload (chunked past 8000
    /// bytes), the seeds' way, for programs that read NOTIFY themselves.
    /// Readable by every role that can LISTEN, and every write takes
    /// PostgreSQL's NOTIFY lock: see docs/delivery.md.
    #[arg(long, conflicts_with = "wal")]
    pub inline: bool,
    /// Capture from the WAL: no trigger, writers unhurt; `pgpubsub capture`
    /// appends the changes to the log (needs wal_level = logical). See
    /// docs/delivery.md.
    #[arg(long)]
    pub wal: bool,
}

/// Options of `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The channel.
    pub channel: Channel,
    /// The message; `-` or nothing reads it from stdin.
    pub payload: Option<String>,
    /// Publish through the WAL (an INSERT into `pubsub.wal_messages`): no
    /// log insert in this transaction; `pgpubsub capture` appends it.
    #[arg(long)]
    pub wal: bool,
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err("expected true or false (or 1/0, yes/no, on/off)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn booleans() {
        assert_eq!(parse_bool("TRUE"), Ok(true));
        assert_eq!(parse_bool("off"), Ok(false));
        assert!(parse_bool("maybe").is_err());
    }
}
