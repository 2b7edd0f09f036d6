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

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

/// The default connection string, as in the first seed.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Where and how to connect: the driver's settings and the TLS ones, which
/// the driver does not know (see the [module](self) docs).
///
/// Parse one with [`parse_config`] or `str::parse`; wrap a driver `Config`
/// with `From` (its `sslmode`, if any, is kept).
#[derive(Clone, Debug)]
pub struct Config {
    pg: tokio_postgres::Config,
    tls: Tls,
}

impl Config {
    /// The driver's settings (host, user, database, …).
    pub fn pg(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The driver's settings, to change. Its `ssl_mode` is not used: the
    /// TLS settings are [`Config::tls_mut`].
    pub fn pg_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }

    /// The TLS settings.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// The TLS settings, to change.
    pub fn tls_mut(&mut self) -> &mut Tls {
        &mut self.tls
    }
}

impl From<tokio_postgres::Config> for Config {
    fn from(pg: tokio_postgres::Config) -> Self {
        let mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        Config { pg, tls: Tls { mode, ..Tls::default() } }
    }
}

impl FromStr for Config {
    type Err = Error;

    fn from_str(s: &str) -> Result<Config> {
        parse_config(s)
    }
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// Without TLS first; with TLS (unverified) if the server refuses that.
    Allow,
    /// With TLS if the server offers it, else without (libpq's default). The
    /// certificate is not verified unless `sslrootcert` is a file.
    #[default]
    Prefer,
    /// TLS; the certificate is not verified unless `sslrootcert` is a file
    /// (then as `verify-ca`, as libpq does).
    Require,
    /// TLS; the certificate chain must lead to `sslrootcert`; any host name.
    VerifyCa,
    /// TLS; the chain must lead to `sslrootcert` and the certificate must be
    /// for the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The name libpq uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "invalid sslmode {other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// Whom to trust: libpq's `sslrootcert`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// CA certificates in a PEM file.
    File(PathBuf),
    /// The system's trusted roots (`sslrootcert=system`).
    System,
}

/// The TLS settings of a connection (libpq's parameters of the same names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_cert: Option<RootCert>,
    /// `sslcert`: a client certificate (PEM, may include its chain).
    pub cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (PEM, unencrypted).
    pub key: Option<PathBuf>,
}

impl Tls {
    /// Checks the combination as libpq does: `verify-*` need a root,
    /// `sslrootcert=system` needs `verify-full`, a certificate needs its key.
    ///
    /// # Errors
    /// [`Error::Config`] saying what is missing.
    pub fn check(&self) -> Result<()> {
        if matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.root_cert.is_none() {
            return Err(Error::Config(format!(
                "sslmode={} needs sslrootcert: a file of CA certificates, or `system` for the system's trusted roots",
                self.mode.as_str()
            )));
        }
        if self.root_cert == Some(RootCert::System) && self.mode != SslMode::VerifyFull {
            // As libpq 16: anyone can get a certificate from a public CA for
            // a name of their own, so only verify-full means anything.
            return Err(Error::Config(format!(
                "sslrootcert=system needs sslmode=verify-full (it is {})",
                self.mode.as_str()
            )));
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(Error::Config("sslcert is given without sslkey".into())),
            (None, Some(_)) => Err(Error::Config("sslkey is given without sslcert".into())),
            _ => Ok(()),
        }
    }
}

/// The parameters pgpubsub takes out of the connection string before the
/// driver parses the rest.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Parses a connection string (URL or `key=value` form), libpq's TLS
/// parameters included, and checks that the files they name can be read.
///
/// # Errors
/// [`Error::Config`] with the driver's reason, or what is wrong with the TLS
/// parameters (naming the parameter, or the file that cannot be read).
pub fn parse_config(url: &str) -> Result<Config> {
    let (rest, params) = split_tls_params(url);
    let mut pg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
        // The driver's own message is only "invalid connection string"; the
        // reason is its source.
        let reason = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_else(|| e.to_string());
        Error::Config(reason)
    })?;
    if pg.get_application_name().is_none() {
        pg.application_name("pgpubsub");
    }
    let mut tls = Tls::default();
    let mut mode = None;
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => mode = Some(value.parse::<SslMode>()?),
            "sslrootcert" if value == "system" => tls.root_cert = Some(RootCert::System),
            "sslrootcert" => tls.root_cert = Some(RootCert::File(value.into())),
            "sslcert" => tls.cert = Some(value.into()),
            "sslkey" => tls.key = Some(value.into()),
            _ => unreachable!("only TLS_KEYS are split off"),
        }
    }
    // As libpq 16: with the system's roots, the default is verify-full.
    tls.mode =
        mode.unwrap_or(if tls.root_cert == Some(RootCert::System) { SslMode::VerifyFull } else { SslMode::Prefer });
    tls.check()?;
    if tls.mode != SslMode::Disable {
        // Read the files now, so a wrong path is reported at start-up.
        crate::tls::connector(&tls)?;
    }
    Ok(Config { pg, tls })
}

/// Splits libpq's TLS parameters off a connection string: what is left (for
/// the driver) and the parameters, decoded, in order.
fn split_tls_params(url: &str) -> (String, Vec<(String, String)>) {
    let is_tls = |key: &str| TLS_KEYS.contains(&key);
    let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) else {
        return match key_values(url) {
            Some(pairs) => {
                let (tls, others): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| is_tls(k));
                let rest: Vec<String> = others.iter().map(|(k, v)| format!("{k}='{}'", quote(v))).collect();
                (rest.join(" "), tls)
            }
            // Malformed: the driver says why.
            None => (url.to_string(), Vec::new()),
        };
    };
    let prefix_len = url.len() - rest.len();
    // As the driver does: credentials end at the first '@', the query
    // starts at the first '?' after them.
    let after_creds = rest.find('@').map_or(0, |at| at + 1);
    let Some(q) = rest[after_creds..].find('?').map(|q| prefix_len + after_creds + q) else {
        return (url.to_string(), Vec::new());
    };
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for param in url[q + 1..].split('&') {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let key = decode(key);
        if is_tls(&key) {
            tls.push((key, decode(value)));
        } else {
            kept.push(param);
        }
    }
    let mut left = url[..q].to_string();
    if !kept.is_empty() {
        left.push('?');
        left.push_str(&kept.join("&"));
    }
    (left, tls)
}

/// `key=value` pairs as libpq (and the driver) read them: values may be
/// single-quoted, `\` escapes the next character. `None` when malformed.
fn key_values(s: &str) -> Option<Vec<(String, String)>> {
    let mut it = s.chars().peekable();
    let mut pairs = Vec::new();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            return if it.peek().is_none() { Some(pairs) } else { None };
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        it.next_if_eq(&'=')?;
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next()? {
                    '\'' => break,
                    '\\' => value.push(it.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                match c {
                    '\\' => value.push(it.next()?),
                    c => value.push(c),
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        pairs.push((key, value));
    }
}

/// Escapes a value for inside single quotes.
fn quote(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\'', "\\'")
}

/// `user@host:port/dbname`, never the password: safe for logs and errors.
pub fn describe(config: &Config) -> String {
    let config = &config.pg;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{}:{}/{}",
        config.get_user().unwrap_or("?"),
        host,
        port,
        config.get_dbname().or(config.get_user()).unwrap_or("?")
    )
}

/// The settings pgpubsub adds to a connection it keeps open: TCP keepalives
/// (a dead peer is noticed by the kernel too), and a connect timeout, unless
/// the connection string sets them.
pub fn tuned(config: &Config) -> Config {
    let mut config = config.clone();
    let c = &mut config.pg;
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
    let tls = crate::tls::connector(&config.tls)?;
    let mut pg = config.pg.clone();
    pg.ssl_mode(match config.tls.mode {
        SslMode::Disable | SslMode::Allow => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    let connected = match pg.connect(tls.clone()).await {
        // allow: the server refused a connection without TLS; try with.
        Err(e) if config.tls.mode == SslMode::Allow && e.as_db_error().is_some() => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_hides_the_password() {
        let c = parse_config("postgres://alice:s3cret@db.example:6432/app").unwrap();
        assert_eq!(describe(&c), "alice@db.example:6432/app");
        let c = parse_config("host=h user=u password=s3cretpw").unwrap();
        assert!(!describe(&c).contains("s3cretpw"));
        assert_eq!(describe(&c), "u@h:5432/u");
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for bad in ["postgres://h:notaport/db", "nonsense=1", "postgres://u@h/db?sslmode=bogus", "host='h"] {
            assert!(matches!(parse_config(bad), Err(Error::Config(_))), "{bad}");
        }
    }

    #[test]
    fn driver_errors_say_why() {
        let err = parse_config("host=h nonsense=1").unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
        // libpq's TLS parameters that pgpubsub does not support are refused.
        let err = parse_config("postgres://h/db?sslmode=require&sslcrl=/crl.pem").unwrap_err().to_string();
        assert!(err.contains("unknown option `sslcrl`"), "{err}");
    }

    #[test]
    fn tls_parameters_in_a_url() {
        let c = parse_config(
            "postgres://u:p%40ss@h:6432/db?application_name=x&sslmode=verify-full&sslrootcert=system&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(c.tls().mode, SslMode::VerifyFull);
        assert_eq!(c.tls().root_cert, Some(RootCert::System));
        assert_eq!(c.pg().get_application_name(), Some("x"));
        assert_eq!(c.pg().get_connect_timeout(), Some(&std::time::Duration::from_secs(3)));
        assert_eq!(c.pg().get_password(), Some(&b"p@ss"[..]));
        assert_eq!(describe(&c), "u@h:6432/db");

        let (rest, tls) = split_tls_params("postgresql://u:a?b@h/db?sslmode=require&sslcert=%2Ftmp%2Fc.pem&sslkey=/k");
        assert_eq!(rest, "postgresql://u:a?b@h/db");
        assert_eq!(
            tls,
            [("sslmode", "require"), ("sslcert", "/tmp/c.pem"), ("sslkey", "/k")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let (rest, tls) = split_tls_params("postgres://h/db?sslmode=disable&user=u");
        assert_eq!(rest, "postgres://h/db?user=u");
        assert_eq!(tls.len(), 1);
        assert_eq!(split_tls_params("postgres://h/db").0, "postgres://h/db");
    }

    #[test]
    fn tls_parameters_as_key_values() {
        let c = parse_config("host=h  user=u sslmode = require dbname=d").unwrap();
        assert_eq!(c.tls().mode, SslMode::Require);
        assert_eq!(c.pg().get_dbname(), Some("d"));
        let c = parse_config(r"host=h password='a \'b\' c' sslmode=disable sslrootcert='/no such/ca.pem'").unwrap();
        assert_eq!(c.tls().mode, SslMode::Disable);
        assert_eq!(c.tls().root_cert, Some(RootCert::File("/no such/ca.pem".into())));
        assert_eq!(c.pg().get_password(), Some(&b"a 'b' c"[..]));
        assert_eq!(c.pg().get_hosts(), [Host::Tcp("h".into())]);
    }

    #[test]
    fn the_default_is_prefer() {
        assert_eq!(parse_config("postgres://h/db").unwrap().tls().mode, SslMode::Prefer);
        assert_eq!(parse_config("host=h").unwrap().tls().mode, SslMode::Prefer);
        let pg: tokio_postgres::Config = "host=h sslmode=disable".parse().unwrap();
        assert_eq!(Config::from(pg).tls().mode, SslMode::Disable);
    }

    #[test]
    fn bad_tls_parameters_say_which() {
        let cases = [
            ("postgres://h/db?sslmode=bogus", "invalid sslmode \"bogus\""),
            ("host=h sslmode=verify-all", "invalid sslmode \"verify-all\""),
            ("host=h sslmode=verify-full", "sslmode=verify-full needs sslrootcert"),
            ("host=h sslmode=verify-ca", "sslmode=verify-ca needs sslrootcert"),
            ("host=h sslmode=require sslrootcert=system", "sslrootcert=system needs sslmode=verify-full"),
            ("host=h sslcert=/c.pem", "sslcert is given without sslkey"),
            ("host=h sslmode=verify-full sslrootcert=/no/such/ca.pem", "/no/such/ca.pem"),
            ("host=h sslmode=require sslcert=/no/c.pem sslkey=/no/k.pem", "/no/c.pem"),
        ];
        for (url, expect) in cases {
            let err = parse_config(url).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
            assert!(err.to_string().contains(expect), "{url}: expected {expect:?} in {err}");
        }
    }

    #[test]
    fn system_roots_default_to_verify_full() {
        let c = parse_config("host=h sslrootcert=system").unwrap();
        assert_eq!(c.tls().mode, SslMode::VerifyFull);
    }
}
