//! The WAL as a way into the log: the input of the [capturer](crate::capture).
//!
//! Tables watched with `pubsub.watch_wal` (and the messages of
//! `pubsub.wal_messages`) are published (`pgpubsub`, `pgpubsub_messages`)
//! and streamed from a logical replication slot through pgwire-replication
//! (pgoutput). Here: opening the slot's stream ([`open`]), with errors
//! mapped by SQLSTATE ([`SlotError`]); `pgoutput.rs`, the row messages;
//! `decode.rs`, from messages to events with their JSON.
//!
//! Needs `wal_level = logical` and, for the capturer's role only,
//! `REPLICATION`. Readers read the log.

mod decode;
pub(crate) mod pgoutput;
mod types;

use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, TlsConfig};
use tokio_postgres::config::Host;

pub(crate) use self::decode::{Captured, ChannelMap, Decoder, Txn, PG_EPOCH};
use crate::db::{Config, RootCert, SslMode};
use crate::error::Error;

/// The publications a capturer streams: watched tables (and
/// pubsub.wal_watches), and messages.
const PUBLICATIONS: [&str; 2] = ["pgpubsub", "pgpubsub_messages"];

/// Why a slot's stream could not start or went on no more.
#[derive(Debug)]
pub(crate) enum SlotError {
    /// Another session streams the slot (SQLSTATE 55006): a capturer that
    /// is active elsewhere.
    InUse(PgWireError),
    /// Anything else: the error, and whether retrying can help.
    Failed(Error),
}

/// The SQLSTATE a replication error carries, if the server sent one
/// (pgwire-replication renders it as `… (SQLSTATE xxxxx)`).
pub(crate) fn sqlstate(e: &PgWireError) -> Option<&str> {
    let PgWireError::Server(text) = e else { return None };
    let at = text.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    let code = text.get(at..at + 5)?;
    code.bytes().all(|b| b.is_ascii_alphanumeric()).then_some(code)
}

/// A replication error as ours, with the hint a user needs, chosen by SQLSTATE.
pub(crate) fn wal_error(context: &'static str, e: PgWireError) -> Error {
    let hint = match sqlstate(&e) {
        // object_not_in_prerequisite_state. (A slot the server invalidated
        // says the same; the capturer tells it apart by asking
        // pg_replication_slots, and re-creates it.)
        Some("55000") => "set wal_level = logical in postgresql.conf and restart the server",
        // insufficient_privilege
        Some("42501") => "the capturer's role needs REPLICATION: ALTER ROLE … REPLICATION",
        Some("55006") => "another capturer streams this slot",
        Some("53400") => "raise max_replication_slots or max_wal_senders",
        _ => "",
    };
    Error::Wal { context, hint, source: Box::new(e) }
}

/// The replication connection's settings, from the connection string.
fn replication_config(config: &Config, slot: &str, status_interval: Duration) -> ReplicationConfig {
    let pg = config.pg();
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".to_string(),
    };
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(&user).to_string();
    let root = || match &config.tls().root_cert {
        Some(RootCert::File(p)) => Some(p.clone()),
        Some(RootCert::System) | None => None,
    };
    let tls = match config.tls().mode {
        SslMode::Disable | SslMode::Allow => TlsConfig::disabled(),
        // TLS when the server offers it, as libpq's prefer (and the
        // statement connections) do.
        SslMode::Prefer => TlsConfig { mode: pgwire_replication::SslMode::Prefer, ..TlsConfig::disabled() },
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(root()),
        SslMode::VerifyFull => TlsConfig::verify_full(root()),
    };
    let tls = match (&config.tls().cert, &config.tls().key) {
        (Some(cert), Some(key)) => tls.with_client_cert(cert.clone(), key.clone()),
        _ => tls,
    };
    let publications: Vec<String> = PUBLICATIONS.iter().map(|p| p.to_string()).collect();
    ReplicationConfig::new(host, user, password, database, slot, publications)
        .with_port(pg.get_ports().first().copied().unwrap_or(5432))
        .with_tls(tls)
        .with_status_interval(status_interval)
        .with_application_name("pgpubsub capture")
        // A capturer appends while the stream goes on: room for about a
        // batch of messages. Counted in messages, not bytes (the crate has no
        // byte bound): a backlog of very large rows holds up to this many.
        .with_buffer_size(2048)
        // Values are rendered by the server's output functions: make dates
        // ISO 8601 in UTC whatever the server's defaults (pgoutput.rs).
        .with_options("-c datestyle=ISO -c timezone=UTC")
}

/// A slot this session created: the snapshot it exported (valid until the
/// stream starts) and its consistent point (what streams is after it).
#[derive(Debug)]
pub(crate) struct Created {
    pub(crate) snapshot: String,
    pub(crate) consistent_point: u64,
}

/// Opens the replication connection to `slot` and creates the slot if it
/// does not exist (then with what it exported). Nothing streams until
/// [`start`].
pub(crate) async fn connect(
    config: &Config,
    slot: &str,
    status_interval: Duration,
) -> Result<(ReplicationClient, Option<Created>), SlotError> {
    let repl = replication_config(config, slot, status_interval);
    let failed = |context| move |e| SlotError::Failed(wal_error(context, e));
    let mut client =
        ReplicationClient::connect_gated(repl).await.map_err(failed("opening the replication connection"))?;
    // The name is checked by the caller (slot_name): only [a-z0-9_].
    let found = client
        .simple_query(&format!(
            "SELECT database = current_database(), database FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
        .map_err(failed("looking up the slot"))?;
    if let Some(row) = found.first() {
        let text = |i: usize| row.get(i).and_then(|v| v.as_ref()).map(|b| String::from_utf8_lossy(b).into_owned());
        if text(0).as_deref() != Some("t") {
            // Slots are per cluster, a logical slot per database.
            return Err(SlotError::Failed(Error::Config(format!(
                "replication slot {slot} belongs to database {:?}: give this database's capturer a name of its own \
                 (pgpubsub capture --name N, or PGPUBSUB_CAPTURE_NAME)",
                text(1).unwrap_or_default()
            ))));
        }
        return Ok((client, None));
    }
    let rows = match client.simple_query(&format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput")).await {
        Ok(rows) => rows,
        // Another capturer made it a moment ago: it streams it.
        Err(e) if sqlstate(&e) == Some("42710") => return Err(SlotError::InUse(e)),
        Err(e) => return Err(SlotError::Failed(wal_error("creating the replication slot", e))),
    };
    // slot_name, consistent_point, snapshot_name, output_plugin
    let text = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i))
            .and_then(|v| v.as_ref())
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(str::to_string)
    };
    let consistent_point = text(1).and_then(|l| crate::event::WalPosition::parse_lsn(&l)).unwrap_or(0);
    let created = text(2).map(|snapshot| Created { snapshot, consistent_point });
    tracing::info!(slot, "created the replication slot");
    Ok((client, created))
}

/// Starts streaming from the slot's confirmed position.
pub(crate) async fn start(mut client: ReplicationClient) -> Result<ReplicationClient, SlotError> {
    let started = match client.start().await {
        Ok(()) => client.wait_started().await,
        Err(e) => Err(e),
    };
    match started {
        Ok(()) => Ok(client),
        Err(e) if sqlstate(&e) == Some("55006") => Err(SlotError::InUse(e)),
        Err(e) => Err(SlotError::Failed(wal_error("starting replication", e))),
    }
}

/// A capturer's slot: `pgpubsub_capture` for the default name, else
/// `pgpubsub_capture_<name>`.
///
/// # Errors
/// [`Error::Config`] unless `name` is 1 to 46 lowercase letters, digits or `_`.
pub(crate) fn slot_name(name: Option<&str>) -> crate::Result<String> {
    let Some(name) = name else { return Ok("pgpubsub_capture".to_string()) };
    let ok = !name.is_empty()
        && name.len() <= 46
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(Error::Config(format!(
            "invalid capturer name {:?}: use 1 to 46 lowercase letters, digits or _ (it names a replication slot)",
            name.chars().take(64).collect::<String>()
        )));
    }
    Ok(format!("pgpubsub_capture_{name}"))
}

#[cfg(test)]
mod tests {
    use pgwire_replication::PgWireError;

    #[test]
    fn capturer_names_make_valid_slot_names() {
        assert_eq!(super::slot_name(None).unwrap(), "pgpubsub_capture");
        assert_eq!(super::slot_name(Some("eu_2")).unwrap(), "pgpubsub_capture_eu_2");
        for bad in ["", "Orders", "a-b", "a b", "x'; DROP", &"a".repeat(47)] {
            assert!(super::slot_name(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn sqlstates_are_read_from_what_the_server_said() {
        let e = PgWireError::Server("replication slot \"s\" is active for PID 7 (SQLSTATE 55006)".into());
        assert_eq!(super::sqlstate(&e), Some("55006"));
        assert_eq!(super::sqlstate(&PgWireError::Server("no code".into())), None);
        assert_eq!(super::sqlstate(&PgWireError::Server("(SQLSTATE 55".into())), None);
        assert_eq!(super::sqlstate(&PgWireError::Protocol("(SQLSTATE 55006)".into())), None);
    }
}
