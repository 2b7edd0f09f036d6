//! The TLS settings of a connection, as libpq names them: `sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`.

use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};

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
