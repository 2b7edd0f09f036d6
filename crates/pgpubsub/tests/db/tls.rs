//! TLS to PostgreSQL, against a cluster of the test's own that accepts only
//! TLS connections (see `tls_server`): the sslmodes, client certificates, a
//! listener over TLS.

use pgpubsub::db::Config;
use pgpubsub::{Channel, Error, Listener, ListenerOptions};

use crate::common::{next, WAIT};
use crate::tls_server::TlsServer;

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
