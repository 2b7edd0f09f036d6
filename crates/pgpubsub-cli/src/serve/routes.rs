//! The HTTP surface: `fn router(state) -> Router`, one handler per route,
//! and the one error type that maps to status codes and a JSON body.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use pgpubsub::{store, Channel, ConnectionState, Cursor, Filter, Op};
use serde_json::{json, Value};

use super::auth::{self, Claims};
use super::feed::{Feed, Item};
use super::AppState;

/// The routes, ready to serve (tests bind it to port 0 the same way).
pub fn router(state: AppState) -> Router {
    let cors = state.origins.cors();
    Router::new()
        .route("/", get(page))
        .route("/client.js", get(client_js))
        .route("/events", get(sse))
        .route("/ws", get(ws))
        .route("/publish/{channel}", post(publish))
        .route("/store/{bucket}/{id}", get(store_get).put(store_put).delete(store_delete))
        .route("/store/{bucket}/{id}/history", get(store_history))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(cors)
        .with_state(state)
}

/// The gateway's renderings of an event, each kept in a frame slot of the
/// event (`pgpubsub::hub::Shared::frame`) and shared by every subscriber.
#[derive(Clone, Copy)]
enum Transport {
    /// A WebSocket text frame.
    WebSocket = 0,
    /// A Server-Sent Events record.
    EventStream = 1,
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
        (status, Json(json!({ "error": msg }))).into_response()
    }
}

impl ApiError {
    fn message(&self) -> &str {
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
    channels: Vec<String>,
    table: Option<String>,
    #[serde(default)]
    ops: Vec<String>,
    /// Column equality: `{"status": "done"}`.
    #[serde(default, rename = "where")]
    columns: serde_json::Map<String, Value>,
    since: Option<String>,
    /// WebSocket only: the token, when not sent as a header or cookie.
    token: Option<String>,
    /// WebSocket only: first answer `{"type": "subscribed", "id": <resume>}`
    /// once subscribed, so a client knows where it stands before any event.
    #[serde(default)]
    ack: bool,
}

impl Request {
    /// From `?channel=a&channel=b&table=t&op=INSERT&where=col:value&since=…`.
    fn from_query(query: Option<&str>) -> Result<Request, ApiError> {
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
    fn resolve(
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
        state.ensure_listening(channels.iter().map(String::as_str));
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

/// `GET /events`: Server-Sent Events. Each event's id is its resume
/// position, so a browser's EventSource resumes by itself (`Last-Event-ID`).
/// A subscriber that falls behind gets `event: lagged` and the stream ends:
/// reconnecting resumes from the log. Each event's record is rendered once
/// and shared by every subscriber's stream.
async fn sse(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let request = Request::from_query(query.as_deref())?;
    let claims = state.auth.check(auth::token_from(&headers, &state.origins)?.as_deref())?;
    let (filter, since) = request.resolve(&state, &claims, last)?;
    let expires = expiry(&claims);
    let feed = Feed::new(state, filter, since).await?;
    let start = feed.position();
    let record = |event: &str, data: &str, id: Option<Cursor>| {
        let id = id.map(|c| format!("id: {c}\n")).unwrap_or_default();
        Bytes::from(format!("{id}event: {event}\ndata: {data}\n\n"))
    };
    // First, how soon a browser should reconnect after a drop, and where
    // this subscriber stands before any event (an id alone is no event).
    let hello = futures_util::stream::once(async move {
        Ok::<_, Infallible>(Bytes::from(format!("retry: 1000\nid: {start}\n: pgpubsub\n\n")))
    });
    let events = futures_util::stream::unfold(Some(feed), move |feed| async move {
        let mut feed = feed?;
        // Feed::next is cancel-safe: the keep-alive may interrupt it.
        let next = tokio::select! {
            next = feed.next() => next,
            // A comment now and then keeps proxies from closing an idle stream.
            () = tokio::time::sleep(std::time::Duration::from_secs(15)) => {
                return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), Some(feed)));
            }
            () = tokio::time::sleep_until(expires) => {
                let data = json!({"error": "the token expired"}).to_string();
                return Some((Ok(record("expired", &data, None)), None));
            }
        };
        let (bytes, go_on) = match next {
            Ok(Some(Item::Event { shared, .. })) => {
                let frame = shared.frame(Transport::EventStream as usize, |s| {
                    record(s.event.kind(), s.event.json(), Some(s.position))
                });
                (frame, true)
            }
            Ok(Some(Item::Resync { cursor, pruned })) => {
                let data = json!({"cursor": cursor.to_string(), "pruned": pruned.to_string()}).to_string();
                (record("resync", &data, None), true)
            }
            Ok(Some(Item::Lagged { missed, position })) => {
                let data = json!({"missed": missed, "resume": position.to_string()}).to_string();
                (record("lagged", &data, Some(position)), false)
            }
            Ok(None) => return None,
            Err(e) => (record("error", &json!({"error": e.to_string()}).to_string(), None), false),
        };
        Some((Ok(bytes), go_on.then_some(feed)))
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(axum::body::Body::from_stream(hello.chain(events)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// `GET /`: the live page (pick channels, watch events, rate and latency).
async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("page.html"))
}

/// `GET /client.js`: the JavaScript client (`clients/js`), for pages that
/// `import { connect } from "/client.js"`.
async fn client_js() -> impl IntoResponse {
    let headers = [("content-type", "text/javascript; charset=utf-8"), ("cache-control", "no-cache")];
    (headers, include_str!("../../../../clients/js/src/client.js"))
}

/// `GET /ws`: the client's first message is the request as JSON
/// (`{"channels": [...], "table", "ops", "where", "since", "ack"}`); then each event
/// comes as `{"type": "event", "id": "<resume>", "event": {...}}`. A
/// subscriber that falls behind gets `{"type": "lagged", ...}` and close code
/// 4000; a bad request gets `{"type": "error", ...}` and close code 4400.
async fn ws(State(state): State<AppState>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Response {
    // A token in a header or cookie is checked before the upgrade; without
    // one, the first message must carry it. A cookie from an origin not
    // trusted refuses the handshake (403): a foreign page must not read
    // with its visitor's cookie.
    let early = match auth::token_from(&headers, &state.origins) {
        Ok(Some(t)) => match state.auth.check(Some(&t)) {
            Ok(claims) => Some(claims),
            Err(e) => return e.into_response(),
        },
        Ok(None) => None,
        Err(e) => return e.into_response(),
    };

    // Clients only send their request: a small read buffer. (The default,
    // 128 KiB, is zero-filled on every read and was most of the CPU of a
    // fan-out to 1,000 sockets; docs/performance.md.)
    upgrade.read_buffer_size(4096).on_upgrade(move |socket| serve_socket(state, early, socket))
}

async fn serve_socket(state: AppState, early: Option<Claims>, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), rx.next()).await;
    let request = match first {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<Request>(&text)
            .map_err(|e| ApiError::BadRequest(format!("first message: {e}")))
            .and_then(|r| {
                let claims = match early {
                    Some(c) => c,
                    None => state.auth.check(r.token.as_deref())?,
                };
                let ack = r.ack;
                let resolved = r.resolve(&state, &claims, None)?;
                Ok((resolved, claims, ack))
            }),
        _ => Err(ApiError::BadRequest("expected the subscription request as the first message within 10 s".into())),
    };
    let (feed, expires, ack) = match request {
        Ok(((filter, since), claims, ack)) => {
            (Feed::new(state, filter, since).await.map_err(ApiError::from), expiry(&claims), ack)
        }
        Err(e) => (Err(e), tokio::time::Instant::now(), false),
    };
    let mut feed = match feed {
        Ok(f) => f,
        Err(e) => {
            let msg = e.message().to_string();
            let code = if matches!(e, ApiError::Unauthorized(_)) { 4401 } else { 4400 };
            let _ = tx.send(Message::Text(json!({"type": "error", "error": msg}).to_string().into())).await;
            let _ = tx.send(Message::Close(Some(CloseFrame { code, reason: "refused".into() }))).await;
            return;
        }
    };
    if ack {
        let subscribed = json!({"type": "subscribed", "id": feed.position().to_string()}).to_string();
        if tx.send(Message::Text(subscribed.into())).await.is_err() {
            return;
        }
    }
    // The read side is watched by a task of its own, so that sending never
    // polls it: it only wakes when the client sends something (a close).
    let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    // One timer for the token's expiry, not one per delivery.
    let expiry = tokio::time::sleep_until(expires);
    tokio::pin!(expiry);
    loop {
        let item = tokio::select! {
            item = feed.next() => item,
            _ = &mut closed => return,
            () = &mut expiry => {
                let _ = tx.send(Message::Text(json!({"type": "expired", "error": "the token expired"}).to_string().into())).await;
                let _ = tx.send(Message::Close(Some(CloseFrame { code: 4401, reason: "token expired".into() }))).await;
                return;
            }
        };
        // This item, then whatever else is ready, in one flush.
        let mut next = Some(item);
        let mut sent = 0;
        while let Some(item) = next.take() {
            let (message, close) = ws_message(item);
            if tx.feed(message).await.is_err() {
                return;
            }
            if let Some((code, reason)) = close {
                let _ = tx.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                return;
            }
            sent += 1;
            if sent < 64 {
                next = feed.try_next().map(|i| Ok(Some(i)));
            }
        }
        if tx.flush().await.is_err() {
            return;
        }
    }
}

/// One feed item as a WebSocket message, and the close that must follow it.
fn ws_message(item: Result<Option<Item>, pgpubsub::Error>) -> (Message, Option<(u16, &'static str)>) {
    let text = |v: Value| Message::Text(v.to_string().into());
    match item {
        Ok(Some(Item::Event { shared, .. })) => {
            // Rendered once per event and shared by every subscriber. Its id
            // is the event's own position, the same for all of them; where a
            // subscriber's own is further on (after a catch-up), resuming
            // from the event's may repeat events, never skip one.
            let frame = shared.frame(Transport::WebSocket as usize, |s| {
                bytes::Bytes::from(format!(r#"{{"type":"event","id":"{}","event":{}}}"#, s.position, s.event.json()))
            });
            match axum::extract::ws::Utf8Bytes::try_from(frame) {
                Ok(t) => (Message::Text(t), None),
                Err(_) => (text(json!({"type": "error", "error": "frame is not UTF-8"})), None),
            }
        }
        Ok(Some(Item::Resync { cursor, pruned })) => {
            (text(json!({"type": "resync", "cursor": cursor.to_string(), "pruned": pruned.to_string()})), None)
        }
        Ok(Some(Item::Lagged { missed, position })) => (
            text(json!({"type": "lagged", "missed": missed, "resume": position.to_string()})),
            Some((4000, "lagged: reconnect with since")),
        ),
        Ok(None) => (text(json!({"type": "closing"})), Some((1001, "server shutting down"))),
        Err(e) => (text(json!({"type": "error", "error": e.to_string()})), Some((1011, "log unavailable"))),
    }
}

/// `POST /publish/{channel}`: the body, any size up to the limit, as a
/// message; answers `{"seq": n}`. The token and channel are checked before
/// a byte of the body is read.
async fn publish(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let token = auth::token_from(&headers, &state.origins)?;
    let claims = state.auth.check(token.as_deref())?;
    let channel = Channel::new(channel).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if !state.served.allows(channel.as_str()) {
        return Err(ApiError::Forbidden(format!("channel {channel} is not served here")));
    }
    if !claims.can_write(channel.as_str()) {
        return Err(ApiError::Forbidden(format!("this token may not publish on {channel}")));
    }
    state.rate.take(&rate_key(token.as_deref(), peer))?;
    let body = read_body(&headers, body, state.max_event_bytes).await?;
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("the body must be UTF-8 text".into()))?;
    no_nul("the message", text)?;
    let seq = with_db(&state, |c| async move { pgpubsub::publish(&c, &channel, text).await }).await?;
    Ok(Json(json!({ "seq": seq })))
}

/// `PUT /store/{bucket}/{id}`: a new version of the value (JSON body). With
/// `If-Match: <version>` only if that is the current version (`0`: must not
/// exist yet); 409 otherwise. Answers `{"version": n}`.
async fn store_put(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    store_check(&state, &headers, true, &bucket, &id)?;
    state.rate.take(&rate_key(auth::token_from(&headers, &state.origins)?.as_deref(), peer))?;
    let body = read_body(&headers, body, state.max_event_bytes).await?;
    let val: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("the body must be JSON: {e}")))?;
    let expected = match headers.get("if-match") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim_matches('"').parse::<i32>().ok())
                .ok_or_else(|| ApiError::BadRequest("If-Match must be a version number".into()))?,
        ),
        None => None,
    };
    let version = with_db(&state, |c| {
        let (b, i) = (bucket.as_str(), id.as_str());
        async move { store::put(&c, b, i, &val, expected).await }
    })
    .await?;
    Ok(Json(json!({ "version": version })))
}

/// `GET /store/{bucket}/{id}`: `{"version": n, "val": ...}`, or 404.
async fn store_get(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    store_check(&state, &headers, false, &bucket, &id)?;
    match with_db(&state, |c| {
        let (b, i) = (bucket.as_str(), id.as_str());
        async move { store::get(&c, b, i).await }
    })
    .await?
    {
        Some(s) => Ok(Json(json!({ "version": s.version, "val": s.val }))),
        None => Err(ApiError::NotFound(format!("{bucket}/{id} does not exist"))),
    }
}

/// `DELETE /store/{bucket}/{id}`: `{"version": n}` (the deleting version), or 404.
async fn store_delete(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    store_check(&state, &headers, true, &bucket, &id)?;
    state.rate.take(&rate_key(auth::token_from(&headers, &state.origins)?.as_deref(), peer))?;
    match with_db(&state, |c| {
        let (b, i) = (bucket.as_str(), id.as_str());
        async move { store::remove(&c, b, i).await }
    })
    .await?
    {
        Some(version) => Ok(Json(json!({ "version": version }))),
        None => Err(ApiError::NotFound(format!("{bucket}/{id} does not exist"))),
    }
}

/// `GET /store/{bucket}/{id}/history`: every version, oldest first.
async fn store_history(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    store_check(&state, &headers, false, &bucket, &id)?;
    let history = with_db(&state, |c| {
        let (b, i) = (bucket.as_str(), id.as_str());
        async move { store::history(&c, b, i).await }
    })
    .await?;
    Ok(Json(json!(history)))
}

/// Whether the token allows a store request: the store is read and written
/// as the channel it announces changes on.
fn store_check(state: &AppState, headers: &HeaderMap, write: bool, bucket: &str, id: &str) -> Result<(), ApiError> {
    let claims = state.auth.check(auth::token_from(headers, &state.origins)?.as_deref())?;
    let allowed = if write { claims.can_write(store::STORE_CHANNEL) } else { claims.can_read(store::STORE_CHANNEL) };
    if !allowed {
        return Err(ApiError::Forbidden(format!(
            "this token may not {} the store",
            if write { "write" } else { "read" }
        )));
    }
    no_nul("the bucket", bucket)?;
    no_nul("the id", id)?;
    Ok(())
}

/// How long a request's statements may take.
const DB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs statements on the gateway's connection within [`DB_TIMEOUT`]. A
/// connection that fails or does not answer (a network path that went
/// silent) is dropped, so the next request opens a new one.
async fn with_db<T, F, Fut>(state: &AppState, f: F) -> Result<T, ApiError>
where
    F: FnOnce(std::sync::Arc<tokio_postgres::Client>) -> Fut,
    Fut: std::future::Future<Output = Result<T, pgpubsub::Error>>,
{
    let log = state.db.pick();
    let client = log.client().await?;
    match tokio::time::timeout(DB_TIMEOUT, f(client)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            if e.sqlstate().is_none() {
                log.reset().await;
            }
            Err(e.into())
        }
        Err(_) => {
            log.reset().await;
            Err(ApiError::Unavailable(format!("the database did not answer within {DB_TIMEOUT:?}")))
        }
    }
}

/// PostgreSQL text cannot hold NUL: say so, rather than fail in the database.
fn no_nul(what: &str, text: &str) -> Result<(), ApiError> {
    if text.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "{what} contains a NUL byte (U+0000), which PostgreSQL text cannot hold"
        )));
    }
    Ok(())
}

/// Whose publish-rate bucket a request draws from: its token's, else its
/// address's.
fn rate_key(token: Option<&str>, peer: std::net::SocketAddr) -> String {
    use std::hash::{Hash, Hasher};
    match token {
        Some(t) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            t.hash(&mut h);
            format!("t{:x}", h.finish())
        }
        None => format!("a{}", peer.ip()),
    }
}

/// The body, at most `limit` bytes: a larger `Content-Length` is refused
/// before reading anything, a body without one as soon as it passes the
/// limit. Nothing is read past it.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::TooLarge(format!("the body is over the limit of {limit} bytes (--max-event-bytes)"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut buf = bytes::BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// When a stream opened with these claims must end.
fn expiry(claims: &Claims) -> tokio::time::Instant {
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Far enough for "never" without overflowing the clock.
    let left = claims.exp.saturating_sub(now_s).min(100 * 365 * 24 * 3600);
    tokio::time::Instant::now() + std::time::Duration::from_secs(left)
}

/// `GET /livez`: the process answers.
async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz` (and `/healthz`): 200 while the LISTEN connection is up and
/// the schema is migrated, else 503 with the reason.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let s = state.listener_stats.snapshot();
    let listener = state.listener_state.borrow().clone();
    let listening = match &listener {
        ConnectionState::Listening => "listening".to_string(),
        other => format!("{other:?}"),
    };
    let mut reason = None;
    if !matches!(listener, ConnectionState::Listening) {
        reason = Some(format!("the LISTEN connection is not up ({listening})"));
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
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.listener_stats.snapshot();
    let h = state.hub.stats();
    let up = matches!(&*state.listener_state.borrow(), ConnectionState::Listening);
    let rows: [(&str, &str, &str, f64); 13] = [
        ("pgpubsub_events_in_total", "counter", "Events received from PostgreSQL.", s.events as f64),
        (
            "pgpubsub_deliveries_total",
            "counter",
            "Events queued to subscribers.",
            h.deliveries.load(Ordering::Relaxed) as f64,
        ),
        (
            "pgpubsub_dropped_total",
            "counter",
            "Deliveries dropped for lagging subscribers.",
            h.dropped.load(Ordering::Relaxed) as f64,
        ),
        ("pgpubsub_lag_notices_total", "counter", "Lag notices sent.", h.lag_notices.load(Ordering::Relaxed) as f64),
        ("pgpubsub_reconnects_total", "counter", "Times the LISTEN connection was replaced.", s.reconnects as f64),
        ("pgpubsub_wakeups_total", "counter", "Wake-ups received from writers.", s.wakeups as f64),
        ("pgpubsub_polls_total", "counter", "Reads of the event log.", s.polls as f64),
        (
            "pgpubsub_bad_input_total",
            "counter",
            "Malformed, non-JSON, corrupt or oversize notifications.",
            (s.malformed + s.not_json + s.corrupt + s.oversize) as f64,
        ),
        ("pgpubsub_subscribers", "gauge", "Subscribers connected.", state.hub.subscribers() as f64),
        (
            "pgpubsub_notify_queue_usage",
            "gauge",
            "pg_notification_queue_usage() at the last heartbeat.",
            s.queue_usage_ppm as f64 / 1e6,
        ),
        ("pgpubsub_heartbeat_seconds", "gauge", "Round trip of the last heartbeat.", s.heartbeat_rtt_us as f64 / 1e6),
        (
            "pgpubsub_open_connections",
            "gauge",
            "Connections open (capped by --max-connections).",
            state.places.used() as f64,
        ),
        ("pgpubsub_listener_up", "gauge", "1 while the LISTEN connection is up.", if up { 1.0 } else { 0.0 }),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in rows {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    ([("content-type", "text/plain; version=0.0.4")], text)
}
