//! The operator's routes: the live page and the JavaScript client, `/livez`,
//! `/readyz` (`/healthz`), and `/metrics` in Prometheus' text format (the
//! `metrics` crate's Prometheus exporter: counters, gauges, and histograms
//! of delivery latency and catch-up duration).

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pgpubsub::ConnectionState;
use serde_json::{json, Value};

use super::AppState;

/// Histogram buckets, in seconds: from a millisecond to a minute.
const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

const DELIVERY: &str = "pgpubsub_delivery_latency_seconds";
const CATCH_UP: &str = pgpubsub::feed::CATCH_UP_METRIC;

/// The process's metrics recorder, installed once (tests run several
/// gateways in one process: they share it, and each scrape writes its own
/// gateway's counters and gauges before rendering).
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS);
            let recorder =
                builder.map_err(|e| tracing::warn!(error = %e, "metrics: bad buckets")).ok()?.build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %e, "metrics: another recorder is installed; /metrics answers empty");
                return None;
            }
            // Histogram samples are folded into buckets on a render or an
            // upkeep: without scrapes they would pile up.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .map_err(|e| tracing::warn!(error = %e, "metrics: no upkeep thread"))
                .ok()?;
            metrics::describe_histogram!(
                DELIVERY,
                metrics::Unit::Seconds,
                "From a live event's write in the database to its hand-off to the subscribers' queues (once per event)."
            );
            metrics::describe_histogram!(
                CATCH_UP,
                metrics::Unit::Seconds,
                "How long a resuming subscriber took to read the log up to the live events."
            );
            Some(handle)
        })
        .as_ref()
}

/// Installs the recorder (call once at start).
pub fn install_metrics() {
    let _ = prometheus();
}

/// Records a live event's delivery latency, as the hub takes it: now minus
/// its time in the database (foreign notifications have none). Replays are
/// not counted: their age is not a latency.
pub fn observe_delivery(event: &pgpubsub::Event) {
    let Some(at) = event.time.as_deref() else { return };
    let Ok(at) = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339) else { return };
    let seconds = (time::OffsetDateTime::now_utc() - at).as_seconds_f64();
    // Clocks of two machines may disagree by a little: never negative.
    metrics::histogram!(DELIVERY).record(seconds.max(0.0));
}

/// `GET /`: the live page (pick channels, watch events, rate and latency).
#[utoipa::path(get, path = "/", tag = "operate", responses((status = 200, description = "The live page", content_type = "text/html", body = String)))]
pub async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("page.html"))
}

/// `GET /client.js`: the JavaScript client (`clients/js`), for pages that
/// `import { connect } from "/client.js"`.
#[utoipa::path(get, path = "/client.js", tag = "operate", responses((status = 200, description = "The JavaScript client (an ES module)", content_type = "text/javascript", body = String)))]
pub async fn client_js() -> impl IntoResponse {
    let headers = [("content-type", "text/javascript; charset=utf-8"), ("cache-control", "no-cache")];
    (headers, include_str!("../../../../clients/js/src/client.js"))
}

/// `GET /livez`: the process answers.
#[utoipa::path(get, path = "/livez", tag = "operate", responses((status = 200, description = "The process answers", body = Object)))]
pub async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz` (and `/healthz`): 200 while the LISTEN connection is up and
/// the schema is migrated, else 503 with the reason.
#[utoipa::path(get, path = "/readyz", tag = "operate", responses(
    (status = 200, description = "Ready: `{status, listener, reconnects, subscribers, position}`", body = Object),
    (status = 503, description = "Not ready, with the reason", body = Object),
))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let s = state.listener_stats.snapshot();
    let listener = state.listener_state.borrow().clone();
    let listening = match &listener {
        ConnectionState::Listening => "listening".to_string(),
        other => format!("{other:?}"),
    };
    let mut reason = None;
    if !matches!(listener, ConnectionState::Listening) {
        let what = if state.source.is_some() { "the NATS source" } else { "the LISTEN connection" };
        reason = Some(format!("{what} is not up ({listening})"));
    } else {
        let log = state.db.pick();
        let schema = async {
            let client = log.client().await?;
            pgpubsub::migrate::status(&client).await
        };
        let answer = tokio::time::timeout(std::time::Duration::from_secs(3), schema).await;
        if answer.as_ref().map_or(true, |r| r.as_ref().is_err_and(|e| e.sqlstate().is_none())) {
            // Replaced on the next use.
            log.reset().await;
        }
        match answer {
            Ok(Ok(steps)) => {
                if let Some(p) = steps.iter().find(|s| !s.applied && !s.migration.example) {
                    let (version, name) = (p.migration.version, p.migration.name);
                    reason =
                        Some(format!("the schema is not migrated: {version}_{name} is pending (pgpubsub migrate)"));
                }
            }
            Ok(Err(e)) => reason = Some(format!("the database does not answer: {e}")),
            Err(_) => reason = Some("the database did not answer within 3 s".into()),
        }
    }
    let status = if reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
        "reason": reason,
        "listener": listening,
        "reconnects": s.reconnects,
        "subscribers": state.hub.subscribers(),
        "position": state.hub.position().to_string(),
    });
    (status, Json(body))
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operate", responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.listener_stats.snapshot();
    let h = state.hub.stats();
    let up = matches!(&*state.listener_state.borrow(), ConnectionState::Listening);
    let counters: [(&str, &str, u64); 13] = [
        (
            "pgpubsub_rls_statements_total",
            "Statements that decided what a class of subscribers (one role, one set of claims) sees: one per class per batch.",
            state.views.statements(),
        ),
        ("pgpubsub_rls_decided_total", "Row changes decided for some class.", state.views.decided()),
        ("pgpubsub_rls_withheld_total", "Row changes withheld from some class.", state.views.withheld()),
        (
            "pgpubsub_replay_reads_total",
            "Pages of the log read for resuming subscribers (resumes from one position share them).",
            state.replays.reads(),
        ),
        (
            "pgpubsub_replay_shared_total",
            "Resumes that joined a read of the log another resume had started.",
            state.replays.joined(),
        ),
        (
            "pgpubsub_events_in_total",
            "Events received from the source (PostgreSQL, or NATS with --source nats).",
            s.events,
        ),
        ("pgpubsub_deliveries_total", "Events queued to subscribers.", h.deliveries.load(Ordering::Relaxed)),
        ("pgpubsub_dropped_total", "Deliveries dropped for lagging subscribers.", h.dropped.load(Ordering::Relaxed)),
        ("pgpubsub_lag_notices_total", "Lag notices sent.", h.lag_notices.load(Ordering::Relaxed)),
        ("pgpubsub_reconnects_total", "Times the source's connection was replaced.", s.reconnects),
        ("pgpubsub_wakeups_total", "Wake-ups received from writers.", s.wakeups),
        ("pgpubsub_polls_total", "Reads of the event log.", s.polls),
        (
            "pgpubsub_bad_input_total",
            "Malformed, non-JSON, corrupt or oversize notifications.",
            s.malformed + s.not_json + s.corrupt + s.oversize,
        ),
    ];
    let gauges: [(&str, &str, f64); 7] = [
        ("pgpubsub_subscribers", "Subscribers connected.", state.hub.subscribers() as f64),
        (
            "pgpubsub_rls_classes",
            "Classes of subscribers (one role, one set of claims) decided apart.",
            state.views.classes() as f64,
        ),
        (
            "pgpubsub_notify_queue_usage",
            "pg_notification_queue_usage() at the last heartbeat.",
            s.queue_usage_ppm as f64 / 1e6,
        ),
        ("pgpubsub_heartbeat_seconds", "Round trip of the last heartbeat.", s.heartbeat_rtt_us as f64 / 1e6),
        ("pgpubsub_open_connections", "Connections open (capped by --max-connections).", state.places.used() as f64),
        (
            "pgpubsub_listened_channels",
            "Channels LISTENed to for subscribers' foreign notifications.",
            state.listening.held() as f64,
        ),
        (
            "pgpubsub_listener_up",
            "1 while the source (the LISTEN connection, or NATS) is up.",
            if up { 1.0 } else { 0.0 },
        ),
    ];
    for (name, help, value) in counters {
        metrics::describe_counter!(name, help);
        metrics::counter!(name).absolute(value);
    }
    // Connections given up on because their peer fell silent, by how it showed.
    let dead = "pgpubsub_dead_connections_total";
    metrics::describe_counter!(
        dead,
        "Connections dropped as dead: reason=silent, a WebSocket client sent nothing (no pong) for --heartbeat-timeout; reason=write_stalled, a write waited that long for the peer."
    );
    metrics::counter!(dead, "reason" => "silent").absolute(state.heartbeat.silent.load(Ordering::Relaxed));
    metrics::counter!(dead, "reason" => "write_stalled").absolute(state.places.stalled());
    for (name, help, value) in gauges {
        metrics::describe_gauge!(name, help);
        metrics::gauge!(name).set(value);
    }
    super::capture_metrics::record(&state).await;
    let text = prometheus().map(PrometheusHandle::render).unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], text)
}
