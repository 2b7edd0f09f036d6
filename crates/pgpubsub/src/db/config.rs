//! A connection's settings: parsing a connection string (URL or `key=value`
//! form) with libpq's TLS parameters, which the driver does not know, and
//! describing it without its password.

use std::str::FromStr;

use tokio_postgres::config::Host;

use super::tls::{RootCert, SslMode, Tls};
use crate::error::{Error, Result};

/// Where and how to connect: the driver's settings and the TLS ones, which
/// the driver does not know (see the [module](crate::db) docs).
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
        super::connector::connector(&tls)?;
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
