//! Publishes per second per client (the connection cap is the server
//! loop's, `server.rs`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::error::ApiError;

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
