//! The rustls side of the TLS settings (`tls.rs`): which certificates to
//! trust, how much of the server's certificate to check, the client's own.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{RootCert, SslMode, Tls};
use crate::error::{Error, Result};

/// Builds the TLS side of a connection from its settings, reading the files
/// they name (each connection reads them afresh, as libpq does, so renewed
/// certificates are picked up by the next connection).
///
/// # Errors
/// [`Error::Config`] naming the setting or the file that is wrong.
pub(super) fn connector(tls: &Tls) -> Result<MakeRustlsConnect> {
    tls.check()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    if tls.mode == SslMode::Disable {
        // Never used: the driver is told not to use TLS.
        return Ok(MakeRustlsConnect::new(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { provider, chain: None }))
                .with_no_client_auth(),
        ));
    }
    let verifier: Arc<dyn ServerCertVerifier> = match (&tls.root_cert, tls.mode) {
        // Nothing to verify against: libpq's allow, prefer and require check
        // nothing.
        (None, _) => Arc::new(Lenient { provider, chain: None }),
        (Some(root), mode) => {
            let roots = Arc::new(roots(root)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| Error::Config(format!("sslrootcert: {e}")))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                // verify-ca, and (as libpq) allow/prefer/require with a root
                // file: the chain, not the name.
                Arc::new(Lenient { provider, chain: Some(webpki) })
            }
        }
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| Error::Config(format!("sslkey {}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| Error::Config(format!("sslcert/sslkey: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    // As libpq 17; needed for sslnegotiation=direct, ignored by older servers.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

/// The certificates in a PEM file, at least one.
fn certs(path: &Path, param: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |e: &dyn std::fmt::Display| Error::Config(format!("{param} {}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The trusted roots: a file's CA certificates, or the system's.
fn roots(root: &RootCert) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            for cert in certs(path, "sslrootcert")? {
                store.add(cert).map_err(|e| Error::Config(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(Error::Config(format!(
                    "sslrootcert=system: no trusted root certificates found on this system{}{}",
                    if why.is_empty() { "" } else { ": " },
                    why.join("; ")
                )));
            }
        }
    }
    Ok(store)
}

/// What libpq checks short of verify-full, which rustls has no switch for
/// (it always checks the name):
/// - with a `chain` (verify-ca, and allow/prefer/require with a root file):
///   the whole of webpki's verification but the name check. A certificate
///   for any name passes as long as the chain leads to a trusted root;
///   webpki checks the chain (validity dates included) before the name, so
///   a name error means the chain was good;
/// - without (prefer and require without a root): any certificate, as
///   libpq encrypts without checking who is at the other end.
///
/// Either way the handshake's signatures are checked against the
/// certificate presented.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
