//! `--pin`: PostgreSQL and the writers run on CPU 0 and pgpubsub's
//! processes on CPU 1, as if pgpubsub ran on a host of its own.

use anyhow::{bail, Context};
use tokio::process::Command;
use tokio_postgres::Client;

/// CPU pinning with `taskset`: the server and this process on CPU 0,
/// pgpubsub's children on CPU 1.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pin(pub(super) bool);

impl Pin {
    /// `program` as a child to start: on CPU 1 when pinning.
    pub(super) fn command(self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if self.0 {
            let mut c = Command::new("taskset");
            c.args(["-c", "1"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Moves the PostgreSQL server (its postmaster and every process it has
    /// started; later ones inherit it) and this process to CPU 0.
    pub(super) async fn server_and_writers(self, admin: &Client) -> anyhow::Result<()> {
        if !self.0 {
            return Ok(());
        }
        let backend: i32 = admin.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        let postmaster = parent(backend as u32).context("--pin needs the server on this machine")?;
        let mut pids: Vec<u32> = children(postmaster);
        pids.push(postmaster);
        pids.push(std::process::id());
        for pid in pids {
            let ok = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", "0", &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .status()
                .context("running taskset (util-linux)")?;
            if !ok.success() {
                bail!("taskset could not pin process {pid} to CPU 0 (run as the server's user or root)");
            }
        }
        Ok(())
    }
}

/// The parent of `pid`, from /proc.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 2..)?.split(' ').nth(1)?.parse().ok()
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).filter(|&p| parent(p) == Some(pid)).collect()
}
