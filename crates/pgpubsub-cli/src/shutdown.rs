//! When the process should stop: Ctrl-C or SIGTERM, as one future that
//! `listen`, `serve` and `bridge` each pass to their loop (or to the server)
//! and select on beside their work.

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, not when first polled, so a signal that arrives while the caller
/// is still connecting is not fatal.
pub fn signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
