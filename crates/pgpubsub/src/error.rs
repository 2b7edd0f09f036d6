//! The library's one error type, named after causes so callers can branch on
//! what matters: a lost connection is retried, bad input is reported.

use std::fmt;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection string could not be parsed.
    #[error("invalid connection string: {0}")]
    Config(String),

    /// The database could not be reached or the connection was lost. The
    /// message includes the driver's reasons (a certificate that does not
    /// verify, a refused connection), which its own message leaves out.
    #[error("cannot connect to {target}: {}", with_causes(source))]
    Connect {
        /// Where we tried to connect (password hidden).
        target: String,
        /// What the driver said.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The listener's connection closed; the stream ends after this.
    #[error("the listening connection was lost: {0}")]
    ConnectionLost(String),

    /// The server is a standby: LISTEN/NOTIFY only works on the primary.
    #[error(
        "{0} is a read replica (pg_is_in_recovery() is true): LISTEN/NOTIFY needs the primary: connect to it instead"
    )]
    ReadReplica(String),

    /// A notification sent to ourselves never came back: LISTEN is accepted
    /// but nothing is delivered, as behind a transaction pooler.
    #[error(
        "notifications do not reach this connection to {0}: a notification sent to ourselves never arrived. \
         Is this a transaction pooler (PgBouncer in transaction mode)? LISTEN needs a direct or session-pooled connection"
    )]
    NotifyUnavailable(String),

    /// Events this subscriber had not received were pruned from the log; it
    /// should reload its state. Delivery goes on from the oldest event kept.
    #[error("resync needed: the log was pruned past this subscriber's cursor {cursor} (pruned up to {pruned})")]
    ResyncNeeded {
        /// Where the subscriber was.
        cursor: crate::cursor::Cursor,
        /// Where pruning had reached.
        pruned: crate::cursor::Cursor,
    },

    /// A channel name that LISTEN/NOTIFY cannot carry.
    #[error(transparent)]
    InvalidChannel(#[from] InvalidChannel),

    /// The `pubsub` schema is missing or older than this version: its
    /// migrations ([`crate::migrate::up`]) have not been applied.
    #[error("the pubsub schema is not installed in this database, or is older than this pgpubsub: apply its migrations first")]
    NotMigrated,

    /// A migration could not be applied or reverted.
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        /// The migration's version (its file name prefix).
        version: String,
        /// The migration's name.
        name: String,
        /// What the database said.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A [`Replay`](crate::feed::Replay) other than the log could not be
    /// read (a NATS stream, say).
    #[error("reading the replay: {0}")]
    Replay(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// Capture from the WAL could not start or go on: wal_level is not
    /// logical, the role lacks REPLICATION, the slot is in use.
    #[error("capture from the WAL: {context}: {source}{}", if hint.is_empty() { String::new() } else { format!(" ({hint})") })]
    Wal {
        /// What we were doing.
        context: &'static str,
        /// What to do about it, chosen by the SQLSTATE (may be empty).
        hint: &'static str,
        /// What the replication connection said.
        #[source]
        source: Box<pgwire_replication::PgWireError>,
    },

    /// The database refused a statement.
    #[error("{context}: {source}")]
    Db {
        /// What we were doing.
        context: &'static str,
        /// What the database said (its message, detail and hint).
        #[source]
        source: DbMessage,
    },
}

/// A database error rendered with its message, detail and hint, since the
/// driver's own `Display` only says "db error".
#[derive(Debug)]
pub struct DbMessage {
    /// SQLSTATE, e.g. `42P01` for an unknown table.
    pub code: Option<String>,
    message: String,
    /// The driver's error; `None` for one a function caught and reported
    /// as a value ([`DbMessage::reported`]).
    inner: Option<tokio_postgres::Error>,
}

impl DbMessage {
    /// Wraps a driver error.
    pub fn new(inner: tokio_postgres::Error) -> Self {
        let (code, message) = match inner.as_db_error() {
            Some(db) => {
                let mut m = db.message().to_string();
                if let Some(d) = db.detail() {
                    m.push_str(&format!(" ({d})"));
                }
                if let Some(h) = db.hint() {
                    m.push_str(&format!("; hint: {h}"));
                }
                (Some(db.code().code().to_string()), m)
            }
            None => (None, inner.to_string()),
        };
        DbMessage { code, message, inner: Some(inner) }
    }

    /// An error the database caught in a function and reported as values
    /// (its SQLSTATE and message).
    pub fn reported(code: Option<String>, message: String) -> Self {
        DbMessage { code, message, inner: None }
    }
}

impl fmt::Display for DbMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DbMessage {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.as_ref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// Wraps a driver error from a statement that names only pgpubsub's own
    /// objects (the `pubsub` schema, `schema_migrations`), or from preparing
    /// one that also takes a caller's (see [`Error::db_running`]). A missing
    /// schema, table, column or function (SQLSTATE 3F000, 42P01, 42703,
    /// 42883) can then only be ours, missing or older than this pgpubsub:
    /// [`Error::NotMigrated`]. Decided by SQLSTATE alone, never by the
    /// message, which `lc_messages` translates.
    pub(crate) fn db(context: &'static str, source: tokio_postgres::Error) -> Self {
        let msg = DbMessage::new(source);
        match msg.code.as_deref() {
            Some("3F000" | "42P01" | "42703" | "42883") => Error::NotMigrated,
            _ => Error::Db { context, source: msg },
        }
    }

    /// Wraps a driver error from running a statement, already prepared
    /// (errors of that go through [`Error::db`]), that names a caller's
    /// object: `pubsub.watch($1::text::regclass)` with a table that does not
    /// exist fails with 42P01 (or 3F000 for its schema) only when it runs.
    /// So this is always an [`Error::Db`] with the server's SQLSTATE.
    pub(crate) fn db_running(context: &'static str, source: tokio_postgres::Error) -> Self {
        Error::Db { context, source: DbMessage::new(source) }
    }

    /// The SQLSTATE of a database error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Db { source, .. } => source.code.as_deref(),
            _ => None,
        }
    }
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel name {name:?}: {reason}")]
pub struct InvalidChannel {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// An error and its causes, `: `-separated: the driver's own messages are
/// generic ("error performing TLS handshake"), the cause says what happened.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
