//! The WAL side of the scenario: `pgpubsub capture` appends the WAL-watched
//! targets to the log for their runs only (so no other run, the plain
//! table's included, has a slot consumer running), and a gateway with an
//! SSE subscriber counts what reaches a browser-like client.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_postgres::Client;

use super::listen::Counter;
use super::pin::Pin;
use super::Target;
use crate::load::probe::Probe;
use crate::load::receiver::{spawn, wait_ready, OutputFile};

/// A `pgpubsub capture` child for one run.
pub(super) struct Capture {
    child: tokio::process::Child,
    pub(super) pid: u32,
}

impl Capture {
    /// Starts it and waits until it has caught up with the WAL written so
    /// far (the other runs' WAL, which it decodes and skips): the run then
    /// measures only its own writes.
    pub(super) async fn start(url: &str, admin: &Client, pin: Pin) -> anyhow::Result<Capture> {
        let exe = std::env::current_exe().context("finding the pgpubsub binary")?;
        let mut cmd = pin.command(&exe);
        cmd.arg("capture");
        let (mut child, pid) = spawn(cmd, url, std::process::Stdio::null())?;
        wait_ready(&mut child, "capturing").await.context("starting pgpubsub capture")?;
        let target: String = admin.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let caught_up: bool = admin
                .query_one(
                    "SELECT coalesce(bool_or(confirmed_flush_lsn >= $1::text::pg_lsn), false)
                     FROM pg_replication_slots WHERE slot_name = 'pgpubsub_capture'",
                    &[&target],
                )
                .await?
                .get(0);
            if caught_up {
                return Ok(Capture { child, pid });
            }
            if Instant::now() > deadline {
                bail!("the capturer did not catch up with the WAL in 120 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(super) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Bytes of WAL the capturer's slot has not confirmed yet.
pub(super) async fn slot_lag(admin: &Client) -> Option<u64> {
    let row = admin
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = 'pgpubsub_capture'",
            &[],
        )
        .await
        .ok()??;
    Some(row.get::<_, i64>(0).max(0) as u64)
}

/// `pgpubsub serve` and one SSE subscriber (curl) on the WAL targets'
/// channels, for the whole scenario: counts, per run, the events a client
/// of the gateway received.
pub(super) struct Gateway {
    serve: tokio::process::Child,
    sse: tokio::process::Child,
    counter: Counter,
}

impl Gateway {
    pub(super) async fn start(url: &str, runs: usize, pin: Pin) -> anyhow::Result<Gateway> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let exe = std::env::current_exe().context("finding the pgpubsub binary")?;
        let mut cmd = pin.command(&exe);
        // A queue deep enough that a burst (the capturer catching up) is
        // not a lag close: curl, unlike a browser's EventSource, would not
        // reconnect, and the count would stop.
        cmd.args(["serve", "--bind", &format!("127.0.0.1:{port}"), "--queue", "4194304"]);
        let (mut serve, _) = spawn(cmd, url, std::process::Stdio::null())?;
        wait_ready(&mut serve, "serving").await.context("starting pgpubsub serve")?;
        let channels: Vec<String> = [Target::Wal, Target::PublishWal].iter().filter_map(|t| t.channel()).collect();
        let output = OutputFile::create()?;
        let mut curl = pin.command("curl");
        curl.args(["-sN", &format!("http://127.0.0.1:{port}/events?channel={}", channels.join(","))])
            .stdout(std::process::Stdio::from(output.file.try_clone()?))
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let sse = curl.spawn().context("starting curl for the SSE subscriber (is curl installed?)")?;
        // The subscription is live once its first record (its position) is out.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&output.path).map_or(0, |m| m.len()) == 0 {
            if Instant::now() > deadline {
                bail!("the SSE subscriber got nothing from the gateway in 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Gateway { serve, sse, counter: Counter::start(output, runs) })
    }

    pub(super) fn delivered(&self, run: usize) -> u64 {
        self.counter.delivered(run)
    }

    pub(super) async fn stop(mut self) -> anyhow::Result<Vec<Probe>> {
        let _ = self.sse.kill().await;
        let _ = self.serve.kill().await;
        self.counter.finish().await
    }
}
