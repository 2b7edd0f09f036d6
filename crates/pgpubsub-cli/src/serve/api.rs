//! The HTTP surface: `fn router(state) -> Router` with its OpenAPI document
//! (both from the same route list, so they cannot disagree), the one error
//! type that maps to status codes and a JSON body, and the subscription
//! request. The handlers are in `stream.rs` (SSE, WebSocket), `writes.rs`
//! (publish, store) and `ops.rs` (page, probes, metrics).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pgpubsub::{store, Channel, Cursor, Filter, Op};
use serde_json::Value;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Claims;
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

/// The body of every refusal.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What was wrong, for a person to read.
    pub error: String,
}

/// Every refusal, as a status and `{"error": "..."}`.
#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed (400).
    BadRequest(String),
    /// No valid token (401).
    Unauthorized(String),
    /// Not served here, or not allowed to this token or origin (403).
    Forbidden(String),
    /// Nothing there (404).
    NotFound(String),
    /// A version precondition failed, or the data conflicts (409).
    Conflict(String),
    /// The body is over the limit (413).
    TooLarge(String),
    /// Over the publish rate (429).
    TooMany(String),
    /// The database cannot do it now (503).
    Unavailable(String),
    /// The gateway is at its connection limit (503).
    Busy(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            ApiError::TooMany(m) => (StatusCode::TOO_MANY_REQUESTS, m),
            ApiError::Unavailable(m) | ApiError::Busy(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
        };
        (status, Json(ErrorBody { error: msg })).into_response()
    }
}

impl ApiError {
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::TooLarge(m)
            | ApiError::TooMany(m)
            | ApiError::Unavailable(m)
            | ApiError::Busy(m) => m,
        }
    }
}

impl From<pgpubsub::Error> for ApiError {
    fn from(e: pgpubsub::Error) -> Self {
        match e {
            pgpubsub::Error::InvalidChannel(c) => ApiError::BadRequest(c.to_string()),
            other => match other.sqlstate() {
                // Bad input is the client's to fix, never a 5xx: SQLSTATE
                // class 22 (data exception: a NUL byte, bad encoding, out of
                // range) and 23 (integrity); uniqueness and exclusion
                // conflicts are 409, as is the store's version check.
                Some(s) if s == store::VERSION_CONFLICT || s == "23505" || s == "23P01" => {
                    ApiError::Conflict(other.to_string())
                }
                Some(s) if s.starts_with("22") || s.starts_with("23") => ApiError::BadRequest(other.to_string()),
                _ => ApiError::Unavailable(other.to_string()),
            },
        }
    }
}

/// What a subscriber asks for: channels, filters, and where to resume.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub channels: Vec<String>,
    pub table: Option<String>,
    #[serde(default)]
    pub ops: Vec<String>,
    /// Column equality: `{"status": "done"}`.
    #[serde(default, rename = "where")]
    pub columns: serde_json::Map<String, Value>,
    pub since: Option<String>,
    /// WebSocket only: the token, when not sent as a header or cookie.
    pub token: Option<String>,
    /// WebSocket only: first answer `{"type": "subscribed", "id": <resume>}`
    /// once subscribed, so a client knows where it stands before any event.
    #[serde(default)]
    pub ack: bool,
}

impl Request {
    /// From `?channel=a&channel=b&table=t&op=INSERT&where=col:value&since=…`.
    pub fn from_query(query: Option<&str>) -> Result<Request, ApiError> {
        let mut r = Request::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*k {
                "channel" => r.channels.extend(v.split(',').map(str::to_string)),
                "table" => r.table = Some(v.into_owned()),
                "op" => r.ops.push(v.into_owned()),
                "where" => {
                    let (col, val) = v
                        .split_once(':')
                        .ok_or_else(|| ApiError::BadRequest(format!("where={v}: expected column:value")))?;
                    // A JSON value when it parses as one ("5", "true", "\"x\""), text otherwise.
                    let val = serde_json::from_str(val).unwrap_or_else(|_| Value::String(val.to_string()));
                    r.columns.insert(col.to_string(), val);
                }
                "since" => r.since = Some(v.into_owned()),
                "token" | "access_token" | "jwt" => {
                    return Err(ApiError::BadRequest(
                        "tokens never travel in the URL (it ends up in logs): use the Authorization header or the pgpubsub_token cookie".into(),
                    ))
                }
                other => return Err(ApiError::BadRequest(format!("unknown parameter {other:?}"))),
            }
        }
        Ok(r)
    }

    /// The filter and resume point, checked against what this server serves.
    pub fn resolve(
        self,
        state: &AppState,
        claims: &Claims,
        last_event_id: Option<&str>,
    ) -> Result<(Filter, Option<Cursor>), ApiError> {
        let mut channels = Vec::new();
        for name in self.channels {
            let c = Channel::new(name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            if !state.served.allows(c.as_str()) {
                return Err(ApiError::Forbidden(format!("channel {c} is not served here")));
            }
            if !claims.can_read(c.as_str()) {
                return Err(ApiError::Forbidden(format!("this token may not read channel {c}")));
            }
            channels.push(c.as_str().to_string());
        }
        if channels.is_empty() {
            // Every channel served that the token may read: all of them when
            // both say "all"; else the plain names of either list.
            let everything = state.served.all() && claims.can_read_all();
            if !everything {
                let names = state.served.names().map(|n| n.iter().map(|c| c.as_str().to_string()).collect());
                let names = names.or_else(|| claims.readable_names()).ok_or_else(|| {
                    ApiError::BadRequest(
                        "name the channels to subscribe to (the channels served or readable are patterns)".into(),
                    )
                })?;
                channels = names.into_iter().filter(|c| state.served.allows(c) && claims.can_read(c)).collect();
                if channels.is_empty() {
                    return Err(ApiError::Forbidden("this token may read none of the served channels".into()));
                }
            }
        }
        let mut ops = Vec::new();
        for op in self.ops {
            let parsed = serde_json::from_value::<Op>(Value::String(op.to_uppercase()))
                .map_err(|_| ApiError::BadRequest(format!("op {op:?}: expected INSERT, UPDATE, DELETE or TRUNCATE")))?;
            ops.push(parsed);
        }
        let since = self.since.as_deref().or(last_event_id).map(str::parse::<Cursor>).transpose();
        let since = since.map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut filter = Filter::channels(channels);
        filter.table = self.table;
        filter.ops = ops;
        filter.columns = self.columns.into_iter().collect();
        Ok((filter, since))
    }
}
