//! The HTTP surface: `fn router(state) -> Router` with its OpenAPI document,
//! both from the same route list, so they cannot disagree. The handlers are
//! in `stream.rs` (SSE, WebSocket), `writes.rs` (publish, store) and
//! `ops.rs` (page, probes, metrics); their error type is `error.rs`'s, the
//! subscription request `request.rs`'s.

use axum::routing::get;
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ops, stream, writes, AppState};

/// The routes, ready to serve, `/openapi.json` included.
pub fn router(state: AppState) -> Router {
    let cors = state.origins.cors();
    let (router, doc) = documented();
    let doc = doc.to_pretty_json().unwrap_or_default();
    router
        // An alias of /readyz, for probes configured before it existed.
        .route("/healthz", get(ops::readyz))
        .route("/openapi.json", get(move || async move { ([("content-type", "application/json")], doc) }))
        .layer(cors)
        .with_state(state)
}

/// The documented routes and the document, from one list.
pub fn documented() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ops::page))
        .routes(routes!(ops::client_js))
        .routes(routes!(stream::sse))
        .routes(routes!(stream::ws))
        .routes(routes!(writes::publish))
        .routes(routes!(writes::store_get, writes::store_put, writes::store_delete))
        .routes(routes!(writes::store_history))
        .routes(routes!(ops::livez))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    (router, doc)
}

/// The document's frame; the paths come from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "pgpubsub gateway",
        description = "Row changes and messages of PostgreSQL over Server-Sent Events and WebSocket, \
publishing, the event-sourced store, and the operator's probes. With authentication on, a JWT \
goes in `Authorization: Bearer`, the `pgpubsub_token` cookie (trusted origins only) or a \
WebSocket's first message; its `read` and `write` claims list the channels (patterns) allowed.",
        license(name = "MIT OR Apache-2.0")
    ),
    tags(
        (name = "subscribe", description = "Live events, resumable from the log"),
        (name = "publish", description = "Messages into the log"),
        (name = "store", description = "The event-sourced key/value store"),
        (name = "operate", description = "Probes, metrics, the live page")
    )
)]
struct ApiDoc;
