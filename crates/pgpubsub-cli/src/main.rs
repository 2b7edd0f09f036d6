//! The `pgpubsub` binary: parses the command line, starts logging and the
//! runtime, runs the command (in `pgpubsub_cli`), prints the error chain
//! and chooses the exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use pgpubsub_cli::cli::{Cli, Command, LogFormat};
#[cfg(feature = "load")]
use pgpubsub_cli::load;
use pgpubsub_cli::{bridge, cmd, serve};

fn main() -> ExitCode {
    // .env first: it only fills in what the environment does not set.
    let dotenv = match dotenvy::from_path(".env") {
        Err(e) if e.not_found() => Ok(()),
        other => other,
    };
    let cli = Cli::parse_args();
    init_tracing(cli.log_format);
    if let Err(e) = dotenv {
        eprintln!("error: cannot read .env: {e}");
        return ExitCode::from(2);
    }
    // `listen` is one pipeline (socket, decode, stdout), and so is `bridge`
    // (socket, decode, NATS): on one thread their hand-offs are plain
    // wake-ups, not cross-thread ones. The rest (load's writers, demo) want
    // both cores.
    let single = match &cli.command {
        None | Some(Command::Listen(_)) | Some(Command::Bridge(_)) => true,
        #[cfg(feature = "load")]
        Some(Command::LoadBaseline(_)) => true,
        _ => false,
    };
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}{}", chain(&e), hint(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = pgpubsub::db::parse_config(&cli.database_url)
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not usable: {e}"))?;
    if config.pg().get_application_name() == Some("pgpubsub") {
        // The library's default: name the command, so pg_stat_activity
        // tells a gateway's sessions from a listener's (a name given in
        // DATABASE_URL is kept).
        config.pg_mut().application_name(format!("pgpubsub {}", command_name(cli.command.as_ref())));
    }
    let debug = cli.debug;
    match cli.command {
        None => cmd::listen::run(&config, &cli.listen, debug).await,
        Some(Command::Listen(args)) => cmd::listen::run(&config, &args, debug).await,
        Some(Command::Migrate(args)) => cmd::migrate::run(&config, &args).await,
        Some(Command::Watch(args)) => {
            cmd::watch::run(&config, args.table.as_deref(), args.channel.as_ref(), args.inline, args.wal).await
        }
        Some(Command::Unwatch { table }) => cmd::watch::unwatch(&config, &table).await,
        Some(Command::Publish(args)) => cmd::publish::run(&config, &args).await,
        Some(Command::Prune(args)) => cmd::prune::run(&config, &args).await,
        Some(Command::Serve(args)) => serve::run(&config, &args).await,
        Some(Command::Bridge(args)) => bridge::run(&config, &args).await,
        Some(Command::Capture(args)) => cmd::capture::run(&config, &args).await,
        #[cfg(feature = "load")]
        Some(Command::LoadBridge(args)) => load::bridge::run(&config, &cli.database_url, &args).await,
        #[cfg(feature = "load")]
        Some(Command::Load(args)) => load::run(&config, &cli.database_url, &args).await,
        #[cfg(feature = "load")]
        Some(Command::LoadFanout(args)) => load::fanout::run(&config, &cli.database_url, &args).await,
        #[cfg(feature = "load")]
        Some(Command::LoadBaseline(args)) => load::baseline::run(&config, &args).await,
        Some(Command::Demo) => cmd::demo::run(&config, debug).await,
    }
}

/// The command's name as typed (`listen` when none is).
fn command_name(command: Option<&Command>) -> &'static str {
    match command {
        None | Some(Command::Listen(_)) => "listen",
        Some(Command::Migrate(_)) => "migrate",
        Some(Command::Watch(_)) => "watch",
        Some(Command::Unwatch { .. }) => "unwatch",
        Some(Command::Publish(_)) => "publish",
        Some(Command::Prune(_)) => "prune",
        Some(Command::Serve(_)) => "serve",
        Some(Command::Capture(_)) => "capture",
        Some(Command::Bridge(_)) => "bridge",
        #[cfg(feature = "load")]
        Some(Command::Load(_)) => "load",
        #[cfg(feature = "load")]
        Some(Command::LoadFanout(_)) => "load-fanout",
        #[cfg(feature = "load")]
        Some(Command::LoadBaseline(_)) => "load-baseline",
        #[cfg(feature = "load")]
        Some(Command::LoadBridge(_)) => "load-bridge",
        Some(Command::Demo) => "demo",
    }
}

/// The error and its causes, `: `-separated, each once: the library's
/// messages already include the driver's reasons (a certificate that does
/// not verify), which `{:#}` would print again.
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let more = cause.to_string();
        if !text.contains(&more) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&more);
        }
    }
    text
}

/// What to do about a library error, in the binary's words (the library's
/// messages name no command or variable of ours).
fn hint(e: &anyhow::Error) -> &'static str {
    match e.chain().find_map(|c| c.downcast_ref::<pgpubsub::Error>()) {
        Some(pgpubsub::Error::NotMigrated) => ": run `pgpubsub migrate` first",
        Some(pgpubsub::Error::ReadReplica(_)) => " (point DATABASE_URL at the primary)",
        Some(pgpubsub::Error::NotifyUnavailable(_)) => {
            " (point DATABASE_URL at the server, or at a session-mode pooler)"
        }
        _ => "",
    }
}

/// Logs go to stderr, filtered by RUST_LOG (default: info for pgpubsub and
/// pgpubsub_cli, whose targets both start with `pgpubsub`).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,pgpubsub=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
