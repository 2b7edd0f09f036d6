//! One active bridge per name: a session-level advisory lock, taken with
//! `pg_try_advisory_lock(hashtext('pgpubsub.bridge'), hashtext(name))` (the
//! two-int4 form: the one-bigint form is used elsewhere) on a connection of
//! its own. The lock lives as long as that session, so a bridge that dies,
//! is killed or loses its connection releases it, and a waiting bridge,
//! polling every `poll`, takes over.
//!
//! While active, a watchdog proves the session alive every `poll`; when it
//! is not (closed, or a probe not answered within `deaf_after`), the lock
//! may already belong to another bridge: [`Lock::lost`] resolves and the
//! bridge stops copying. A session cut silently (no FIN, no RST) is only
//! released by the server when its TCP keepalives give up; until then no
//! standby can take over.

use std::sync::Arc;
use std::time::Duration;

use pgpubsub::db::Config;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::metrics::BridgeStats;

const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtext('pgpubsub.bridge'), hashtext($1))";

/// Who holds the lock of `$1` in this database: its `application_name`,
/// pid and address.
const HOLDER: &str = "SELECT coalesce(nullif(a.application_name, ''), '?') || ' (backend pid ' || a.pid \
     || coalesce(', from ' || host(a.client_addr), '') || ')' \
     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND l.classid = hashtext('pgpubsub.bridge')::oid AND l.objid = hashtext($1)::oid";

/// The lock, held: dropping it closes the session, which releases it.
pub struct Lock {
    client: Arc<Client>,
    lost: watch::Receiver<bool>,
    watchdog: JoinHandle<()>,
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl Lock {
    /// Waits until this process holds the lock for `name`; says who holds
    /// it meanwhile (once, and again when that changes). `me` becomes the
    /// session's `application_name`, so other bridges can name us.
    pub async fn acquire(
        config: &Config,
        name: &str,
        me: &str,
        poll: Duration,
        deaf_after: Duration,
        stats: &BridgeStats,
    ) -> Lock {
        let mut config = pgpubsub::db::tuned(config);
        config.pg_mut().application_name(me);
        let mut client: Option<Client> = None;
        let mut holder_seen: Option<String> = None;
        let mut connect_failures = 0u32;
        loop {
            if client.as_ref().is_none_or(Client::is_closed) {
                match tokio::time::timeout(deaf_after, pgpubsub::db::connect(&config)).await {
                    Ok(Ok(c)) => {
                        if connect_failures > 0 {
                            tracing::info!("lock connection back");
                        }
                        connect_failures = 0;
                        client = Some(c);
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("not connected within {deaf_after:?}"),
                        };
                        if connect_failures == 0 {
                            tracing::warn!(%error, "cannot reach PostgreSQL for the bridge lock; retrying");
                        }
                        connect_failures += 1;
                        tokio::time::sleep(poll.max(Duration::from_secs(1))).await;
                        continue;
                    }
                }
            }
            let Some(c) = client.as_ref() else { continue };
            match tokio::time::timeout(deaf_after, c.query_one(TRY_LOCK, &[&name])).await {
                Ok(Ok(row)) if row.get::<_, bool>(0) => break,
                Ok(Ok(_)) => {
                    let holder = match c.query_opt(HOLDER, &[&name]).await {
                        Ok(Some(row)) => row.get::<_, String>(0),
                        _ => "another session".to_string(),
                    };
                    if holder_seen.as_deref() != Some(holder.as_str()) {
                        tracing::info!(name, active = %holder, "standby: another bridge is active; waiting for its lock");
                        stats.set_holder(&holder);
                        holder_seen = Some(holder);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not try the bridge lock; retrying");
                    client = None;
                }
                Err(_) => {
                    tracing::warn!("the bridge lock did not answer within {deaf_after:?}; reconnecting");
                    client = None;
                }
            }
            tokio::time::sleep(poll).await;
        }
        let client = Arc::new(client.expect("connected when the lock was taken"));
        let (lost_tx, lost) = watch::channel(false);
        let c = client.clone();
        let watchdog = tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let alive = !c.is_closed()
                    && matches!(tokio::time::timeout(deaf_after, c.simple_query("SELECT 1")).await, Ok(Ok(_)));
                if !alive {
                    let _ = lost_tx.send(true);
                    return;
                }
            }
        });
        Lock { client, lost, watchdog }
    }

    /// Resolves once the lock's session is gone (or deaf): the lock may be
    /// another bridge's by now.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }

    /// Whether the lock's session is known to be gone.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow() || self.client.is_closed()
    }

    /// The lock's session, for a statement or two.
    pub fn client(&self) -> &Client {
        &self.client
    }
}
