//! Connecting to Postgres: parsing the connection string, describing it
//! without its password, and spawning the connection's driver task.

use std::str::FromStr;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::error::{Error, Result};

/// The default connection string, as in the first seed.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Parses a connection string (URL or `key=value` form).
///
/// # Errors
/// [`Error::Config`] with the driver's reason.
pub fn parse_config(url: &str) -> Result<Config> {
    let mut config = Config::from_str(url).map_err(|e| Error::Config(e.to_string()))?;
    if config.get_application_name().is_none() {
        config.application_name("pgpubsub");
    }
    Ok(config)
}

/// `user@host:port/dbname`, never the password: safe for logs and errors.
pub fn describe(config: &Config) -> String {
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
    let mut c = config.clone();
    c.keepalives(true);
    if c.get_keepalives_idle() == std::time::Duration::from_secs(2 * 60 * 60) {
        c.keepalives_idle(std::time::Duration::from_secs(10));
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(std::time::Duration::from_secs(10));
    }
    c
}

/// Opens a connection for statements and spawns its driver; the driver ends
/// when the client is dropped or the connection fails.
///
/// # Errors
/// [`Error::Connect`] naming the target.
pub async fn connect(config: &Config) -> Result<Client> {
    let (client, connection) =
        config.connect(NoTls).await.map_err(|source| Error::Connect { target: describe(config), source })?;
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
        let c = parse_config("host=h user=u password=p").unwrap();
        assert!(!describe(&c).contains('p') || !describe(&c).contains("password"));
        assert_eq!(describe(&c), "u@h:5432/u");
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for bad in ["postgres://h:notaport/db", "nonsense=1", "postgres://u@h/db?sslmode=bogus"] {
            assert!(matches!(parse_config(bad), Err(Error::Config(_))), "{bad}");
        }
    }
}
