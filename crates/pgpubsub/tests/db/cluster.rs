//! A PostgreSQL cluster of the test's own, in a temporary directory, so a
//! test can restart (or break) a server without touching the shared one.

use std::path::PathBuf;
use std::process::Command;

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
}

fn bin(name: &str) -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL server binaries in /usr/lib/postgresql");
    let mut dirs: Vec<PathBuf> = versions.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect();
    dirs.sort();
    dirs.pop().expect("a PostgreSQL version").join(name)
}

/// Runs a server tool as the `postgres` user when we are root (the server
/// refuses to run as root); panics when it fails.
fn as_postgres(tool: &str, args: &[&str]) -> std::process::Output {
    let out = try_as_postgres(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn try_as_postgres(tool: &str, args: &[&str]) -> std::process::Output {
    let is_root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    let mut cmd = if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin(tool));
        c
    } else {
        Command::new(bin(tool))
    };
    cmd.args(args).output().unwrap()
}

/// Whether the PostgreSQL server binaries (initdb) are installed.
pub fn available() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).any(|e| e.path().join("bin/initdb").exists()))
        .unwrap_or(false)
}

impl Cluster {
    /// initdb and start on a free port. `standby` makes it a (primary-less)
    /// standby: in recovery, read-only.
    pub fn start(standby: bool) -> Cluster {
        Cluster::start_with(standby, |_| {})
    }

    /// As [`Cluster::start`], with `configure` run on the data directory
    /// (as root, before the first start): its files may be edited or added.
    pub fn start_with(standby: bool, configure: impl FnOnce(&std::path::Path)) -> Cluster {
        let dir = std::env::temp_dir().join(crate::common::unique("pgpubsub_cluster"));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown").args(["postgres:postgres", dir.to_str().unwrap()]).status();
        let data = dir.join("data");
        as_postgres("initdb", &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        if standby {
            std::fs::write(data.join("standby.signal"), "").unwrap();
            let _ = Command::new("chown")
                .args(["postgres:postgres", data.join("standby.signal").to_str().unwrap()])
                .status();
        }
        configure(&data);
        let _ = Command::new("chown").args(["-R", "postgres:postgres", data.to_str().unwrap()]).status();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster = Cluster { dir, port };
        cluster.ctl(&["start"]);
        cluster
    }

    /// A cluster that can decode its WAL (`wal_level = logical`), for
    /// capture from the WAL.
    pub fn logical() -> Cluster {
        Cluster::start_with(false, |data| {
            use std::io::Write;
            let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
            writeln!(conf, "wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20").unwrap();
        })
    }

    fn ctl(&self, action: &[&str]) {
        let data = self.dir.join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        let mut args = vec!["-D", data.to_str().unwrap(), "-o", &opts, "-l", log.to_str().unwrap(), "-w"];
        args.extend_from_slice(action);
        as_postgres("pg_ctl", &args);
    }

    /// `fast` or `immediate`.
    pub fn restart(&self, mode: &str) {
        self.ctl(&["-m", mode, "restart"]);
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = try_as_postgres("pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
