//! Capped exponential backoff: the one every reconnecting loop uses (the
//! listener, the capturer, the bridge, the NATS-fed gateway).

use std::time::Duration;

/// Delays that double from `min` up to `max`, and start over at `min` after
/// a success ([`Backoff::reset`]).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays from `min`, doubling, never more than `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.min(max);
        Backoff { min, max, next: min, attempt: 0 }
    }

    /// The delay to wait now; the next one is twice as long (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).clamp(self.min, self.max);
        self.attempt = self.attempt.saturating_add(1);
        now
    }

    /// Waits [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Failures since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
        self.attempt = 0;
    }

    /// The delay after failure number `attempt` (from 0), without state: for
    /// callbacks that are handed the attempt (async-nats' reconnect delay).
    pub fn nth(&self, attempt: usize) -> Duration {
        let factor = 1u32 << attempt.min(20) as u32;
        self.min.saturating_mul(factor).clamp(self.min, self.max)
    }

    /// The delay the next failure will wait.
    pub fn peek(&self) -> Duration {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn doubles_to_the_cap_and_starts_over_after_a_success() {
        let ms = Duration::from_millis;
        let mut b = super::Backoff::new(ms(100), ms(500));
        let seen: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(seen, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(b.attempt(), 5);
        b.reset();
        assert_eq!((b.next_delay(), b.attempt()), (ms(100), 1));
        assert_eq!((b.nth(0), b.nth(2), b.nth(60)), (ms(100), ms(400), ms(500)));
        // A minimum above the cap is held to the cap.
        assert_eq!(super::Backoff::new(ms(900), ms(500)).next_delay(), ms(500));
    }
}
