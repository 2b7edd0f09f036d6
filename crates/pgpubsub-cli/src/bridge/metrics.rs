//! The bridge's counters and its optional `/metrics` endpoint (Prometheus
//! text format), which also says whether this bridge is the active one and,
//! when it is not, who is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use pgpubsub::Stats;

/// Counters of one bridge process, across its active periods.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Events stored in the stream (acknowledged, not duplicates).
    pub published: AtomicU64,
    /// Events JetStream acknowledged as duplicates (re-sent after a crash or
    /// a failure, dropped by `Nats-Msg-Id`).
    pub duplicates: AtomicU64,
    /// Times publishing failed and the unacknowledged events were sent again.
    pub retries: AtomicU64,
    /// Foreign notifications (not in the log), not copied.
    pub skipped_foreign: AtomicU64,
    /// Events larger than the server's max_payload, skipped (only with
    /// `--skip-oversize`).
    pub skipped_oversize: AtomicU64,
    /// Times the log had been pruned past the bridge's cursor.
    pub resyncs: AtomicU64,
    /// Cursor stores.
    pub saves: AtomicU64,
    /// Times this process became the active bridge.
    pub activations: AtomicU64,
    /// Gauge: 1 while this process holds the lock and copies.
    pub active: AtomicU64,
    /// Gauge: events published and not yet acknowledged.
    pub in_flight: AtomicU64,
    /// Gauge: seq of the last event acknowledged.
    pub last_seq: AtomicU64,
    /// Who holds the lock, as its `application_name` says (this process
    /// when active).
    pub holder: Mutex<String>,
    /// The listener of the current active period, for its counters.
    pub listener: Mutex<Option<Arc<Stats>>>,
}

impl BridgeStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    pub fn set_holder(&self, holder: &str) {
        if let Ok(mut h) = self.holder.lock() {
            holder.clone_into(&mut h);
        }
    }

    /// The Prometheus text of every counter.
    pub fn render(&self, name: &str) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let listener = self.listener.lock().ok().and_then(|l| l.as_ref().map(|s| s.snapshot())).unwrap_or_default();
        let rows: [(&str, &str, &str, f64); 13] = [
            ("pgpubsub_bridge_active", "gauge", "1 while this process is the active bridge.", get(&self.active)),
            ("pgpubsub_bridge_published_total", "counter", "Events stored in JetStream.", get(&self.published)),
            (
                "pgpubsub_bridge_duplicates_total",
                "counter",
                "Re-sent events JetStream dropped as duplicates.",
                get(&self.duplicates),
            ),
            ("pgpubsub_bridge_retries_total", "counter", "Publish failures retried.", get(&self.retries)),
            (
                "pgpubsub_bridge_skipped_foreign_total",
                "counter",
                "Foreign notifications (not logged) not copied.",
                get(&self.skipped_foreign),
            ),
            (
                "pgpubsub_bridge_skipped_oversize_total",
                "counter",
                "Events over the server's max_payload skipped (--skip-oversize).",
                get(&self.skipped_oversize),
            ),
            (
                "pgpubsub_bridge_resyncs_total",
                "counter",
                "Times events were pruned from the log before they were copied.",
                get(&self.resyncs),
            ),
            ("pgpubsub_bridge_cursor_saves_total", "counter", "Cursor stores.", get(&self.saves)),
            (
                "pgpubsub_bridge_activations_total",
                "counter",
                "Times this process became the active bridge.",
                get(&self.activations),
            ),
            ("pgpubsub_bridge_in_flight", "gauge", "Events published, not yet acknowledged.", get(&self.in_flight)),
            ("pgpubsub_bridge_last_seq", "gauge", "Log seq of the last acknowledged event.", get(&self.last_seq)),
            ("pgpubsub_events_in_total", "counter", "Events received from PostgreSQL.", listener.events as f64),
            (
                "pgpubsub_reconnects_total",
                "counter",
                "Times the LISTEN connection was replaced.",
                listener.reconnects as f64,
            ),
        ];
        let mut text = String::new();
        for (metric, kind, help, value) in rows {
            text.push_str(&format!("# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {value}\n"));
        }
        let holder = self.holder.lock().map(|h| h.clone()).unwrap_or_default();
        text.push_str(&format!(
            "# HELP pgpubsub_bridge_holder Who holds the bridge's lock (its application_name).\n\
             # TYPE pgpubsub_bridge_holder gauge\npgpubsub_bridge_holder{{name=\"{}\",holder=\"{}\"}} 1\n",
            label(name),
            label(&holder)
        ));
        text
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves `GET /metrics` on `bind` until the process ends; logs the address.
pub async fn serve(bind: &str, name: String, stats: Arc<BridgeStats>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route("/metrics", get(metrics)).with_state((Arc::new(name), stats));
    tracing::info!("metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    });
    Ok(())
}

async fn metrics(State((name, stats)): State<(Arc<String>, Arc<BridgeStats>)>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], stats.render(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_holder_escaped() {
        let s = BridgeStats::default();
        s.set_holder("pgpubsub bridge \"x\" h:1");
        BridgeStats::set(&s.active, 1);
        let text = s.render("n");
        assert!(text.contains("pgpubsub_bridge_active 1\n"), "{text}");
        assert!(text.contains(r#"pgpubsub_bridge_holder{name="n",holder="pgpubsub bridge \"x\" h:1"} 1"#), "{text}");
    }
}
