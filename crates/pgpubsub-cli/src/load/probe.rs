//! What a receiver measures about the events it gets: how many, which
//! (to count losses), when (rate), and how late (latency from the writer's
//! timestamp in the row, in an HdrHistogram).

use std::collections::HashSet;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Microseconds since the Unix epoch (the writers stamp rows with the same
/// clock; everything runs on one machine).
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Most latency samples kept for the plot (every k-th event past this).
const MAX_SAMPLES: usize = 5_000;

/// A receiver's tally.
pub struct Probe {
    pub received: u64,
    pub latency: Histogram<u64>,
    seen: HashSet<(i32, i64, u8)>,
    pub duplicates: u64,
    pub first_us: Option<i64>,
    pub last_us: i64,
    /// (µs since first event, latency µs), thinned to at most MAX_SAMPLES.
    pub samples: Vec<(i64, u64)>,
    stride: u64,
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe {
    pub fn new() -> Self {
        Probe {
            received: 0,
            // 1 µs to 1 hour, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            seen: HashSet::new(),
            duplicates: 0,
            first_us: None,
            last_us: 0,
            samples: Vec::new(),
            stride: 1,
        }
    }

    /// One event whose row (new, or old for a delete) carries writer, n, t.
    pub fn record_value(&mut self, event: &Value, now: i64) {
        let row = match &event["new"] {
            Value::Null => &event["old"],
            new => new,
        };
        let op = match event["op"].as_str() {
            Some("UPDATE") => 1,
            Some("DELETE") => 2,
            _ => 0,
        };
        let (Some(w), Some(n), Some(t)) = (row["writer"].as_i64(), row["n"].as_i64(), row["t"].as_i64()) else {
            return self.record_unparsed(now);
        };
        self.record(w as i32, n, op, t, now);
    }

    /// One `listen --json` line: only the fields measured are decoded.
    pub fn record_line(&mut self, line: &str, now: i64) {
        #[derive(serde::Deserialize)]
        struct Row {
            writer: i32,
            n: i64,
            t: i64,
        }
        #[derive(serde::Deserialize)]
        struct Line<'a> {
            #[serde(borrow)]
            op: Option<&'a str>,
            new: Option<Row>,
            old: Option<Row>,
        }
        match serde_json::from_str::<Line<'_>>(line) {
            Ok(Line { op, new, old }) => match new.or(old) {
                Some(r) => {
                    let op = match op {
                        Some("UPDATE") => 1,
                        Some("DELETE") => 2,
                        _ => 0,
                    };
                    self.record(r.writer, r.n, op, r.t, now)
                }
                None => self.record_unparsed(now),
            },
            Err(_) => self.record_unparsed(now),
        }
    }

    /// One notification that carried no row (a chunk, for the baseline).
    pub fn record_unparsed(&mut self, now: i64) {
        self.received += 1;
        self.first_us.get_or_insert(now);
        self.last_us = now;
    }

    pub fn record(&mut self, writer: i32, n: i64, op: u8, t: i64, now: i64) {
        self.received += 1;
        let first = *self.first_us.get_or_insert(now);
        self.last_us = now;
        if !self.seen.insert((writer, n, op)) {
            self.duplicates += 1;
            return;
        }
        let lat = (now - t).max(1) as u64;
        let _ = self.latency.record(lat.min(3_600_000_000));
        if self.received % self.stride == 0 {
            self.samples.push((now - first, lat));
            if self.samples.len() >= MAX_SAMPLES {
                self.samples = self.samples.iter().step_by(2).copied().collect();
                self.stride *= 2;
            }
        }
    }

    /// Distinct events received.
    pub fn distinct(&self) -> u64 {
        self.seen.len() as u64
    }

    /// Events per second between the first and the last arrival.
    pub fn rate(&self) -> f64 {
        let span = (self.last_us - self.first_us.unwrap_or(self.last_us)) as f64 / 1e6;
        if span > 0.0 {
            self.received as f64 / span
        } else {
            0.0
        }
    }

    /// The numbers, as JSON (what the baseline process prints).
    pub fn summary(&self) -> Value {
        let p = |q: f64| self.latency.value_at_quantile(q);
        json!({
            "received": self.received,
            "distinct": self.distinct(),
            "duplicates": self.duplicates,
            "rate": self.rate(),
            "p50_us": p(0.5), "p90_us": p(0.9), "p99_us": p(0.99), "p999_us": p(0.999),
            "max_us": self.latency.max(),
        })
    }
}
