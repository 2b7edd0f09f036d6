//! The `pgpubsub listen` child that receives every run's events, and reading its output back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::pin::Pin;
use super::{Target, RUN_IDS};
use crate::load::probe::{line_tag, now_us, Probe};
use crate::load::receiver::{received_at, spawn, wait_ready, OutputFile};

/// `pgpubsub listen --json --received-at > file` on every channel, and a
/// thread that reads the file as it grows into one probe per run.
pub(super) struct Listener {
    child: tokio::process::Child,
    pub(super) pid: u32,
    counter: Counter,
}

impl Listener {
    /// On every target's channel: the log is one, whichever way an event
    /// came in.
    pub(super) async fn start(url: &str, runs: usize, pin: Pin) -> anyhow::Result<Listener> {
        let output = OutputFile::create()?;
        let targets = [Target::Seed, Target::Inline, Target::Watched, Target::Wal, Target::Publish, Target::PublishWal];
        let channels: Vec<String> = targets.iter().filter_map(|t| t.channel()).collect();
        let exe = std::env::current_exe().context("finding the pgpubsub binary")?;
        let mut cmd = pin.command(&exe);
        cmd.args(["listen", "--json", "--received-at", "--channel", &channels.join(",")]);
        let (mut child, pid) = spawn(cmd, url, std::process::Stdio::from(output.file.try_clone()?))?;
        wait_ready(&mut child, "listening").await?;
        Ok(Listener { child, pid, counter: Counter::start(output, runs) })
    }

    pub(super) fn delivered(&self, run: usize) -> u64 {
        self.counter.delivered(run)
    }

    /// Stops the listener, reads its output to the end, and returns the
    /// probes, one per run.
    pub(super) async fn stop(mut self) -> anyhow::Result<Vec<Probe>> {
        let _ = self.child.kill().await;
        self.counter.finish().await
    }
}

/// A thread that reads a receiver's output file as it grows (see [`read`]):
/// distinct events per run so far, and the probes once stopped.
pub(super) struct Counter {
    delivered: Arc<Vec<AtomicU64>>,
    stop: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<Vec<Probe>>,
}

impl Counter {
    pub(super) fn start(output: OutputFile, runs: usize) -> Counter {
        let delivered: Arc<Vec<AtomicU64>> = Arc::new((0..runs).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (delivered.clone(), stop.clone());
        let reader = std::thread::spawn(move || read(&output, runs, &d, &s));
        Counter { delivered, stop, reader }
    }

    pub(super) fn delivered(&self, run: usize) -> u64 {
        self.delivered[run].load(Ordering::SeqCst)
    }

    /// Once the writer of the file has stopped: reads it to the end.
    pub(super) async fn finish(self) -> anyhow::Result<Vec<Probe>> {
        self.stop.store(true, Ordering::SeqCst);
        let reader = self.reader;
        tokio::task::spawn_blocking(move || reader.join())
            .await
            .context("joining the output reader")?
            .map_err(|_| anyhow::anyhow!("the output reader panicked"))
    }
}

/// Reads the listener's lines (or an SSE stream's `data:` lines) into one
/// probe per run (the run is in the writer id), until told to stop and at
/// the end of the file.
fn read(output: &OutputFile, runs: usize, delivered: &[AtomicU64], stop: &AtomicBool) -> Vec<Probe> {
    use std::io::BufRead;
    let mut probes: Vec<Probe> = (0..runs).map(|_| Probe::new()).collect();
    // Opened anew: a clone of the listener's descriptor would share its offset.
    let Ok(file) = std::fs::File::open(&output.path) else { return probes };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    loop {
        // Checked before reading, so the read after it sees all the output.
        let stopped = stop.load(Ordering::SeqCst);
        match reader.read_line(&mut line) {
            Ok(0) if stopped => break,
            Ok(0) => std::thread::sleep(Duration::from_millis(10)),
            Ok(_) if line.ends_with('\n') => {
                let now = received_at(&line).unwrap_or_else(now_us);
                let event = line.strip_prefix("data: ").unwrap_or(&line);
                if let Some((writer, n, op, t)) = line_tag(event) {
                    let run = (writer / RUN_IDS) as usize;
                    if let Some(p) = probes.get_mut(run) {
                        let before = p.distinct();
                        p.record(writer, n, op, t, now);
                        if p.distinct() > before {
                            delivered[run].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                line.clear();
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    probes
}
