//! `pgpubsub listen`: the logging mode.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use pgpubsub::{Limits, Listener, ListenerOptions};
use tokio_postgres::Config;

use crate::cli::ListenArgs;
use crate::output::{self, Style};

/// Prints events until Ctrl-C (or SIGTERM), `--count` events, or a lost
/// connection (an error).
pub async fn run(config: &Config, args: &ListenArgs, debug: bool) -> anyhow::Result<()> {
    let style = match (args.json, debug) {
        (true, _) => Style::Json,
        (false, true) => Style::Pretty,
        (false, false) => Style::Line,
    };
    let limits = Limits {
        max_event_bytes: args.max_event_bytes,
        max_age: Duration::from_secs(args.chunk_timeout.max(1)),
        ..Limits::default()
    };
    let stop = shutdown_signal();
    let mut listener = Listener::connect(
        config,
        &args.channels,
        ListenerOptions::default().limits(limits),
    )
    .await
    .context("starting the listener")?;
    let stats = listener.stats();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 << 10, stdout.lock());
    let mut printed = 0u64;
    tokio::pin!(stop);

    let result = loop {
        let first = tokio::select! {
            item = listener.recv() => item,
            () = &mut stop => break Ok(()),
        };
        let Some(first) = first else { break Ok(()) };
        // Write what is ready now, then flush once: one syscall per burst.
        let mut item = Some(first);
        let mut failed = None;
        while let Some(next) = item {
            match next {
                Ok(event) => {
                    if let Err(e) = output::write_event(&mut out, &event, style) {
                        failed = Some(e);
                        break;
                    }
                    printed += 1;
                    if args.count.is_some_and(|n| printed >= n) {
                        break;
                    }
                }
                Err(e) => {
                    let _ = out.flush();
                    return Err(e).context("listening");
                }
            }
            item = listener.try_recv();
        }
        let flushed = failed.map_or_else(|| out.flush(), Err);
        match flushed {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
            Err(e) => break Err(e).context("writing to stdout"),
            Ok(()) => {}
        }
        if args.count.is_some_and(|n| printed >= n) {
            break Ok(());
        }
    };
    let s = stats.snapshot();
    tracing::info!(
        printed,
        notifications = s.notifications,
        chunks = s.chunks,
        fetched = s.fetched,
        malformed = s.malformed,
        not_json = s.not_json,
        corrupt = s.corrupt,
        expired = s.expired,
        evicted = s.evicted,
        oversize = s.oversize,
        "stopped"
    );
    result
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, not when first polled, so a signal that arrives while the caller
/// is still connecting is not fatal.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
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
