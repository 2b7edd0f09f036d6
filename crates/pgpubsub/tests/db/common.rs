//! Test support: a fresh database per test, unique channel names, and waits
//! that always end. Shared with the CLI's tests, which include it by path.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgpubsub::db::Config;
use pgpubsub::{Channel, Event, Listener, ListenerOptions};
use tokio_postgres::Client;

/// The server under test: `DATABASE_URL`, as the README says (each test
/// makes and drops a database of its own there).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The longest any test waits for one thing.
pub const WAIT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A unique channel.
pub fn channel(prefix: &str) -> Channel {
    Channel::new(unique(prefix)).unwrap()
}

/// A database of the test's own, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    /// Its URL, for the binary: used by the CLI's tests only.
    #[allow(dead_code)]
    pub url: String,
    pub config: Config,
}

impl TestDb {
    /// A new database with the pubsub schema applied.
    pub async fn new() -> TestDb {
        let db = TestDb::bare().await;
        let mut client = db.client().await;
        pgpubsub::migrate::up(&mut client, false).await.unwrap();
        db
    }

    /// A new, empty database.
    pub async fn bare() -> TestDb {
        init_logs();
        let name = unique("pgps_test");
        let admin = pgpubsub::db::connect(&admin_url().parse().unwrap()).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let mut config: Config = admin_url().parse().unwrap();
        config.pg_mut().dbname(&name);
        let url = with_dbname(&admin_url(), &name);
        TestDb { name, url, config }
    }

    /// A statement connection.
    pub async fn client(&self) -> Client {
        pgpubsub::db::connect(&self.config).await.unwrap()
    }

    /// A listener on `channels` with default options.
    pub async fn listen(&self, channels: &[Channel]) -> Listener {
        self.listen_with(channels, ListenerOptions::default()).await
    }

    /// A listener with options.
    pub async fn listen_with(&self, channels: &[Channel], options: ListenerOptions) -> Listener {
        Listener::connect(&self.config, channels, options).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Async drop is not a thing: a short-lived runtime on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(admin) = pgpubsub::db::connect(&admin_url().parse().unwrap()).await {
                    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}

/// Library logs in the test output (shown for failing tests), filtered by
/// RUST_LOG (default: pgpubsub at debug).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,pgpubsub=debug"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().with_ansi(false).try_init();
    });
}

/// The admin URL with another database name.
fn with_dbname(url: &str, name: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, last)) if !base.ends_with('/') => {
            let query = last.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
            format!("{base}/{name}{query}")
        }
        _ => format!("{url}/{name}"),
    }
}

/// The next event, failing the test after [`WAIT`].
pub async fn next(listener: &mut Listener) -> Event {
    match tokio::time::timeout(WAIT, listener.recv()).await {
        Ok(Some(Ok(e))) => e,
        Ok(Some(Err(e))) => panic!("listener error: {e}"),
        Ok(None) => panic!("listener ended"),
        Err(_) => panic!("no event within {WAIT:?}; stats: {:?}", listener.stats().snapshot()),
    }
}

/// Waits until `check` holds on the listener's stats.
pub async fn until_stats(listener: &Listener, check: impl Fn(&pgpubsub::StatsSnapshot) -> bool) {
    let stats = listener.stats();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check(&stats.snapshot()) {
        assert!(tokio::time::Instant::now() < deadline, "stats never matched: {:?}", stats.snapshot());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a raw notification, as a foreign trigger would.
pub async fn raw_notify(client: &Client, channel: &Channel, payload: &str) {
    client.execute("SELECT pg_notify($1, $2)", &[&channel.as_str(), &payload]).await.unwrap();
}

/// A watched table `w(writer, n, pad)` and its channel (named from
/// `prefix`): what the fault tests' writers fill.
pub async fn workload_table(config: &pgpubsub::db::Config, prefix: &str) -> Channel {
    let client = pgpubsub::db::connect(config).await.unwrap();
    client.batch_execute("CREATE TABLE w (writer int, n int, pad text, PRIMARY KEY (writer, n))").await.unwrap();
    let ch = channel(prefix);
    pgpubsub::watch(&client, "w", Some(&ch)).await.unwrap();
    ch
}

/// One writer `id` of `w`: rows n = 0..count, `batch` rows per transaction
/// (one multi-row INSERT, in n order), `pause` apart; every `big_every`-th
/// row (0: none) `big_bytes` long, so that it travels large. Survives its
/// connection failing: reconnects and retries the same rows (a retry of
/// rows that did commit hits the primary key: done).
pub async fn write_rows(config: Config, id: i32, count: i32, batch: i32, pause: Duration, big: (i32, i32)) {
    let (big_every, big_bytes) = big;
    let insert = "INSERT INTO w SELECT $1, g, CASE WHEN $4 > 0 AND g % $4 = 0 THEN repeat('x', $5) ELSE '' END \
                  FROM generate_series($2::int, $3::int) g ORDER BY g";
    let mut client: Option<Client> = None;
    let mut n = 0;
    while n < count {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                client = pgpubsub::db::connect(&config).await.ok();
                if client.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let last = (n + batch).min(count) - 1;
        match c.execute(insert, &[&id, &n, &last, &big_every, &big_bytes]).await {
            Ok(_) => n = last + 1,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => n = last + 1,
            Err(_) => {
                client = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Publishes `marker` through the WAL on `channel` and waits until the
/// capturer has put it in the log: everything committed before it is there
/// by then (the capturer appends in commit order).
#[allow(dead_code)]
pub async fn wal_fence(client: &Client, channel: &Channel, marker: &str) {
    pgpubsub::watch::publish_wal(client, channel, marker).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pubsub.events WHERE channel = $1 AND body::json->>'payload' = $2",
                &[&channel.as_str(), &marker],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the fence {marker} never reached the log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (rows, distinct (writer, n) rows, in commit order) of the row changes
/// captured on `channel`: every change once, and seq order = the order of
/// (source LSN, index).
#[allow(dead_code)]
pub async fn captured_once_in_order(client: &Client, channel: &Channel) -> (i64, i64, bool) {
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (body::json->'new'->>'writer', body::json->'new'->>'n')),
                    coalesce(bool_and(ok), true)
             FROM (SELECT body, (source_lsn, (body::json->>'index')::int)
                              > lag((source_lsn, (body::json->>'index')::int)) OVER (ORDER BY seq)
                              IS NOT FALSE AS ok
                   FROM pubsub.events WHERE channel = $1 AND body::json->>'kind' = 'change') x",
            &[&channel.as_str()],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Fills the log, empties it and lets VACUUM truncate it: the state in
/// which a plan made of a read of the log was a scan of the whole table.
#[allow(dead_code)]
pub async fn emptied_log(client: &Client, channel: &Channel) {
    let sql = "SELECT count(pubsub.publish($1, 'old ' || i || repeat('x', 200))) FROM generate_series(1, 200) i";
    client.execute(sql, &[&channel.as_str()]).await.unwrap();
    client.batch_execute("DELETE FROM pubsub.events").await.unwrap();
    client.batch_execute("VACUUM pubsub.events").await.unwrap();
    let pages: i32 = client
        .query_one("SELECT relpages FROM pg_class WHERE oid = 'pubsub.events'::regclass", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pages, 0, "VACUUM truncated the emptied log (what the planner then sees)");
}

/// Whole-table scans of the log and of `pubsub.retention`, as the
/// statistics count them. Every read of the log scans `pubsub.retention`
/// (one row) whatever its plan, and a backend reports a statement's scans
/// of both tables at once: so once `n` more retention scans are counted,
/// the log's scans by those reads are too.
#[allow(dead_code)]
pub struct LogScans {
    events: i64,
    retention: i64,
}

#[allow(dead_code)]
impl LogScans {
    /// The counts now, this session's own scans included.
    pub async fn take(client: &Client) -> LogScans {
        client.batch_execute("SELECT pg_stat_force_next_flush()").await.unwrap();
        client.batch_execute("SELECT 1").await.unwrap();
        LogScans { events: seq_scans(client, "events").await, retention: seq_scans(client, "retention").await }
    }

    /// Waits until `reads` more reads of the log are counted; returns how
    /// many whole-log scans were counted since `self`.
    pub async fn whole_log_scans_after(&self, client: &Client, reads: i64) -> i64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        while seq_scans(client, "retention").await - self.retention < reads {
            assert!(tokio::time::Instant::now() < deadline, "the reads never reached the statistics");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seq_scans(client, "events").await - self.events
    }
}

#[allow(dead_code)]
async fn seq_scans(client: &Client, table: &str) -> i64 {
    client
        .query_one("SELECT seq_scan FROM pg_stat_user_tables WHERE schemaname = 'pubsub' AND relname = $1", &[&table])
        .await
        .unwrap()
        .get(0)
}
