//! The subscriber routes: `GET /events` (Server-Sent Events) and `GET /ws`
//! (WebSocket). Both resume from a position (`since`, `Last-Event-ID`)
//! through the log, then go on live, and end when the token expires.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use super::auth::{self, Claims};
use super::error::{ApiError, ErrorBody};
use super::feed::{Feed, Item, ShapeAsk};
use super::request::{Request, Resolved};
use super::{shape, AppState};

/// The gateway's renderings of an event, each kept in a frame slot of the
/// event (`pgpubsub::hub::Shared::frame`) and shared by every subscriber.
#[derive(Clone, Copy)]
enum Transport {
    /// A WebSocket text frame.
    WebSocket = 0,
    /// A Server-Sent Events record.
    EventStream = 1,
}

/// `GET /events`: Server-Sent Events. Each event's id is its resume
/// position, so a browser's EventSource resumes by itself (`Last-Event-ID`).
/// A subscriber that falls behind gets `event: lagged` and the stream ends:
/// reconnecting resumes from the log. Each event's record is rendered once
/// and shared by every subscriber's stream.
#[utoipa::path(get, path = "/events", tag = "subscribe",
    params(
        ("channel" = Option<Vec<String>>, Query, description = "Channels, repeated or comma-separated; none: every channel served that the token may read"),
        ("table" = Option<String>, Query, description = "Only changes of this table"),
        ("op" = Option<Vec<String>>, Query, description = "Only these operations (INSERT, UPDATE, DELETE, TRUNCATE), repeated"),
        ("where" = Option<Vec<String>>, Query, description = "`column:value`: only rows whose column equals the value, repeated"),
        ("filter" = Option<String>, Query, description = "A shape (with `table`): the rows that match this filter, in pgpubsub's grammar (`status = 'paid' and qty >= 2`) or its JSON form; changes that move a row in or out come as `view: enter`/`leave` (docs/protocol.md, \"Shapes\")"),
        ("columns" = Option<Vec<String>>, Query, description = "A shape (with `table`): only these columns (the key's always), comma-separated"),
        ("snapshot" = Option<bool>, Query, description = "A shape (with `table`): first the rows (`snapshot` records), then `ready` with the position its changes begin at; not sent again when resuming with a position, sent again after a resync"),
        ("since" = Option<String>, Query, description = "Resume after this position (an event's id)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position (what EventSource sends when it reconnects)"),
    ),
    responses(
        (status = 200, description = "The stream: `change`, `message` and `notify` events whose id is the position to resume from; `resync`, `lagged`, `expired`, `error`; for a shape, first `snapshot` records (`{\"key\": [...], \"rows\": [...]}`) and `ready`", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad parameter or position", body = ErrorBody),
        (status = 401, description = "No valid token (authentication on)", body = ErrorBody),
        (status = 403, description = "A channel not served here or not readable with this token", body = ErrorBody),
        (status = 503, description = "The log cannot be read now, or the gateway is full", body = ErrorBody),
    )
)]
pub async fn sse(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let request = Request::from_query(query.as_deref())?;
    let claims = state.auth.check(auth::token_from(&headers, &state.origins)?.as_deref())?;
    let resolved = request.resolve(&state, &claims, last)?;
    let expires = expiry(&claims);
    let keep_alive = state.heartbeat.every;
    let feed = open_feed(state, resolved, &claims).await?;
    let start = feed.position().map(|c| format!("id: {c}\n")).unwrap_or_default();
    let record = |event: &str, data: &str, id: Option<&dyn std::fmt::Display>| {
        let id = id.map(|c| format!("id: {c}\n")).unwrap_or_default();
        Bytes::from(format!("{id}event: {event}\ndata: {data}\n\n"))
    };
    // First, how soon a browser should reconnect after a drop, and where
    // this subscriber stands before any event (an id alone is no event;
    // none while a shape's snapshot comes: a drop reads it again).
    let hello = futures_util::stream::once(async move {
        Ok::<_, Infallible>(Bytes::from(format!("retry: 1000\n{start}: pgpubsub\n\n")))
    });
    let events = futures_util::stream::unfold(Some(next_of(feed)), move |pending| async move {
        let mut pending = pending?;
        // The wait for the next item goes on across keep-alives (a page of
        // the log being read is not started over).
        let (feed, next) = tokio::select! {
            done = &mut pending => done,
            // A comment every --heartbeat keeps proxies from closing an idle
            // stream, and tells the client it is alive.
            () = tokio::time::sleep(keep_alive) => {
                return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), Some(pending)));
            }
            () = tokio::time::sleep_until(expires) => {
                let data = json!({"error": "the token expired"}).to_string();
                return Some((Ok(record("expired", &data, None)), None));
            }
        };
        let (bytes, go_on) = match next {
            Ok(Some(Item::Event { position, shared })) => match feed.id_for(position, shared.position) {
                // Inside a shape's hand-over: an id of this subscriber's own.
                Some(id) => (record(shared.event.kind(), shared.event.json(), Some(&id)), true),
                None => {
                    let frame = shared.frame(Transport::EventStream as usize, |s| {
                        record(s.event.kind(), s.event.json(), Some(&s.position))
                    });
                    (frame, true)
                }
            },
            Ok(Some(Item::Resync { cursor, pruned, snapshot })) => {
                let data = json!({"cursor": cursor.to_string(), "pruned": pruned.to_string(), "snapshot": snapshot});
                // Its id: a browser that reconnects now resumes after the gap
                // (with a shape's snapshot to come, none: a drop reads it again).
                let id = (!snapshot).then_some(&pruned as &dyn std::fmt::Display);
                (record("resync", &data.to_string(), id), true)
            }
            Ok(Some(Item::Lagged { missed, position })) => {
                let data = json!({"missed": missed, "resume": position.to_string()}).to_string();
                (record("lagged", &data, Some(&position)), false)
            }
            Ok(Some(Item::Rows(rows))) => {
                let data = format!(r#"{{"key":{},"rows":{}}}"#, json!(feed.key()), rows_json(&rows));
                (record("snapshot", &data, None), true)
            }
            Ok(Some(Item::Ready { id, rows })) => {
                let data = json!({"id": id, "rows": rows, "key": feed.key()}).to_string();
                (record("ready", &data, Some(&id)), true)
            }
            Ok(None) => return None,
            Err(e) => (record("error", &json!({"error": format!("{e:#}")}).to_string(), None), false),
        };
        Some((Ok(bytes), go_on.then(|| next_of(feed))))
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(axum::body::Body::from_stream(hello.chain(events)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// A shape's snapshot rows as one JSON array.
fn rows_json(rows: &[String]) -> String {
    let mut out = String::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
    out.push('[');
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r);
    }
    out.push(']');
    out
}

/// The feed a checked request asks for: a shape's table is read from the
/// catalog and checked against the token first.
async fn open_feed(state: AppState, resolved: Resolved, claims: &Claims) -> Result<Feed, ApiError> {
    let Resolved { mut filter, since, shape } = resolved;
    let ask = match shape {
        Some((table, ask)) => {
            let s = shape::resolve(&state, claims, &table, &ask).await?;
            filter.channels = vec![s.channel.clone()];
            filter.table = Some(format!("{}.{}", s.schema, s.table));
            Some(ShapeAsk { shape: s, snapshot: ask.snapshot })
        }
        None => None,
    };
    Feed::new(state, filter, since, viewer(claims), ask).await
}

/// The viewer a token's `role` claim names (row-level authorization);
/// `None` without one: the token's channels decide alone.
fn viewer(claims: &Claims) -> Option<pgpubsub::Viewer> {
    claims.role.as_ref().map(|role| pgpubsub::Viewer::role(role, claims.all.clone()))
}

/// A feed's next item, owning the feed until it has it.
type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = (Feed, NextItem)> + Send>>;
type NextItem = Result<Option<Item>, pgpubsub::Error>;

fn next_of(mut feed: Feed) -> Pending {
    Box::pin(async move {
        let next = feed.next().await;
        (feed, next)
    })
}

/// `GET /ws`: the client's first message is the request as JSON
/// (`{"channels": [...], "table", "ops", "where", "since", "ack"}`); then each event
/// comes as `{"type": "event", "id": "<resume>", "event": {...}}`. A
/// subscriber that falls behind gets `{"type": "lagged", ...}` and close code
/// 4000; a bad request gets `{"type": "error", ...}` and close code 4400.
/// Every `--heartbeat` the socket gets a ping and `{"type": "heartbeat"}`
/// (pages cannot see pings); a client silent past `--heartbeat-timeout` is
/// dropped.
#[utoipa::path(get, path = "/ws", tag = "subscribe",
    description = "Upgrades to a WebSocket. The client's first message is the request as JSON: \
`{\"channels\": [...], \"table\", \"ops\", \"where\": {\"col\": value}, \"since\", \"ack\", \"token\"}`, \
or a shape: `{\"table\", \"filter\": \"<text>\" or {...}, \"columns\": [...], \"snapshot\": true, \"since\"}`. \
Then each event comes as `{\"type\": \"event\", \"id\": \"<position>\", \"event\": {...}}`; also \
`subscribed`, `resync`, `lagged` (close 4000), `expired` and `error` (close 4400, 4401); a shape's snapshot \
first as `{\"type\": \"snapshot\", \"key\": [...], \"rows\": [...]}` messages, then `{\"type\": \"ready\", \"id\", \"rows\"}`. \
Every `--heartbeat` (15 s) the server sends a ping and `{\"type\": \"heartbeat\"}`: a client that \
hears nothing for three heartbeats may take the connection as dead and resume elsewhere. A client \
that sends nothing, not even a pong, for `--heartbeat-timeout` (45 s) is dropped without a close frame.",
    params(("Origin" = Option<String>, Header, description = "With a token in the cookie, must be a trusted origin")),
    responses(
        (status = 101, description = "Switched to WebSocket"),
        (status = 401, description = "A token in a header or cookie that is not valid", body = ErrorBody),
        (status = 403, description = "A cookie sent from an origin not trusted", body = ErrorBody),
    )
)]
pub async fn ws(State(state): State<AppState>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Response {
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
    // The first message is the request: a few hundred bytes, not the 64 MiB
    // a WebSocket message may be by default, read before any token check.
    upgrade
        .read_buffer_size(4096)
        .max_message_size(64 << 10)
        .max_frame_size(64 << 10)
        .on_upgrade(move |socket| serve_socket(state, early, socket))
}

async fn serve_socket(state: AppState, early: Option<Claims>, socket: WebSocket) {
    let beat = state.heartbeat.clone();
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
        Ok((resolved, claims, ack)) => (open_feed(state, resolved, &claims).await, expiry(&claims), ack),
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
        let subscribed = json!({"type": "subscribed", "id": feed.position().map(|c| c.to_string())}).to_string();
        if tx.send(Message::Text(subscribed.into())).await.is_err() {
            return;
        }
    }
    // The read side is watched by a task of its own, so that sending never
    // polls it: it only wakes when the client sends something (a pong, a
    // close). It notes when it last heard from the client. When this
    // function returns it is given the timeout to read the client's answer
    // to a close (closing a socket with unread data resets it, which can
    // destroy the close frame sent), or ended at once for a dead client.
    let began = tokio::time::Instant::now();
    let heard = Arc::new(AtomicU64::new(0));
    let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
    let reader = {
        let heard = heard.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                heard.store(millis(began.elapsed()), Ordering::Relaxed);
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
            let _ = closed_tx.send(());
        })
    };
    let mut reader = Reader { task: Some(reader), linger: beat.timeout };
    let mut heartbeat = tokio::time::interval_at(began + beat.every, beat.every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One timer for the token's expiry, not one per delivery.
    let expiry = tokio::time::sleep_until(expires);
    tokio::pin!(expiry);
    loop {
        // A heartbeat does not interrupt the wait for the next item: a page
        // of the log being read goes on (a read slower than the heartbeat
        // would otherwise start over forever).
        let item = {
            let next = feed.next();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    item = &mut next => break item,
                    _ = &mut closed => return,
                    () = &mut expiry => {
                        let _ = tx.send(Message::Text(json!({"type": "expired", "error": "the token expired"}).to_string().into())).await;
                        let _ = tx.send(Message::Close(Some(CloseFrame { code: 4401, reason: "token expired".into() }))).await;
                        return;
                    }
                    _ = heartbeat.tick() => {
                        let silent = began.elapsed().saturating_sub(Duration::from_millis(heard.load(Ordering::Relaxed)));
                        if silent > beat.timeout {
                            // Gone without a word (a NAT timeout, a sleeping
                            // laptop): no close frame, it would not arrive.
                            beat.silent.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(?silent, "a WebSocket client fell silent past --heartbeat-timeout: dropped");
                            reader.abort();
                            return;
                        }
                        let ping = tx.feed(Message::Ping(bytes::Bytes::new())).await;
                        if ping.is_err() || tx.send(Message::Text(HEARTBEAT.into())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        // This item, then whatever else is ready, in one flush.
        let mut next = Some(item);
        let mut sent = 0;
        while let Some(item) = next.take() {
            let id = match &item {
                Ok(Some(Item::Event { position, shared })) => feed.id_for(*position, shared.position),
                _ => None,
            };
            let (message, close) = ws_message(item, id, feed.key());
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

/// What a WebSocket gets every `--heartbeat`, besides a ping: browsers do not
/// show pings to pages.
const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

/// A socket's reading task: when dropped, given `linger` to end by itself
/// (the client answering a close), then ended.
struct Reader {
    task: Option<tokio::task::JoinHandle<()>>,
    linger: Duration,
}

impl Reader {
    /// Ends it now (the client is gone).
    fn abort(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        let (abort, linger) = (task.abort_handle(), self.linger);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move {
                if tokio::time::timeout(linger, task).await.is_err() {
                    abort.abort();
                }
            })),
            // The runtime itself is going away, and the task with it.
            Err(_) => abort.abort(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One feed item as a WebSocket message, and the close that must follow it.
fn ws_message(
    item: Result<Option<Item>, pgpubsub::Error>,
    id: Option<String>,
    key: &[String],
) -> (Message, Option<(u16, &'static str)>) {
    let text = |v: Value| Message::Text(v.to_string().into());
    match item {
        Ok(Some(Item::Event { shared, .. })) if id.is_some() => {
            // Inside a shape's hand-over: an id of this subscriber's own.
            let id = id.unwrap_or_default();
            (Message::Text(format!(r#"{{"type":"event","id":"{id}","event":{}}}"#, shared.event.json()).into()), None)
        }
        Ok(Some(Item::Rows(rows))) => {
            let text = format!(r#"{{"type":"snapshot","key":{},"rows":{}}}"#, json!(key), rows_json(&rows));
            (Message::Text(text.into()), None)
        }
        Ok(Some(Item::Ready { id, rows })) => {
            (text(json!({"type": "ready", "id": id, "rows": rows, "key": key})), None)
        }
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
        Ok(Some(Item::Resync { cursor, pruned, snapshot })) => (
            text(
                json!({"type": "resync", "cursor": cursor.to_string(), "pruned": pruned.to_string(), "snapshot": snapshot}),
            ),
            None,
        ),
        Ok(Some(Item::Lagged { missed, position })) => (
            text(json!({"type": "lagged", "missed": missed, "resume": position.to_string()})),
            Some((4000, "lagged: reconnect with since")),
        ),
        Ok(None) => (text(json!({"type": "closing"})), Some((1001, "server shutting down"))),
        Err(e) => (text(json!({"type": "error", "error": format!("{e:#}")})), Some((1011, "log unavailable"))),
    }
}

/// When a stream opened with these claims must end.
fn expiry(claims: &Claims) -> tokio::time::Instant {
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Far enough for "never" without overflowing the clock.
    let left = claims.exp.saturating_sub(now_s).min(100 * 365 * 24 * 3600);
    tokio::time::Instant::now() + std::time::Duration::from_secs(left)
}
