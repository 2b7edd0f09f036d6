//! Connecting to Postgres: parsing the connection string (with libpq's TLS
//! parameters), describing it without its password, and opening every
//! connection pgpubsub makes, in one place: [`open`] (and [`connect`] on top
//! of it).
//!
//! TLS follows libpq: `sslmode` is `disable`, `allow`, `prefer` (the
//! default), `require`, `verify-ca` or `verify-full`; `sslrootcert` is a PEM
//! file of CA certificates or `system` (the system's trusted roots);
//! `sslcert` and `sslkey` are a client certificate and its key (PEM). They
//! can be given in either form of the connection string:
//! `postgres://h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem` or
//! `host=h dbname=db sslmode=verify-full sslrootcert=/etc/ca.pem`.
//!
//! Here: `config.rs` (a [`Config`], parsed and described), `tls.rs` (the TLS
//! settings), `connector.rs` (the rustls connector they make); this file
//! opens connections.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

mod config;
mod connector;
mod tls;

pub use config::{describe, parse_config, Config};
pub use tls::{RootCert, SslMode, Tls};

/// The default connection string, as in the first seed.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The settings pgpubsub adds to a connection it keeps open: TCP keepalives
/// (a dead peer is noticed by the kernel too), and a connect timeout, unless
/// the connection string sets them.
pub fn tuned(config: &Config) -> Config {
    let mut config = config.clone();
    let c = config.pg_mut();
    c.keepalives(true);
    if c.get_keepalives_idle() == std::time::Duration::from_secs(2 * 60 * 60) {
        c.keepalives_idle(std::time::Duration::from_secs(10));
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(std::time::Duration::from_secs(10));
    }
    config
}

/// The stream type of a connection (TLS or not: rustls' stream wraps both).
type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// An open connection's driver, from [`open`]: poll it (as a future, or
/// with [`Connection::poll_message`]) for the [`Client`] to work.
#[must_use = "the client does nothing unless its connection is polled"]
pub struct Connection(tokio_postgres::Connection<Socket, Stream>);

impl Connection {
    /// Drives the connection and returns the next message the server sent
    /// by itself (a notification, a notice); `None` once it is closed.
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>> {
        self.0.poll_message(cx)
    }
}

impl Future for Connection {
    type Output = Result<(), tokio_postgres::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Opens a connection as `config` says, TLS included. Every connection
/// pgpubsub makes is opened here.
///
/// # Errors
/// [`Error::Connect`] naming the target and why (a certificate that does
/// not verify says what is wrong with it); [`Error::Config`] when a TLS file
/// cannot be read.
pub async fn open(config: &Config) -> Result<(Client, Connection)> {
    let tls = connector::connector(config.tls())?;
    let mut pg = config.pg().clone();
    pg.ssl_mode(match config.tls().mode {
        SslMode::Disable | SslMode::Allow => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    let connected = match pg.connect(tls.clone()).await {
        // allow: the server refused a connection without TLS; try with.
        Err(e) if config.tls().mode == SslMode::Allow && e.as_db_error().is_some() => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            pg.connect(tls).await
        }
        other => other,
    };
    match connected {
        Ok((client, connection)) => Ok((client, Connection(connection))),
        Err(source) => Err(Error::Connect { target: describe(config), source }),
    }
}

/// Opens a connection for statements (see [`open`]) and spawns its driver;
/// the driver ends when the client is dropped or the connection fails.
///
/// # Errors
/// As [`open`].
pub async fn connect(config: &Config) -> Result<Client> {
    let (client, connection) = open(config).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "statement connection closed");
        }
    });
    Ok(client)
}
