//! The binary over TLS to PostgreSQL, against the TLS-only cluster of
//! `tls_server` (the library's TLS tests are in `pgpubsub/tests/db/tls.rs`).

use std::process::{Command, Stdio};

use crate::common::{self, WAIT};
use crate::tls_server::TlsServer;

/// The binary names the certificate problem once, and works with the right CA.
#[tokio::test]
async fn the_cli_over_tls() {
    let Some(s) = TlsServer::start().await else { return };
    let run = |url: String| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
        for var in ["PUB_SUB_CHANNEL", "DEBUG", "RUST_LOG"] {
            cmd.env_remove(var);
        }
        let dir = std::env::temp_dir().join(common::unique("pgpubsub_tls_cli"));
        std::fs::create_dir_all(&dir).unwrap();
        cmd.env("DATABASE_URL", url).current_dir(&dir).args(["migrate"]);
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if rx.recv_timeout(WAIT).is_err() {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = tx.send(());
        let _ = std::fs::remove_dir_all(&dir);
        out
    };
    let bad = s.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", s.foreign_ca.display()));
    let out = tokio::task::spawn_blocking(move || run(bad)).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches("UnknownIssuer").count(), 1, "{err}");
    let good = s.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", s.ca.display()));
    let out = tokio::task::spawn_blocking(move || run(good)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
