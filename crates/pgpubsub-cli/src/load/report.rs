//! The load report: a table for people, JSON for machines, Markdown rows
//! for the README.

use serde::Serialize;

use super::receiver::Finished;
use super::workload::{Plan, Written};

/// One writes-only run (for trigger cost).
#[derive(Debug, Serialize)]
pub struct WriteRun {
    pub name: String,
    pub rows: u64,
    pub seconds: f64,
    pub writes_per_s: f64,
}

impl WriteRun {
    pub fn new(name: &str, w: &Written) -> Self {
        WriteRun { name: name.into(), rows: w.rows, seconds: w.elapsed.as_secs_f64(), writes_per_s: w.rate() }
    }
}

/// What one receiver achieved.
#[derive(Debug, Serialize, Default)]
pub struct ReceiverReport {
    pub received: u64,
    pub distinct: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub events_per_s: f64,
    /// From the first event received to the last.
    pub receive_seconds: f64,
    pub latency_ms: Latency,
    pub cpu_ms: f64,
    pub cpu_us_per_event: f64,
    pub peak_rss_mb: f64,
    /// Resident memory when the run ended (next to the peak: flat or not).
    pub end_rss_mb: f64,
    /// Payload bytes received per second (large-payload scenarios).
    pub payload_mb_per_s: f64,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Serialize, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub machine: String,
    pub postgres: String,
    pub writers: usize,
    pub batch: u64,
    pub payload_bytes: usize,
    pub channels: usize,
    pub rows: u64,
    pub events: u64,
    pub bytes_written: u64,
    pub write_seconds: f64,
    pub writes_per_s: f64,
    pub pgpubsub: Option<ReceiverReport>,
    pub baseline: Option<ReceiverReport>,
    /// pgpubsub ÷ baseline, where both ran.
    pub ratio_rate: Option<f64>,
    pub ratio_p99: Option<f64>,
    pub ratio_cpu_per_event: Option<f64>,
    pub queue_usage_peak: f64,
    pub write_runs: Vec<WriteRun>,
    pub bottleneck: String,
    #[serde(skip)]
    pub samples: Vec<(i64, u64)>,
}

pub(super) fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("{cores} cores, {mem_gib:.0} GiB")
}

impl Report {
    pub fn new(scenario: String, plan: &Plan, postgres: String) -> Self {
        Report {
            scenario,
            machine: machine(),
            postgres,
            writers: plan.writers,
            batch: plan.batch,
            payload_bytes: plan.payload,
            channels: plan.tables,
            rows: 0,
            events: 0,
            bytes_written: 0,
            write_seconds: 0.0,
            writes_per_s: 0.0,
            pgpubsub: None,
            baseline: None,
            ratio_rate: None,
            ratio_p99: None,
            ratio_cpu_per_event: None,
            queue_usage_peak: 0.0,
            write_runs: Vec::new(),
            bottleneck: String::new(),
            samples: Vec::new(),
        }
    }

    pub fn set_main(&mut self, w: &Written, f: Finished) {
        self.rows = w.rows;
        self.events = w.events;
        self.bytes_written = w.bytes;
        self.write_seconds = w.elapsed.as_secs_f64();
        self.writes_per_s = w.rate();
        self.queue_usage_peak = f.queue_peak;
        let payload = self.payload_bytes as f64;
        if let Some(m) = &f.pgpubsub {
            let p = &m.probe;
            let q = |x: f64| p.latency.value_at_quantile(x) as f64 / 1000.0;
            let cpu_ms = m.usage.cpu_ns as f64 / 1e6;
            self.pgpubsub = Some(ReceiverReport {
                received: p.received,
                distinct: p.distinct(),
                lost: w.events.saturating_sub(p.distinct()),
                duplicates: p.duplicates,
                events_per_s: p.rate(),
                receive_seconds: (p.last_us - p.first_us.unwrap_or(p.last_us)) as f64 / 1e6,
                latency_ms: Latency {
                    p50: q(0.5),
                    p90: q(0.9),
                    p99: q(0.99),
                    p999: q(0.999),
                    max: p.latency.max() as f64 / 1000.0,
                },
                cpu_ms,
                cpu_us_per_event: cpu_ms * 1000.0 / p.received.max(1) as f64,
                peak_rss_mb: m.usage.peak_rss as f64 / 1048576.0,
                end_rss_mb: m.usage.rss as f64 / 1048576.0,
                payload_mb_per_s: p.rate() * payload / 1048576.0,
            });
            self.samples = p.samples.clone();
        }
        if let Some(m) = &f.baseline {
            let s = m.summary.clone().unwrap_or_default();
            let num = |k: &str| s[k].as_f64().unwrap_or(0.0);
            let received = num("received") as u64;
            let cpu_ms = m.usage.cpu_ns as f64 / 1e6;
            let bytes = num("bytes");
            let span = received as f64 / num("rate").max(1e-9);
            self.baseline = Some(ReceiverReport {
                received,
                distinct: num("distinct") as u64,
                lost: 0,
                duplicates: num("duplicates") as u64,
                events_per_s: num("rate"),
                receive_seconds: span,
                latency_ms: Latency {
                    p50: num("p50_us") / 1000.0,
                    p90: num("p90_us") / 1000.0,
                    p99: num("p99_us") / 1000.0,
                    p999: num("p999_us") / 1000.0,
                    max: num("max_us") / 1000.0,
                },
                cpu_ms,
                cpu_us_per_event: cpu_ms * 1000.0 / received.max(1) as f64,
                peak_rss_mb: m.usage.peak_rss as f64 / 1048576.0,
                end_rss_mb: m.usage.rss as f64 / 1048576.0,
                payload_mb_per_s: if span > 0.0 { bytes / span / 1048576.0 } else { 0.0 },
            });
        }
        if let (Some(p), Some(b)) = (&self.pgpubsub, &self.baseline) {
            let ratio = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
            self.ratio_rate = ratio(p.events_per_s, b.events_per_s);
            self.ratio_p99 = ratio(p.latency_ms.p99, b.latency_ms.p99);
            self.ratio_cpu_per_event = ratio(p.cpu_us_per_event, b.cpu_us_per_event);
        }
        self.bottleneck = self.judge();
    }

    /// Where the limit was: if the listener kept pace with the writers, the
    /// writes (the database) were the bottleneck.
    fn judge(&self) -> String {
        let event_rate = self.events as f64 / self.write_seconds.max(1e-9);
        match (&self.pgpubsub, &self.baseline) {
            (Some(p), _) if p.lost > 0 => "events lost: see the listener's warnings".into(),
            // Only a baseline that parsed events (not chunks or references)
            // is comparable event for event.
            (Some(p), Some(b)) if b.distinct > 0 && p.events_per_s < 0.95 * b.events_per_s => {
                "the pgpubsub listener (slower than the bare baseline)".into()
            }
            (Some(p), _) if p.events_per_s >= 0.95 * event_rate => {
                "the writes (the database): the listener kept pace".into()
            }
            (Some(_), _) => "notification delivery (the listener received slower than rows were written)".into(),
            (None, Some(_)) => "the database's NOTIFY path (raw pg_notify, no pgpubsub)".into(),
            (None, None) => "n/a".into(),
        }
    }

    pub fn lost(&self) -> u64 {
        self.pgpubsub.as_ref().map_or(0, |p| p.lost)
    }

    /// The human summary.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let w = |o: &mut String, k: &str, v: String| o.push_str(&format!("{k:<34} {v}\n"));
        w(&mut o, "scenario", format!("{} ({}; PostgreSQL {})", self.scenario, self.machine, self.postgres));
        w(
            &mut o,
            "writers × batch × payload",
            format!("{} × {} rows × {} B, {} channel(s)", self.writers, self.batch, self.payload_bytes, self.channels),
        );
        w(
            &mut o,
            "rows written",
            format!(
                "{} ({} events, {:.1} MB) in {:.2} s",
                self.rows,
                self.events,
                self.bytes_written as f64 / 1e6,
                self.write_seconds
            ),
        );
        w(&mut o, "writes/s", format!("{:.0}", self.writes_per_s));
        for r in &self.write_runs {
            w(&mut o, &format!("writes/s, {}", r.name), format!("{:.0}", r.writes_per_s));
        }
        for (name, r) in [("pgpubsub listen --json", &self.pgpubsub), ("baseline (bare LISTEN)", &self.baseline)] {
            let Some(r) = r else { continue };
            o.push_str(&format!("\n{name}\n"));
            w(
                &mut o,
                "  received (distinct, lost, dup)",
                format!("{} ({}, {}, {})", r.received, r.distinct, r.lost, r.duplicates),
            );
            w(&mut o, "  events/s", format!("{:.0} (in {:.2} s)", r.events_per_s, r.receive_seconds));
            let l = &r.latency_ms;
            w(
                &mut o,
                "  latency ms p50/p90/p99/p99.9/max",
                format!("{:.2} / {:.2} / {:.2} / {:.2} / {:.2}", l.p50, l.p90, l.p99, l.p999, l.max),
            );
            w(&mut o, "  CPU", format!("{:.0} ms, {:.2} µs/event", r.cpu_ms, r.cpu_us_per_event));
            w(&mut o, "  memory peak / at end", format!("{:.1} / {:.1} MB", r.peak_rss_mb, r.end_rss_mb));
            if r.payload_mb_per_s > 0.0 && self.payload_bytes > 4096 {
                w(&mut o, "  payload MB/s", format!("{:.1}", r.payload_mb_per_s));
            }
        }
        o.push('\n');
        if let (Some(a), Some(b), Some(c)) = (self.ratio_rate, self.ratio_p99, self.ratio_cpu_per_event) {
            w(&mut o, "pgpubsub ÷ baseline", format!("rate {a:.3}, p99 {b:.2}, CPU/event {c:.2}"));
        }
        w(&mut o, "NOTIFY queue usage, peak", format!("{:.4}%", self.queue_usage_peak * 100.0));
        w(&mut o, "bottleneck", self.bottleneck.clone());
        o
    }

    /// Rows for the README's performance table.
    pub fn markdown(&self) -> String {
        let p = self.pgpubsub.as_ref();
        let b = self.baseline.as_ref();
        let f = |v: Option<f64>, d: usize| v.map_or("–".into(), |x| format!("{x:.d$}"));
        format!(
            "| {} | {}×{}×{} B | {} | {:.1} | {:.1} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            self.scenario,
            self.writers,
            self.batch,
            self.payload_bytes,
            self.rows,
            self.bytes_written as f64 / 1e6,
            self.write_seconds,
            f(p.or(b).map(|r| r.receive_seconds), 1),
            self.writes_per_s,
            f(p.map(|r| r.events_per_s), 0),
            // A baseline that could not parse events counted notifications.
            b.map_or("–".into(), |r| if r.distinct > 0 {
                format!("{:.0}", r.events_per_s)
            } else {
                format!("({:.0} notifications)", r.events_per_s)
            }),
            f(p.map(|r| r.payload_mb_per_s).or(b.map(|r| r.payload_mb_per_s)).filter(|_| self.payload_bytes > 4096), 1),
            f(p.map(|r| r.latency_ms.p99), 2),
            f(b.filter(|r| r.distinct > 0).map(|r| r.latency_ms.p99), 2),
            f(p.map(|r| r.cpu_us_per_event), 2),
            f(b.filter(|r| r.distinct > 0).map(|r| r.cpu_us_per_event), 2),
            f(p.map(|r| r.peak_rss_mb), 1),
            p.map_or("–".into(), |r| r.lost.to_string()),
            self.bottleneck,
        )
    }
}
