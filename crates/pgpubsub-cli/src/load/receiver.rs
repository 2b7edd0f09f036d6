//! The receivers of a load run, each its own process so that its CPU and
//! memory can be read from /proc: `pgpubsub listen --json` (what is
//! measured) and, with `--baseline`, the bare loop of `load-baseline`. Plus
//! any idle LISTEN connections the scenario asks for.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use pgpubsub::db::Config;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::probe::{now_us, Probe};
use super::proc::{self, Usage};

/// How long a receiver may go without an event, once the writers are done,
/// before the missing ones are counted as lost.
const SETTLE: Duration = Duration::from_secs(15);

/// What one receiver measured.
pub struct Measured {
    pub probe: Probe,
    /// Baseline only: its own summary (it measures inside its process).
    pub summary: Option<Value>,
    pub usage: Usage,
}

/// Everything the receivers measured.
pub struct Finished {
    pub pgpubsub: Option<Measured>,
    pub baseline: Option<Measured>,
    pub queue_peak: f64,
}

struct ChildReceiver {
    child: Child,
    pid: u32,
    usage: Arc<Mutex<Usage>>,
}

/// The running receivers.
pub struct Receivers {
    pgpubsub: Option<(ChildReceiver, JoinHandle<Probe>)>,
    baseline: Option<(ChildReceiver, JoinHandle<anyhow::Result<Value>>)>,
    _idle: Vec<Client>,
    received: Arc<AtomicU64>,
    target: Arc<AtomicU64>,
    /// Set once the listener is stopped: its output ends where it is.
    stop: Arc<AtomicBool>,
    queue_peak: Arc<Mutex<f64>>,
}

impl Receivers {
    /// Starts them and returns once every one is listening.
    pub async fn start(
        config: &Config,
        url: &str,
        channels: &[String],
        expected: Option<u64>,
        pgpubsub: bool,
        baseline: bool,
        idle: usize,
    ) -> anyhow::Result<Receivers> {
        let received = Arc::new(AtomicU64::new(0));
        let target = Arc::new(AtomicU64::new(expected.unwrap_or(u64::MAX)));
        let list = channels.join(",");
        let exe = std::env::current_exe().context("finding the pgpubsub binary")?;

        let mut receivers = Receivers {
            pgpubsub: None,
            baseline: None,
            _idle: Vec::new(),
            received,
            target,
            stop: Arc::default(),
            queue_peak: Arc::default(),
        };

        if pgpubsub {
            // Measured as the issue asks, `pgpubsub listen --json > file`:
            // a pipe would make every flush wake this process, a cost of the
            // harness, not of the listener. Each line carries the time the
            // listener printed it (`--received-at`), so the file is read
            // lazily and latency is still exact.
            let output = OutputFile::create()?;
            let mut cmd = Command::new(&exe);
            cmd.args(["listen", "--json", "--received-at", "--channel", &list]);
            let (mut child, pid) = spawn(cmd, url, Stdio::from(output.file.try_clone()?))?;
            wait_ready(&mut child, "listening").await?;
            let (received, target, stop) =
                (receivers.received.clone(), receivers.target.clone(), receivers.stop.clone());
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(read_events(&output, received, target, stop));
            });
            let task = tokio::spawn(async move { rx.await.unwrap_or_default() });
            receivers.pgpubsub = Some((ChildReceiver { child, pid, usage: Arc::default() }, task));
        }
        if baseline {
            let mut cmd = Command::new(&exe);
            cmd.args(["load-baseline", "--channel", &list, "--expect", &u64::MAX.to_string(), "--idle", "3s"]);
            let (mut child, pid) = spawn(cmd, url, Stdio::piped())?;
            let stdout = child.stdout.take().context("baseline stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            match tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await {
                Ok(Ok(Some(l))) if l.contains("ready") => {}
                other => bail!("the baseline receiver did not start: {other:?}"),
            }
            let task = tokio::spawn(async move {
                let line = lines.next_line().await?.context("the baseline receiver printed no summary")?;
                Ok(serde_json::from_str(&line)?)
            });
            receivers.baseline = Some((ChildReceiver { child, pid, usage: Arc::default() }, task));
        }
        for _ in 0..idle {
            let (client, mut conn) = pgpubsub::db::open(config).await.context("connecting an idle listener")?;
            tokio::spawn(async move {
                let mut m = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                while let Some(Ok(_)) = m.next().await {}
            });
            let sql: String =
                channels.iter().map(|c| format!("LISTEN {};", pgpubsub::channel::quote_ident(c.as_ref()))).collect();
            client.batch_execute(&sql).await?;
            receivers._idle.push(client);
        }
        Ok(receivers)
    }

    /// Events the measured receiver has so far (for the progress bar).
    pub fn counters(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }

    /// Samples the receivers' CPU and memory, and the NOTIFY queue, every
    /// 250 ms until [`Receivers::finish`].
    pub fn sample(&self, config: Config) -> JoinHandle<()> {
        let targets: Vec<(u32, Arc<Mutex<Usage>>)> =
            [self.pgpubsub.as_ref().map(|(c, _)| c), self.baseline.as_ref().map(|(c, _)| c)]
                .into_iter()
                .flatten()
                .map(|c| (c.pid, c.usage.clone()))
                .collect();
        let peak = self.queue_peak.clone();
        tokio::spawn(async move {
            let client = pgpubsub::db::connect(&config).await.ok();
            loop {
                for (pid, slot) in &targets {
                    if let Some(u) = proc::usage(*pid) {
                        let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
                        let peak_rss = s.peak_rss.max(u.peak_rss);
                        *s = Usage { peak_rss, ..u };
                    }
                }
                if let Some(c) = &client {
                    if let Ok(row) = c.query_one("SELECT pg_notification_queue_usage()", &[]).await {
                        let q: f64 = row.get(0);
                        let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                        *p = p.max(q);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    }

    /// Waits until `events` have arrived (or nothing has for a while), reads
    /// the final CPU and memory, and stops the receivers.
    pub async fn finish(mut self, events: u64, sampler: &JoinHandle<()>) -> anyhow::Result<Finished> {
        self.target.store(events, Ordering::SeqCst);
        let pgpubsub = match self.pgpubsub.take() {
            Some((mut c, mut task)) => {
                // Wait while events keep coming; after SETTLE without one,
                // the rest are lost: stop the listener, which ends the read.
                let mut last = self.received.load(Ordering::Relaxed);
                let mut quiet = Duration::ZERO;
                let probe = loop {
                    tokio::select! {
                        probe = &mut task => break probe.context("the event reader failed")?,
                        () = tokio::time::sleep(Duration::from_millis(250)) => {
                            let now = self.received.load(Ordering::Relaxed);
                            quiet = if now == last { quiet + Duration::from_millis(250) } else { Duration::ZERO };
                            last = now;
                            if quiet >= SETTLE {
                                // Gone before the reader is told, so that
                                // its last read has all the output.
                                let _ = c.child.kill().await;
                                self.stop.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                };
                let usage = final_usage(&c);
                let _ = c.child.kill().await;
                Some(Measured { probe, summary: None, usage })
            }
            None => None,
        };
        let baseline = match self.baseline.take() {
            Some((mut c, task)) => {
                let summary = task.await.context("the baseline reader failed")??;
                let usage = *c.usage.lock().unwrap_or_else(|e| e.into_inner());
                let _ = c.child.wait().await;
                Some(Measured { probe: Probe::new(), summary: Some(summary), usage })
            }
            None => None,
        };
        sampler.abort();
        let queue_peak = *self.queue_peak.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Finished { pgpubsub, baseline, queue_peak })
    }
}

/// The usage right now, falling back to the last sample.
fn final_usage(c: &ChildReceiver) -> Usage {
    let last = *c.usage.lock().unwrap_or_else(|e| e.into_inner());
    match proc::usage(c.pid) {
        Some(u) => Usage { peak_rss: u.peak_rss.max(last.peak_rss), ..u },
        None => last,
    }
}

pub(super) fn spawn(mut cmd: Command, url: &str, stdout: Stdio) -> anyhow::Result<(Child, u32)> {
    for var in ["PUB_SUB_CHANNEL", "DEBUG", "PGPUBSUB_NAME", "PGPUBSUB_RETENTION_AGE", "PGPUBSUB_RETENTION_COUNT"] {
        cmd.env_remove(var);
    }
    cmd.env("DATABASE_URL", url)
        .env("RUST_LOG", "warn,pgpubsub=info")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().context("starting a receiver process")?;
    let pid = child.id().context("receiver pid")?;
    Ok((child, pid))
}

/// Waits for `needle` on the child's stderr, then forwards its warnings.
pub(super) async fn wait_ready(child: &mut Child, needle: &str) -> anyhow::Result<()> {
    let stderr = child.stderr.take().context("receiver stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(needle) {
                return Ok(());
            }
            if line.contains("ERROR") || line.contains("error:") {
                bail!("the listener failed to start: {line}");
            }
        }
        bail!("the listener exited before it was listening")
    };
    tokio::time::timeout(Duration::from_secs(20), ready).await.context("the listener did not start in 20 s")??;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("[listener] {line}");
            }
        }
    });
    Ok(())
}

/// The listener's stdout: a file in the temporary directory, removed when
/// the run is over.
pub(super) struct OutputFile {
    pub(super) path: std::path::PathBuf,
    pub(super) file: std::fs::File,
}

impl OutputFile {
    /// A file of its own: several readers of one run (the writer-tables
    /// scenario's `listen` and its SSE subscriber) must not share one.
    pub(super) fn create() -> anyhow::Result<OutputFile> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pgpubsub-load-{}-{n}.jsonl", std::process::id()));
        let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(OutputFile { path, file })
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads `listen --json --received-at` lines from the file as it grows,
/// until `target` distinct events arrived or the listener was stopped and
/// its output is read to the end. Blocking.
fn read_events(output: &OutputFile, received: Arc<AtomicU64>, target: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Probe {
    use std::io::BufRead;
    let mut probe = Probe::new();
    // Opened anew: a clone of the listener's descriptor would share (and
    // move) its write offset.
    let Ok(file) = std::fs::File::open(&output.path) else { return probe };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    while probe.distinct() < target.load(Ordering::SeqCst) {
        // Checked before reading, so that the read after it sees everything
        // the stopped listener wrote.
        let stopped = stop.load(Ordering::SeqCst);
        match reader.read_line(&mut line) {
            Ok(0) if stopped => break,
            // At the end for now (a partial line stays in `line`).
            Ok(0) => std::thread::sleep(Duration::from_millis(10)),
            Ok(_) if line.ends_with('\n') => {
                probe.record_line(&line, received_at(&line).unwrap_or_else(now_us));
                received.fetch_add(1, Ordering::Relaxed);
                line.clear();
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    probe
}

/// The `received_at` stamp at the head of a line, in µs since the epoch.
pub(super) fn received_at(line: &str) -> Option<i64> {
    let stamp = line.strip_prefix(r#"{"received_at":""#)?.split('"').next()?;
    let at = humantime::parse_rfc3339(stamp).ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as i64)
}
