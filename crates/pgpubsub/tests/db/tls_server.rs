//! A PostgreSQL cluster of the test's own that accepts only TLS
//! connections, with certificates made here: a CA, a server certificate for
//! `localhost` only (so `127.0.0.1` is a name mismatch), a client
//! certificate, and a foreign CA that signed none of them. Shared with the
//! CLI's tests (`pgpubsub-cli/tests/it`), which include this file by path.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use crate::cluster::{self, Cluster};

/// A certificate and its key, PEM.
struct Issued {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn make_ca(name: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Issued { cert: params.self_signed(&key).unwrap(), key }
}

/// A leaf certificate with common name `cn` and these DNS names.
fn leaf(by: &Issued, cn: &str, names: &[&str]) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    Issued { cert: params.signed_by(&key, &by.cert, &by.key).unwrap(), key }
}

/// The TLS-only server and the client's files.
pub struct TlsServer {
    pub cluster: Cluster,
    pub ca: PathBuf,
    pub foreign_ca: PathBuf,
    /// A client certificate for user `certuser`, and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate for `certuser` from the foreign CA, and its key.
    pub foreign_cert: PathBuf,
    pub foreign_key: PathBuf,
}

impl TlsServer {
    /// `None` (with the reason printed) when PostgreSQL's server binaries
    /// are not installed.
    pub async fn start() -> Option<TlsServer> {
        if !cluster::available() {
            eprintln!("skipped: no initdb under /usr/lib/postgresql (PostgreSQL server binaries)");
            return None;
        }
        let ca = make_ca("pgpubsub test CA");
        let foreign = make_ca("pgpubsub foreign CA");
        let server = leaf(&ca, "localhost", &["localhost"]);
        let client = leaf(&ca, "certuser", &[]);
        let stranger = leaf(&foreign, "certuser", &[]);
        let ca_pem = ca.cert.pem();
        let (server_pem, server_key) = (server.cert.pem(), server.key.serialize_pem());
        let cluster = tokio::task::spawn_blocking(move || {
            Cluster::start_with(false, |data| {
                write(&data.join("server.crt"), &server_pem);
                write(&data.join("server.key"), &server_key);
                write(&data.join("root.crt"), &ca_pem);
                set_mode(&data.join("server.key"), 0o600);
                let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
                conf.push_str(
                    "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n",
                );
                write(&data.join("postgresql.conf"), &conf);
                write(
                    &data.join("pg_hba.conf"),
                    "local all all trust\n\
                     hostssl all certuser 127.0.0.1/32 cert\n\
                     hostssl all pwuser 127.0.0.1/32 scram-sha-256\n\
                     hostssl all all 127.0.0.1/32 trust\n\
                     hostnossl all all 0.0.0.0/0 reject\n",
                );
            })
        })
        .await
        .unwrap();
        let dir = cluster.dir.join("client");
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, pem: String| {
            let path = dir.join(name);
            write(&path, &pem);
            set_mode(&path, 0o600);
            path
        };
        Some(TlsServer {
            ca: file("ca.pem", ca.cert.pem()),
            foreign_ca: file("foreign-ca.pem", foreign.cert.pem()),
            client_cert: file("client.pem", client.cert.pem()),
            client_key: file("client.key", client.key.serialize_pem()),
            foreign_cert: file("stranger.pem", stranger.cert.pem()),
            foreign_key: file("stranger.key", stranger.key.serialize_pem()),
            cluster,
        })
    }

    /// A URL to `host` (`localhost`, which the certificate names, or
    /// `127.0.0.1`, which it does not) with these query parameters.
    pub fn url(&self, host: &str, params: &str) -> String {
        let sep = if params.is_empty() { "" } else { "?" };
        format!("postgres://postgres@{host}:{}/postgres{sep}{params}", self.cluster.port)
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
