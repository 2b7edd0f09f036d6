//! The command line: the global flags, the subcommands and how they are
//! parsed. Each command's own flags are in its file under `cmd/` (`serve`'s
//! and `bridge`'s in theirs).
//!
//! Precedence: flags, then the environment, then `.env` in the working
//! directory (loaded into the environment first, never overriding it), then
//! the defaults below.

use clap::{Args, Parser, Subcommand};

use crate::cmd::listen::ListenArgs;
use crate::cmd::migrate::MigrateArgs;
use crate::cmd::prune::RetentionArgs;
use crate::cmd::publish::PublishArgs;
use crate::cmd::watch::WatchArgs;

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
    LoadBridge(crate::load::bridge::BenchArgs),
    /// Run the whole flow once: migrate, watch a demo table, write rows,
    /// print the events that arrive.
    Demo,
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
