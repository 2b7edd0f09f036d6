//! `pgpubsub listen`: the logging mode.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use pgpubsub::db::Config;
use pgpubsub::{Channel, ConnectionState, Limits, Listener, ListenerOptions};

use super::parse_duration;
use super::prune::RetentionArgs;
use crate::output::{self, Style};
use crate::shutdown;

/// Options of `listen`.
#[derive(Debug, Args, Clone)]
pub struct ListenArgs {
    /// The channels to listen on.
    #[command(flatten)]
    pub channels: Channels,

    /// One JSON object per event per line on stdout (logs stay on stderr).
    #[arg(long)]
    pub json: bool,

    /// Stamp each event with the time it was printed: a `received_at`
    /// member (RFC 3339, UTC, microseconds) in JSON, a leading field in lines.
    #[arg(long)]
    pub received_at: bool,

    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Largest event accepted, in bytes; larger ones are dropped and counted.
    #[arg(long, env = "PGPUBSUB_MAX_EVENT_BYTES", default_value_t = 64 << 20, value_name = "BYTES")]
    pub max_event_bytes: u64,

    /// Seconds an incomplete chunked event waits for its missing chunks.
    #[arg(long, env = "PGPUBSUB_CHUNK_TIMEOUT", default_value_t = 30, value_name = "SECONDS")]
    pub chunk_timeout: u64,

    /// Durable subscriber name: its cursor is stored in the database, and a
    /// restart resumes after the last event printed.
    #[arg(long, env = "PGPUBSUB_NAME", value_name = "NAME")]
    pub name: Option<String>,

    /// After a read that found less than a page, the least time before the
    /// next read begins (the library's `linger`, default 2ms). For
    /// measurements: longer carries more events per read under load, at up
    /// to that much more latency.
    #[arg(long, env = "PGPUBSUB_LINGER", value_name = "DURATION", value_parser = parse_duration, hide = true)]
    pub linger: Option<std::time::Duration>,

    /// Prune the log while listening (every minute), by these bounds.
    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Also run the capturer in this process: tables watched with `watch
    /// --wal` (and `publish --wal` messages) are appended to the log from
    /// the WAL (`pgpubsub capture` does it as a process of its own). Needs
    /// wal_level = logical and a role with REPLICATION. See docs/delivery.md.
    #[arg(long)]
    pub capture: bool,

    /// A live shape of this table: first its rows that match --where, with
    /// --columns (one `snapshot` record each, then `ready`), then every
    /// change to them, entering and leaving --where included, with none the
    /// rows already showed. Listens on the table's channel. With --name, a
    /// restart resumes without the rows.
    #[arg(long, value_name = "TABLE")]
    pub shape: Option<String>,

    /// The shape's filter, in pgpubsub's grammar: `status = 'paid' and
    /// (qty >= 2 or note is null)` (docs/protocol.md, "Shapes").
    #[arg(long = "where", value_name = "FILTER", requires = "shape")]
    pub filter: Option<String>,

    /// The shape's columns (the key's are always printed).
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS", requires = "shape")]
    pub columns: Option<Vec<String>>,
}

/// The channels a command works on: `--channel`, repeated or
/// comma-separated, else `PUB_SUB_CHANNEL` (the seed's name), else the
/// seed's `job_channel`. `listen`'s (`serve` has its own: none means every
/// channel, and patterns).
#[derive(Debug, Args, Clone)]
pub struct Channels {
    /// Channels (repeat, or separate with commas).
    #[arg(
        long = "channel",
        short = 'c',
        env = "PUB_SUB_CHANNEL",
        value_name = "PUB_SUB_CHANNEL",
        value_delimiter = ',',
        default_value = "job_channel"
    )]
    pub list: Vec<Channel>,
}

/// Prints events until Ctrl-C (or SIGTERM), or `--count` events.
pub async fn run(config: &Config, args: &ListenArgs, debug: bool) -> anyhow::Result<()> {
    let style = match (args.json, debug) {
        (true, _) => Style::Json,
        (false, true) => Style::Pretty,
        (false, false) => Style::Line,
    };
    // `--capture`: this process also appends WAL-watched tables to the log.
    let capture = crate::cmd::capture::beside(config, args.capture)?.map(|(task, _)| task);
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
    let stop = shutdown::signal();
    let mut printer = Printer::new(args, style);
    let mut shaping = match &args.shape {
        Some(table) => Some(Shaping::new(config, table, args).await?),
        None => None,
    };
    let channels = match &shaping {
        Some(s) => vec![Channel::new(s.shape.channel.clone())?],
        None => args.channels.list.clone(),
    };
    if let Some(s) = &mut shaping {
        let resuming = match &args.name {
            Some(name) => Listener::stored(config, name).await.context("reading the stored cursor")?.is_some(),
            None => false,
        };
        if !resuming {
            options = options.since(s.snapshot(&mut printer).await?);
        }
    }
    let mut listener = Listener::connect(config, &channels, options).await.context("starting the listener")?;
    if args.retention.policy().is_set() {
        super::prune::spawn_periodic(config.clone(), args.retention.policy(), Duration::from_secs(60));
    }
    log_state_changes(listener.state());
    let stats = listener.stats();
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
        if let (Some(s), Err(pgpubsub::Error::ResyncNeeded { .. })) = (&mut shaping, &first) {
            // Events the shape needed are gone: its rows again. The listener
            // goes on from the gap's end; the new snapshot's hand-over skips
            // every change it holds, wherever in the log it lies.
            printer.write(first).context("writing to stdout")?;
            s.snapshot(&mut printer).await?;
            continue;
        }
        let shown = |item| match &shaping {
            Some(s) => s.show(item),
            None => Some(item),
        };
        let Some(first) = shown(first) else { continue };
        match printer.burst(first, || loop {
            match shown(listener.try_recv()?) {
                Some(item) => break Some(item),
                None => continue,
            }
        }) {
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

/// `listen --shape`: the shape, and the hand-over from its last snapshot.
struct Shaping {
    config: Config,
    shape: std::sync::Arc<pgpubsub::shape::Shape>,
    handover: Option<pgpubsub::shape::Handover>,
}

impl Shaping {
    async fn new(config: &Config, table: &str, args: &ListenArgs) -> anyhow::Result<Shaping> {
        let filter = args.filter.as_deref().map(pgpubsub::shape::Filter::parse).transpose().context("--where")?;
        let client = pgpubsub::db::connect(config).await?;
        let shape = pgpubsub::shape::Shape::resolve(&client, table, filter.as_ref(), args.columns.as_deref())
            .await
            .with_context(|| format!("--shape {table}"))?;
        Ok(Shaping { config: config.clone(), shape: std::sync::Arc::new(shape), handover: None })
    }

    /// Prints the shape's rows, then `ready`; where its changes begin.
    async fn snapshot(&mut self, printer: &mut Printer<'_>) -> anyhow::Result<pgpubsub::Cursor> {
        use pgpubsub::shape::SnapshotPart;
        let client = pgpubsub::db::connect(&self.config).await?;
        let mut parts = self.shape.snapshot(client, None).await.context("reading the shape's rows")?;
        let table = format!("{}.{}", self.shape.schema, self.shape.table);
        while let Some(part) = parts.next().await {
            match part.context("reading the shape's rows")? {
                SnapshotPart::Rows(rows) => {
                    for row in rows {
                        output::write_snapshot_row(&mut printer.out, &table, &row, printer.style)?;
                    }
                    printer.out.flush()?;
                }
                SnapshotPart::Done { rows, handover } => {
                    let start = handover.start();
                    output::write_ready(&mut printer.out, &table, rows, start, printer.style)?;
                    printer.out.flush()?;
                    self.handover = Some(handover);
                    return Ok(start);
                }
            }
        }
        anyhow::bail!("the shape's rows ended early")
    }

    /// An item as the shape shows it; `None` when it is not for it.
    fn show(&self, item: pgpubsub::Result<pgpubsub::Event>) -> Option<pgpubsub::Result<pgpubsub::Event>> {
        let Ok(event) = item else { return Some(item) };
        match self.shape.after(self.handover.as_ref(), &event) {
            pgpubsub::shape::Seen::Hidden => None,
            pgpubsub::shape::Seen::Same => Some(Ok(event)),
            pgpubsub::shape::Seen::As(e) => Some(Ok(*e)),
        }
    }
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
