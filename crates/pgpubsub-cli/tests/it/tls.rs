//! TLS to PostgreSQL, against a cluster of the test's own that accepts only
//! TLS connections, with certificates made here: a CA, a server certificate
//! for `localhost` only (so `127.0.0.1` is a name mismatch), a client
//! certificate, and a foreign CA that signed none of them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use pgpubsub::db::Config;
use pgpubsub::{Channel, Error, Listener, ListenerOptions};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use crate::cluster::{self, Cluster};
use crate::common::{self, next, WAIT};

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
struct TlsServer {
    cluster: Cluster,
    ca: PathBuf,
    foreign_ca: PathBuf,
    /// A client certificate for user `certuser`, and its key.
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A client certificate for `certuser` from the foreign CA, and its key.
    foreign_cert: PathBuf,
    foreign_key: PathBuf,
}

impl TlsServer {
    /// `None` (with the reason printed) when PostgreSQL's server binaries
    /// are not installed.
    async fn start() -> Option<TlsServer> {
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
    fn url(&self, host: &str, params: &str) -> String {
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

/// Connects with `url`; `Ok` holds whether the connection is encrypted, as
/// the server sees it.
async fn try_connect(url: &str) -> Result<bool, Error> {
    let config: Config = url.parse()?;
    let client = tokio::time::timeout(WAIT, pgpubsub::db::connect(&config)).await.expect("connect timed out")?;
    let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
    Ok(row.get(0))
}

async fn connects_with_tls(url: &str) {
    match try_connect(url).await {
        Ok(ssl) => assert!(ssl, "{url}: connected without TLS"),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The connection is refused and the error says `expect`.
async fn refused(url: &str, expect: &[&str]) -> String {
    let err = match try_connect(url).await {
        Ok(_) => panic!("{url}: connected"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Connect { .. }), "{url}: {err:?}");
    let text = err.to_string();
    for e in expect {
        assert!(text.contains(e), "{url}: expected {e:?} in: {text}");
    }
    text
}

#[tokio::test]
async fn tls_modes_against_a_tls_only_server() {
    let Some(s) = TlsServer::start().await else { return };
    let (ca, foreign) = (s.ca.display(), s.foreign_ca.display());

    // No verification: any certificate, any name.
    connects_with_tls(&s.url("127.0.0.1", "sslmode=require")).await;
    connects_with_tls(&s.url("127.0.0.1", "")).await; // prefer, the default
    connects_with_tls(&s.url("127.0.0.1", "sslmode=allow")).await; // refused without TLS, so with
    refused(&s.url("127.0.0.1", "sslmode=disable"), &["pg_hba.conf", "no encryption"]).await;

    // verify-full: the chain and the name.
    connects_with_tls(&s.url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    refused(
        &s.url("localhost", &format!("sslmode=verify-full&sslrootcert={foreign}")),
        &["cannot connect to postgres@localhost", "invalid peer certificate", "UnknownIssuer"],
    )
    .await;
    refused(
        &s.url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")),
        &["invalid peer certificate", "not valid for name \"127.0.0.1\""],
    )
    .await;

    // verify-ca: the chain, any name.
    connects_with_tls(&s.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await;
    refused(&s.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={foreign}")), &["UnknownIssuer"]).await;

    // require (and prefer) with a root file verify the chain, as libpq.
    connects_with_tls(&s.url("127.0.0.1", &format!("sslmode=require&sslrootcert={ca}"))).await;
    refused(&s.url("127.0.0.1", &format!("sslmode=require&sslrootcert={foreign}")), &["UnknownIssuer"]).await;
    refused(&s.url("127.0.0.1", &format!("sslrootcert={foreign}")), &["UnknownIssuer"]).await;

    // The key=value form, a quoted path.
    let kv = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{ca}'",
        s.cluster.port
    );
    connects_with_tls(&kv).await;

    // A password over TLS, bound to the channel (SCRAM-SHA-256-PLUS).
    let admin = pgpubsub::db::connect(&s.url("127.0.0.1", "sslmode=require").parse().unwrap()).await.unwrap();
    admin.batch_execute("CREATE ROLE pwuser LOGIN PASSWORD 'pw s3cret'").await.unwrap();
    let pw = format!(
        "postgres://pwuser:pw%20s3cret@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca}&channel_binding=require",
        s.cluster.port
    );
    connects_with_tls(&pw).await;
    let wrong = pw.replace("s3cret", "wrong");
    let text = refused(&wrong, &["password authentication failed"]).await;
    assert!(!text.contains("wrong"), "{text}");

    // A root file that is not there is a configuration error naming it.
    let missing = s.url("localhost", "sslmode=verify-full&sslrootcert=/no/such/ca.pem");
    let err = missing.parse::<Config>().unwrap_err();
    assert!(matches!(err, Error::Config(_)) && err.to_string().contains("/no/such/ca.pem"), "{err}");
}

#[tokio::test]
async fn client_certificates() {
    let Some(s) = TlsServer::start().await else { return };
    let admin = pgpubsub::db::connect(&s.url("127.0.0.1", "sslmode=require").parse().unwrap()).await.unwrap();
    admin.batch_execute("CREATE ROLE certuser LOGIN").await.unwrap();
    let base = format!(
        "postgres://certuser@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        s.cluster.port,
        s.ca.display()
    );

    let with_cert = format!("{base}&sslcert={}&sslkey={}", s.client_cert.display(), s.client_key.display());
    let client = pgpubsub::db::connect(&with_cert.parse().unwrap()).await.unwrap();
    let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "certuser");

    refused(&base, &["certificate"]).await;
    // The server does not trust the foreign CA's certificate.
    let stranger = format!("{base}&sslcert={}&sslkey={}", s.foreign_cert.display(), s.foreign_key.display());
    assert!(try_connect(&stranger).await.is_err());
}

#[tokio::test]
async fn a_listener_over_tls() {
    let Some(s) = TlsServer::start().await else { return };
    let config: Config =
        s.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", s.ca.display())).parse().unwrap();
    let mut client = pgpubsub::db::connect(&config).await.unwrap();
    pgpubsub::migrate::up(&mut client, false).await.unwrap();
    let ch = Channel::new("tls_events").unwrap();
    let mut listener = Listener::connect(&config, &[ch.clone()], ListenerOptions::default()).await.unwrap();
    let big = "x".repeat(20_000); // over the notification limit: chunked
    for payload in ["over TLS", big.as_str()] {
        pgpubsub::publish(&client, &ch, payload).await.unwrap();
        assert_eq!(next(&mut listener).await.message().unwrap().payload, payload);
    }
    // Its connections are encrypted.
    let plain: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE NOT ssl AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);
}

/// The binary names the certificate problem once, and works with the right CA.
#[tokio::test]
async fn the_cli_over_tls() {
    let Some(s) = TlsServer::start().await else { return };
    let run = |url: String| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgpubsub"));
        for var in ["PUB_SUB_CHANNEL", "DEBUG", "RUST_LOG"] {
            cmd.env_remove(var);
        }
        let dir = std::env::temp_dir().join(common::unique("pgpubsub_tls_cli"));
        std::fs::create_dir_all(&dir).unwrap();
        cmd.env("DATABASE_URL", url).current_dir(&dir).args(["migrate"]);
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if rx.recv_timeout(WAIT).is_err() {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = tx.send(());
        let _ = std::fs::remove_dir_all(&dir);
        out
    };
    let bad = s.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", s.foreign_ca.display()));
    let out = tokio::task::spawn_blocking(move || run(bad)).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches("UnknownIssuer").count(), 1, "{err}");
    let good = s.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", s.ca.display()));
    let out = tokio::task::spawn_blocking(move || run(good)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
