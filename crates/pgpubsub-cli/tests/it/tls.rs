//! The binary over TLS to PostgreSQL, against the TLS-only cluster of
//! `tls_server` (the library's TLS tests are in `pgpubsub/tests/db/tls.rs`).

use crate::tls_server::TlsServer;

/// The binary names the certificate problem once, and works with the right CA.
#[tokio::test]
async fn the_cli_over_tls() {
    let Some(s) = TlsServer::start().await else { return };
    let run = |url: String| {
        let mut cmd = crate::cli::pgpubsub(&url);
        cmd.arg("migrate");
        crate::cli::run(cmd)
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
