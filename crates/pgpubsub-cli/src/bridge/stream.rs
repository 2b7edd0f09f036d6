//! The bridge's stream: created if missing, checked to take the bridge's
//! subjects; and the source id that makes message ids unique across
//! databases.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;

use super::{Ctx, Fatal};

/// The events' identity: `<system_identifier>-<database oid>`. The log's seq
/// is unique within one database, so `<this>:<seq>` names one event for
/// good: the same after a failover to a physical replica (same identifier
/// and oid, same log), never the same for two databases bridged into one
/// stream (where a bare seq would make JetStream drop one database's event
/// as the other's duplicate: a loss).
pub(super) async fn source_id(client: &tokio_postgres::Client) -> String {
    let sql = "SELECT (SELECT system_identifier FROM pg_control_system())::text || '-' \
               || (SELECT oid FROM pg_database WHERE datname = current_database())::text";
    match client.query_one(sql, &[]).await {
        Ok(row) => row.get(0),
        Err(e) => {
            let name = client.query_one("SELECT current_database()::text", &[]).await.map(|r| r.get(0));
            let name: String = name.unwrap_or_else(|_| "pgpubsub".into());
            tracing::warn!(error = %e, source = %name, "cannot read the database's identity; using its name");
            name
        }
    }
}

/// The stream, created if missing; retried while NATS is unreachable.
pub(super) async fn ensure_stream(ctx: &Ctx<'_>) -> anyhow::Result<jetstream::stream::Stream> {
    let args = ctx.args;
    let wanted = jetstream::stream::Config {
        name: args.stream.clone(),
        subjects: vec![format!("{}.>", args.subject_prefix)],
        max_age: args.max_age.unwrap_or_default(),
        max_bytes: args.max_bytes.unwrap_or(-1),
        num_replicas: args.replicas.max(1),
        duplicate_window: args.duplicate_window,
        storage: jetstream::stream::StorageType::File,
        description: Some("pgpubsub bridge: the PostgreSQL event log".into()),
        ..Default::default()
    };
    let mut backoff = pgpubsub::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut stream = loop {
        match ctx.js.get_or_create_stream(wanted.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                let delay = backoff.next_delay();
                if backoff.attempt() == 1 || backoff.attempt() % 20 == 0 {
                    tracing::warn!(error = %e, stream = %args.stream, "cannot open or create the stream; retrying");
                }
                tokio::time::sleep(delay).await;
            }
        }
    };
    let info = stream.info().await.context("reading the stream's configuration")?;
    let every = [format!("{}.>", args.subject_prefix)];
    let subjects: Vec<String> = match args.channels.as_slice() {
        [] => every.to_vec(),
        some => some.iter().map(|c| format!("{}.{c}", args.subject_prefix)).collect(),
    };
    for subject in subjects {
        if !info.config.subjects.iter().any(|pattern| subject_matches(pattern, &subject)) {
            return Err(Fatal(format!(
                "stream {} does not take subject {subject} (its subjects: {:?}); choose another --stream or --subject-prefix",
                args.stream, info.config.subjects
            ))
            .into());
        }
    }
    if info.config.duplicate_window < args.duplicate_window {
        tracing::warn!(stream = %args.stream, has = ?info.config.duplicate_window, wanted = ?args.duplicate_window,
            "the existing stream's duplicate window is shorter than --duplicate-window: events re-sent after it are stored twice");
    }
    Ok(stream)
}

/// Whether a NATS subject pattern (`*` one token, `>` the rest) matches.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("pgpubsub.>", "pgpubsub.orders"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(subject_matches(">", "x.y"));
        assert!(!subject_matches("pgpubsub.>", "pgpubsub"));
        assert!(!subject_matches("other.>", "pgpubsub.orders"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.b", "a.b"));
    }
}
