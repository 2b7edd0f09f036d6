//! The writing routes: `POST /publish/{channel}` and the store
//! (`/store/{bucket}/{id}`), on the gateway's pool of connections. The
//! token, channel and rate are checked before a byte of a body is read.

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use futures_util::StreamExt;
use pgpubsub::{store, Channel};
use serde_json::{json, Value};

use super::auth;
use super::error::{ApiError, ErrorBody};
use super::AppState;

/// `{"seq": n}`: the message's place in the log.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Published {
    /// Its sequence number in the log.
    pub seq: i64,
}

/// `{"version": n}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Versioned {
    /// The value's version after the request.
    pub version: i32,
}

/// `{"version": n, "val": ...}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Stored {
    /// The current version.
    pub version: i32,
    /// The value (any JSON).
    #[schema(value_type = Object)]
    pub val: Value,
}

/// `POST /publish/{channel}`: the body, any size up to the limit, as a
/// message; answers `{"seq": n}`. The token and channel are checked before
/// a byte of the body is read.
#[utoipa::path(post, path = "/publish/{channel}", tag = "publish",
    params(("channel" = String, Path, description = "The channel to publish on")),
    request_body(content = String, content_type = "text/plain", description = "The message, UTF-8, up to --max-event-bytes"),
    responses(
        (status = 200, description = "Written to the log", body = Published),
        (status = 400, description = "Not UTF-8, a NUL byte, a bad channel name", body = ErrorBody),
        (status = 401, description = "No valid token (authentication on)", body = ErrorBody),
        (status = 403, description = "Not allowed to this token or origin", body = ErrorBody),
        (status = 413, description = "Over --max-event-bytes", body = ErrorBody),
        (status = 429, description = "Over --publish-rate", body = ErrorBody),
        (status = 503, description = "The database cannot take it now", body = ErrorBody),
    )
)]
pub async fn publish(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Published>, ApiError> {
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
    Ok(Json(Published { seq }))
}

/// `PUT /store/{bucket}/{id}`: a new version of the value (JSON body). With
/// `If-Match: <version>` only if that is the current version (`0`: must not
/// exist yet); 409 otherwise. Answers `{"version": n}`.
#[utoipa::path(put, path = "/store/{bucket}/{id}", tag = "store",
    params(
        ("bucket" = String, Path, description = "The bucket"),
        ("id" = String, Path, description = "The key in the bucket"),
        ("If-Match" = Option<String>, Header, description = "Only if this is the current version (0: must not exist)"),
    ),
    request_body(content = Object, description = "The new value, any JSON"),
    responses(
        (status = 200, description = "The new version", body = Versioned),
        (status = 400, description = "Not JSON, a NUL byte, a bad If-Match", body = ErrorBody),
        (status = 401, description = "No valid token (authentication on)", body = ErrorBody),
        (status = 403, description = "Not allowed to this token or origin", body = ErrorBody),
        (status = 409, description = "If-Match is not the current version", body = ErrorBody),
        (status = 413, description = "Over --max-event-bytes", body = ErrorBody),
        (status = 429, description = "Over --publish-rate", body = ErrorBody),
    )
)]
pub async fn store_put(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Versioned>, ApiError> {
    store_write_check(&state, &headers, peer, &bucket, &id)?;
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
    Ok(Json(Versioned { version }))
}

/// `GET /store/{bucket}/{id}`: `{"version": n, "val": ...}`, or 404.
#[utoipa::path(get, path = "/store/{bucket}/{id}", tag = "store",
    params(("bucket" = String, Path, description = "The bucket"), ("id" = String, Path, description = "The key in the bucket")),
    responses(
        (status = 200, description = "The current version and value", body = Stored),
        (status = 401, description = "No valid token (authentication on)", body = ErrorBody),
        (status = 403, description = "Not allowed to this token or origin", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    )
)]
pub async fn store_get(
    State(state): State<AppState>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Stored>, ApiError> {
    store_check(&state, &headers, false, &bucket, &id)?;
    match with_db(&state, |c| {
        let (b, i) = (bucket.as_str(), id.as_str());
        async move { store::get(&c, b, i).await }
    })
    .await?
    {
        Some(s) => Ok(Json(Stored { version: s.version, val: s.val })),
        None => Err(ApiError::NotFound(format!("{bucket}/{id} does not exist"))),
    }
}

/// `DELETE /store/{bucket}/{id}`: `{"version": n}` (the deleting version), or 404.
#[utoipa::path(delete, path = "/store/{bucket}/{id}", tag = "store",
    params(("bucket" = String, Path, description = "The bucket"), ("id" = String, Path, description = "The key in the bucket")),
    responses(
        (status = 200, description = "The deleting version", body = Versioned),
        (status = 401, description = "No valid token (authentication on)", body = ErrorBody),
        (status = 403, description = "Not allowed to this token or origin", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 429, description = "Over --publish-rate", body = ErrorBody),
    )
)]
pub async fn store_delete(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Versioned>, ApiError> {
    store_write_check(&state, &headers, peer, &bucket, &id)?;
    match with_db(&state, |c| {
        let (b, i) = (bucket.as_str(), id.as_str());
        async move { store::remove(&c, b, i).await }
    })
    .await?
    {
        Some(version) => Ok(Json(Versioned { version })),
        None => Err(ApiError::NotFound(format!("{bucket}/{id} does not exist"))),
    }
}

/// `GET /store/{bucket}/{id}/history`: every version, oldest first.
#[utoipa::path(get, path = "/store/{bucket}/{id}/history", tag = "store",
    params(("bucket" = String, Path, description = "The bucket"), ("id" = String, Path, description = "The key in the bucket")),
    responses(
        (status = 200, description = "Every version, oldest first", body = [Object]),
        (status = 401, description = "No valid token (authentication on)", body = ErrorBody),
        (status = 403, description = "Not allowed to this token or origin", body = ErrorBody),
    )
)]
pub async fn store_history(
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
/// A write to the store: allowed to this token, and within its publish rate.
fn store_write_check(
    state: &AppState,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
    bucket: &str,
    id: &str,
) -> Result<(), ApiError> {
    store_check(state, headers, true, bucket, id)?;
    state.rate.take(&rate_key(auth::token_from(headers, &state.origins)?.as_deref(), peer))?;
    Ok(())
}

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

/// Runs statements on the gateway's connection within [`DB_TIMEOUT`]
/// ([`pgpubsub::LogConn::run_within`]: a connection that fails or does not
/// answer is dropped, so the next request opens a new one).
async fn with_db<T, F, Fut>(state: &AppState, f: F) -> Result<T, ApiError>
where
    F: FnOnce(std::sync::Arc<tokio_postgres::Client>) -> Fut,
    Fut: std::future::Future<Output = Result<T, pgpubsub::Error>>,
{
    Ok(state.db.pick().run_within("a request's statements", DB_TIMEOUT, f).await?)
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
