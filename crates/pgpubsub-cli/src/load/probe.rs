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

/// Lines longer than this are scanned, not parsed (see [`scan_large_line`]).
const LARGE_LINE: usize = 64 << 10;

/// The measured fields of a large line, found by searching for them. The
/// load tables' and messages' padding is all `x`, so the first `"writer":`,
/// `"n":` and `"t":` are the row's (new, or old for a delete), and the
/// payload's head is the message's tag. Parsing a megabyte of JSON in this
/// process would take CPU from the database and the listener on the same
/// machine, which is what is being measured.
fn scan_large_line(line: &str) -> Option<Tag> {
    fn number_after<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
        let rest = &line[line.find(key)? + key.len()..];
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '-')).unwrap_or(rest.len());
        rest[..end].parse().ok()
    }
    if let Some(at) = line.find(r#""payload":""#) {
        return message_tag(&line[at + 11..]);
    }
    let op = match line.find(r#""op":""#).map(|at| &line[at + 6..]) {
        Some(rest) if rest.starts_with("UPDATE") => 1,
        Some(rest) if rest.starts_with("DELETE") => 2,
        _ => 0,
    };
    Some((number_after(line, r#""writer":"#)?, number_after(line, r#""n":"#)?, op, number_after(line, r#""t":"#)?))
}

/// What identifies and times one load event: writer, n, op (0 insert,
/// 1 update, 2 delete) and the writer's timestamp.
pub type Tag = (i32, i64, u8, i64);

/// The `writer:n:t:` head of a published load message (an insert).
fn message_tag(payload: &str) -> Option<Tag> {
    let mut parts = payload.splitn(4, ':');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, 0, parts.next()?.parse().ok()?))
}

/// The tag of one `listen --json` line: a row change's row (new, or old
/// for a delete), a message's `writer:n:t:` head, or a foreign notification
/// whose payload is a load row as JSON (the seed's trigger sends
/// `row_to_json(NEW)`). Only the fields measured are decoded.
pub fn line_tag(line: &str) -> Option<Tag> {
    if line.len() > LARGE_LINE {
        return scan_large_line(line);
    }
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
        #[serde(borrow)]
        payload: Option<&'a serde_json::value::RawValue>,
    }
    let parsed: Line<'_> = serde_json::from_str(line).ok()?;
    if let Some(p) = parsed.payload {
        let text = p.get();
        if text.starts_with('{') {
            let r: Row = serde_json::from_str(text).ok()?;
            return Some((r.writer, r.n, 0, r.t));
        }
        let s: std::borrow::Cow<'_, str> = serde_json::from_str(text).ok()?;
        return message_tag(&s);
    }
    let op = match parsed.op {
        Some("UPDATE") => 1,
        Some("DELETE") => 2,
        _ => 0,
    };
    parsed.new.or(parsed.old).map(|r| (r.writer, r.n, op, r.t))
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

    /// One event whose row (new, or old for a delete) carries writer, n, t,
    /// or a message whose payload starts `writer:n:t:`.
    pub fn record_value(&mut self, event: &Value, now: i64) {
        if let Some(payload) = event["payload"].as_str() {
            return self.record_tag(message_tag(payload), now);
        }
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
        self.record_tag(line_tag(line), now)
    }

    /// One event, identified by its tag if it had one.
    pub fn record_tag(&mut self, tag: Option<Tag>, now: i64) {
        match tag {
            Some((writer, n, op, t)) => self.record(writer, n, op, t, now),
            None => self.record_unparsed(now),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_lines_are_scanned_to_the_same_fields_as_parsing_finds() {
        let pad = "x".repeat(LARGE_LINE);
        let row = format!(
            r#"{{"received_at":"2026-11-21T20:42:19.048203Z","seq":9,"kind":"change","channel":"c","op":"UPDATE","schema":"s","table":"t0","key":{{"id":3}},"new":{{"id":3,"writer":1,"n":42,"t":1700000000000001,"pad":"{pad}"}},"old":{{"id":3,"writer":1,"n":42,"t":1700000000000000,"pad":"{pad}"}}}}"#
        );
        assert_eq!(scan_large_line(&row), Some((1, 42, 1, 1_700_000_000_000_001)));
        let message = format!(r#"{{"seq":9,"kind":"message","channel":"c","payload":"0:7:1700000000000002:{pad}"}}"#);
        assert_eq!(scan_large_line(&message), Some((0, 7, 0, 1_700_000_000_000_002)));
        assert_eq!(scan_large_line(&format!(r#"{{"seq":9,"payload":"{pad}"}}"#)), None);
        let mut probe = Probe::new();
        probe.record_line(&row, 1_700_000_000_000_101);
        probe.record_line(&message, 1_700_000_000_000_102);
        assert_eq!((probe.distinct(), probe.latency.max()), (2, 100));
    }
}
