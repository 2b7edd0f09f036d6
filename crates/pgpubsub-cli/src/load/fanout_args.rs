//! What `load-fanout` and its storm and idle modes share: the options, the
//! channel, and a bare HTTP GET.

use std::time::Duration;

/// Options of the fan-out benchmark.
#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    /// WebSocket clients, all on one channel.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Messages published.
    #[arg(long, default_value_t = 500)]
    pub events: u64,
    /// Messages per second published (spread evenly).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Bytes of padding per message.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Feed the gateway from this NATS server (a bridge copies the channel
    /// into a stream of the run's own) instead of from PostgreSQL.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// A reconnect storm instead (`storm.rs`): the clients subscribe, the
    /// gateway is killed, `--events` messages are written while it is down,
    /// and it is started again; how soon every client has them all, and the
    /// reads of the log that took.
    #[arg(long, conflicts_with_all = ["idle", "nats"])]
    pub storm: bool,
    /// Idle instead (`storm.rs`): the clients subscribe and nothing is
    /// published for this long; the gateway's CPU and the heartbeat bytes
    /// per second.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "nats")]
    pub idle: Option<Duration>,
    /// `serve --heartbeat` for `--storm` and `--idle` (the timeout three times it).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat: Option<Duration>,
    /// `serve --replay-alone` for `--storm`: every resume reads the log for
    /// itself, to see what sharing saves.
    #[arg(long)]
    pub replay_alone: bool,
    /// Row-level authorization instead (`rls.rs`): `--events` rows of a table
    /// with a per-tenant policy, spread over `--tenants`, to the clients
    /// spread over the same tenants; first with an equality filter and no
    /// authorization, then with tokens naming a role and a tenant claim.
    #[arg(long, conflicts_with_all = ["storm", "idle", "nats"])]
    pub rls: bool,
    /// Tenants (classes of subscribers) for `--rls`.
    #[arg(long, default_value_t = 100)]
    pub tenants: usize,
    /// Shapes' snapshots instead (`shapes.rs`): a table of `--rows` rows
    /// (`--payload` bytes of padding each), and `--clients` clients opening
    /// a shape of it with its snapshot at once; then one live row to all.
    #[arg(long, conflicts_with_all = ["storm", "idle", "nats", "rls"])]
    pub shapes: bool,
    /// Rows of the table for `--shapes`.
    #[arg(long, default_value_t = 1000)]
    pub rows: u64,
}

pub(super) const CHANNEL: &str = "pgpubsub_fanout";

pub(super) async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// Subscribers the gateway at `addr` counts (`/healthz`).
pub(super) async fn subscribers(addr: &str) -> u64 {
    let body = http_get(addr, "/healthz").await.unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["subscribers"].as_u64()).unwrap_or(0)
}

/// A counter of the gateway's `/metrics` (NaN when it is not there).
pub(super) async fn metric(addr: &str, name: &str) -> f64 {
    let text = http_get(addr, "/metrics").await.unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(f64::NAN)
}

/// Waits until the gateway at `addr` counts `n` subscribers (at most 2 minutes).
pub(super) async fn until_subscribed(addr: &str, n: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while (subscribers(addr).await as usize) < n {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("only {} of {n} clients subscribed", subscribers(addr).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
