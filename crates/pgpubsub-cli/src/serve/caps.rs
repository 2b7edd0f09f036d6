//! Caps: requests and streams open at once, and publishes per second per
//! client.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::routes::ApiError;
use super::AppState;

/// The open requests and streams, at most a configured number.
#[derive(Clone)]
pub struct Slots {
    sem: Arc<Semaphore>,
    max: usize,
}

/// One place, held by a request until its response body ends, and by a
/// WebSocket session until it closes.
#[derive(Clone)]
pub struct Slot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

impl Slots {
    /// `max` places.
    pub fn new(max: usize) -> Slots {
        Slots { sem: Arc::new(Semaphore::new(max)), max }
    }

    /// Places in use.
    pub fn used(&self) -> usize {
        self.max - self.sem.available_permits()
    }
}

/// Middleware: takes a place for the request, or answers 503 at once.
pub async fn limit(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let Ok(permit) = state.slots.sem.clone().try_acquire_owned() else {
        return ApiError::Busy(format!(
            "the gateway is at its limit of {} open requests and streams (--max-connections); retry later",
            state.slots.max
        ))
        .into_response();
    };
    let slot = Slot(Arc::new(permit));
    request.extensions_mut().insert(slot.clone());
    next.run(request).await.map(|body| Body::new(Held { body, _slot: slot }))
}

/// A response body that holds its request's place until it ends.
struct Held {
    body: Body,
    _slot: Slot,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Token buckets, one per client: `rate` per second, bursts of `2 × rate`.
pub struct Rate {
    rate: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Rate {
    /// `rate` per second per client; 0: no limit.
    pub fn new(rate: f64) -> Rate {
        Rate { rate, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token of `key`'s bucket.
    ///
    /// # Errors
    /// `TooMany` when it is empty.
    pub fn take(&self, key: &str) -> Result<(), ApiError> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let burst = (2.0 * self.rate).max(1.0);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 100_000 {
            // Forget the clients whose buckets have filled up again.
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(burst);
        *at = now;
        if *tokens < 1.0 {
            return Err(ApiError::TooMany(format!(
                "more than {} publishes per second (--publish-rate); retry later",
                self.rate
            )));
        }
        *tokens -= 1.0;
        Ok(())
    }
}
