//! A child `pgpubsub` process of the benchmark, its log lines kept.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process whose log lines are kept.
pub struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command, stdout: Option<std::fs::File>) -> anyhow::Result<Proc> {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        match stdout {
            Some(f) => cmd.stdout(f),
            None => cmd.stdout(Stdio::null()),
        };
        let mut child = cmd.spawn().context("starting pgpubsub")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        let err = BufReader::new(child.stderr.take().context("no stderr")?);
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("{line}");
                }
                if let Ok(mut l) = keep.lock() {
                    l.push(line);
                }
            }
        });
        Ok(Proc { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn wait_for(&mut self, needle: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.log.lock().map(|l| l.iter().any(|line| line.contains(needle))).unwrap_or(false) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("exited ({status}) before logging {needle:?}");
            }
            if Instant::now() > deadline {
                bail!("did not log {needle:?} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, and wait (up to 15 s) for it to exit.
    pub async fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
