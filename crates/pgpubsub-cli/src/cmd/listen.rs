//! `pgpubsub listen`: the logging mode.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgpubsub::db::Config;
use pgpubsub::{ConnectionState, Limits, Listener, ListenerOptions};

use crate::cli::ListenArgs;
use crate::output::{self, Style};

/// Prints events until Ctrl-C (or SIGTERM), or `--count` events.
pub async fn run(config: &Config, args: &ListenArgs, debug: bool) -> anyhow::Result<()> {
    let style = match (args.json, debug) {
        (true, _) => Style::Json,
        (false, true) => Style::Pretty,
        (false, false) => Style::Line,
    };
    // `--capture`: this process also appends WAL-watched tables to the log.
    let capture = match args.capture {
        true => Some(crate::cmd::capture::spawn(config, pgpubsub::CaptureOptions::default())?.0),
        false => None,
    };
    let limits = Limits {
        max_event_bytes: args.max_event_bytes,
        max_age: Duration::from_secs(args.chunk_timeout.max(1)),
        ..Limits::default()
    };
    let mut options = ListenerOptions::default().limits(limits);
    if let Some(linger) = args.linger {
        options.linger = linger;
    }
    if let Some(name) = &args.name {
        // Stored after each flush below, so the cursor never covers an
        // event still sitting in our output buffer.
        options = options.name(name.clone());
        options.autosave = false;
    }
    let stop = shutdown_signal();
    let mut listener =
        Listener::connect(config, &args.channels.list, options).await.context("starting the listener")?;
    if args.retention.policy().is_set() {
        crate::cmd::prune::spawn_periodic(config.clone(), args.retention.policy(), Duration::from_secs(60));
    }
    log_state_changes(listener.state());
    let stats = listener.stats();
    let mut printer = Printer::new(args, style);
    let mut last_save = Instant::now();
    tokio::pin!(stop);

    let mut capture = std::pin::pin!(crate::cmd::capture::ended(capture));
    let result = loop {
        let first = tokio::select! {
            item = listener.recv() => item,
            () = &mut stop => break Ok(()),
            e = &mut capture => break e,
        };
        let Some(first) = first else { break Ok(()) };
        match printer.burst(first, || listener.try_recv()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
            Err(e) => break Err(e).context("writing to stdout"),
            Ok(()) => {}
        }
        if last_save.elapsed() >= Duration::from_secs(1) {
            if let Err(e) = listener.save().await {
                tracing::warn!(error = %e, "could not store the cursor; will retry");
            }
            last_save = Instant::now();
        }
        if printer.done() {
            break Ok(());
        }
    };
    let _ = printer.out.flush();
    let printed = printer.printed;
    let s = stats.snapshot();
    let cursor = listener.cursor();
    if let Err(e) = listener.close().await {
        tracing::warn!(error = %e, "could not store the final cursor");
    }
    tracing::info!(printed, %cursor, polls = s.polls, wakeups = s.wakeups, notifications = s.notifications,
        foreign = s.foreign, foreign_dropped = s.foreign_dropped, chunks = s.chunks, reconnects = s.reconnects,
        resyncs = s.resyncs, malformed = s.malformed, not_json = s.not_json, corrupt = s.corrupt,
        expired = s.expired, evicted = s.evicted, oversize = s.oversize, "stopped");
    result
}

/// The output of `listen`.
struct Printer<'a> {
    out: std::io::BufWriter<Box<dyn Write>>,
    args: &'a ListenArgs,
    style: Style,
    printed: u64,
}

impl<'a> Printer<'a> {
    fn new(args: &'a ListenArgs, style: Style) -> Self {
        Printer { out: std::io::BufWriter::with_capacity(64 << 10, unbuffered_stdout()), args, style, printed: 0 }
    }

    /// Whether `--count` events were printed.
    fn done(&self) -> bool {
        self.args.count.is_some_and(|n| self.printed >= n)
    }

    /// Writes `first` and what `more` has ready now (up to `--count`),
    /// then flushes once: one syscall per burst.
    fn burst(
        &mut self,
        first: pgpubsub::Result<pgpubsub::Event>,
        mut more: impl FnMut() -> Option<pgpubsub::Result<pgpubsub::Event>>,
    ) -> std::io::Result<()> {
        let mut item = Some(first);
        while let Some(next) = item {
            self.write(next)?;
            if self.done() {
                break;
            }
            item = more();
        }
        self.out.flush()
    }

    fn write(&mut self, item: pgpubsub::Result<pgpubsub::Event>) -> std::io::Result<()> {
        match item {
            Ok(event) => {
                self.printed += 1;
                let at = self.args.received_at.then(std::time::SystemTime::now);
                output::write_event(&mut self.out, &event, self.style, at)
            }
            Err(pgpubsub::Error::ResyncNeeded { cursor, pruned }) => {
                tracing::warn!(%cursor, %pruned, "RESYNC NEEDED: events this subscriber had not seen were pruned");
                output::write_resync(&mut self.out, cursor, pruned, self.style)
            }
            Err(e) => {
                tracing::warn!(error = %e, "listener reported an error; going on");
                Ok(())
            }
        }
    }
}

/// Logs each change of the connection's state (lost, reconnecting, back).
fn log_state_changes(mut state: tokio::sync::watch::Receiver<ConnectionState>) {
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let now = state.borrow_and_update().clone();
            match now {
                ConnectionState::Listening => tracing::info!("connection state: listening"),
                ConnectionState::Reconnecting { attempt, error } => {
                    tracing::warn!(attempt, %error, "connection state: reconnecting")
                }
                _ => {}
            }
        }
    });
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

/// Standard output without the standard library's own line buffering,
/// which searches every write for a newline (a megabyte event is searched
/// whole): the loop above buffers and flushes by itself.
fn unbuffered_stdout() -> Box<dyn std::io::Write> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        if let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() {
            return Box::new(std::fs::File::from(fd));
        }
    }
    Box::new(std::io::stdout().lock())
}
