//! The bridge's flags, and the checks of stream names and subject prefixes.

use std::time::Duration;

use pgpubsub::Channel;

/// Options of `bridge`.
#[derive(Debug, clap::Args)]
pub struct BridgeArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "PGPUBSUB_NATS_URL", default_value = "nats://127.0.0.1:4222", value_name = "URL")]
    pub nats: String,
    /// Channels to copy (repeat, or separate with commas); none: every
    /// channel of the log, those that appear later included.
    #[arg(long = "channel", short = 'c', value_delimiter = ',', value_name = "CHANNEL")]
    pub channels: Vec<Channel>,
    /// The bridge's name: its cursor (`bridge:<NAME>` in pubsub.cursors) and
    /// its lock. Bridges started with the same name: one copies, the others
    /// wait and take over.
    #[arg(long, env = "PGPUBSUB_BRIDGE_NAME", value_name = "NAME")]
    pub name: String,
    /// The JetStream stream (created if missing). Give each bridge a stream
    /// of its own.
    #[arg(long, env = "PGPUBSUB_STREAM", default_value = "PGPUBSUB", value_parser = parse_stream)]
    pub stream: String,
    /// Subjects are `<PREFIX>.<channel>`; a created stream takes `<PREFIX>.>`.
    #[arg(long, env = "PGPUBSUB_SUBJECT_PREFIX", default_value = "pgpubsub", value_parser = parse_prefix)]
    pub subject_prefix: String,
    /// Created stream: drop messages older than this (default: keep).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_age: Option<Duration>,
    /// Created stream: keep at most this many bytes (default: no limit).
    #[arg(long, value_name = "BYTES")]
    pub max_bytes: Option<i64>,
    /// Created stream: replicas (a JetStream cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Created stream: how long JetStream remembers a `Nats-Msg-Id`. Must
    /// cover the re-send after a crash: from an event's first publish to
    /// the restarted (or standby) bridge sending it again.
    #[arg(long, default_value = "2m", value_name = "DURATION", value_parser = parse_duration)]
    pub duplicate_window: Duration,
    /// Most events published and not yet acknowledged.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_in_flight: usize,
    /// Most bytes published and not yet acknowledged.
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    pub max_in_flight_bytes: usize,
    /// How long an acknowledgement (or a JetStream request) may take before
    /// it counts as failed and is retried.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// The first part of every `Nats-Msg-Id` (`<SOURCE>:<seq>`). Default:
    /// the database's identity, `<system_identifier>-<database oid>`.
    #[arg(long, value_name = "SOURCE")]
    pub source_id: Option<String>,
    /// Skip (and count) events larger than the NATS server's max_payload
    /// instead of stopping with an error.
    #[arg(long)]
    pub skip_oversize: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, env = "PGPUBSUB_METRICS_BIND", value_name = "ADDR")]
    pub metrics_bind: Option<String>,
    /// How often a standby tries the lock, and the active bridge proves it
    /// still holds it.
    #[arg(long, default_value = "500ms", value_name = "DURATION", value_parser = parse_duration)]
    pub lock_poll: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 2m, 30s, 500ms, 7d)"))
}

/// A stream name: what JetStream accepts in its API subjects.
fn parse_stream(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 255
        || s.chars().any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err("a stream name is 1 to 255 characters, without whitespace, '.', '*', '>', '/' or '\\'".into());
    }
    Ok(s.to_string())
}

/// A subject prefix: one or more literal tokens.
fn parse_prefix(s: &str) -> Result<String, String> {
    let bad = |t: &str| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>');
    if s.split('.').any(bad) {
        return Err("a subject prefix is dot-separated tokens without whitespace or wildcards (e.g. pgpubsub)".into());
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(parse_prefix("pgpubsub").is_ok() && parse_prefix("app.events").is_ok());
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a", "a."] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
        assert!(parse_stream("PGPUBSUB").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>"] {
            assert!(parse_stream(bad).is_err(), "{bad}");
        }
    }
}
