//! A child `pgpubsub` process of a benchmark (the bridge's, the
//! fan-out's), its log lines kept.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// `pgpubsub` (this executable) on the database at `url`, its logs at info,
/// with no channel list from the environment.
pub fn pgpubsub(url: &str) -> anyhow::Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.env("DATABASE_URL", url)
        .env("RUST_LOG", "warn,pgpubsub=info")
        .env_remove("PUB_SUB_CHANNEL")
        .env_remove("PGPUBSUB_SERVE_CHANNELS");
    Ok(c)
}

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

    /// What follows `needle` in the first log line that holds it.
    pub fn after(&self, needle: &str) -> Option<String> {
        let log = self.log.lock().ok()?;
        log.iter().find_map(|line| line.split(needle).nth(1)).map(str::to_string)
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
