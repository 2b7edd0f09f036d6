//! The report as a Markdown table.

use super::{Options, RunReport, Target};

/// The report as a Markdown table, with what its columns mean.
pub(super) fn table(reports: &[RunReport], opts: &Options, payload: usize, postgres: &str) -> String {
    let f = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |x| format!("{x:.d$}"));
    let mut o = format!(
        "single-row writers, {} per run, {} round(s) ({}; PostgreSQL {postgres}){}\n\n\
         | writers | table | writes/s | vs plain | delivered | p50 ms | p99 ms | listener CPU µs/event | DB CPU µs/write | machine CPU µs/write | SSE delivered | capture CPU µs/event | slot lag at end |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        humantime::format_duration(opts.per_run),
        opts.rounds.max(1),
        crate::load::report::machine(),
        if opts.pin { "; pinned: PostgreSQL and the writers on CPU 0, pgpubsub's processes on CPU 1" } else { "" },
    );
    for r in reports {
        let name = match r.target {
            Target::Insert | Target::Publish | Target::PublishWal => format!("{} ({payload} B)", r.target.name()),
            t => t.name().to_string(),
        };
        o.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.writers,
            name,
            r.writes_per_s,
            ratio(r),
            r.delivered.map_or("–".into(), |d| format!("{d}/{}", r.rows)),
            f(r.p50_ms, 2),
            f(r.p99_ms, 2),
            f(r.listener_cpu_us_per_event, 1),
            f(r.db_cpu_us_per_write, 1),
            f(r.machine_cpu_us_per_write, 1),
            r.sse_delivered.map_or("–".into(), |d| format!("{d}/{}", r.rows)),
            f(r.capture_cpu_us_per_event, 1),
            r.slot_lag_bytes.map_or("–".into(), |b| format!("{b} B")),
        ));
    }
    o.push_str(
        "\nvs plain: writes/s ÷ the plain table's at the same writer count in the same round (publish: ÷ insert of \
         the same text); with several rounds, writes/s and ratio are medians, the range in brackets.\n\
         wal: watched through the WAL (no trigger); `pgpubsub capture` appends it to the log, and runs for its runs \
         only (no other run has a slot consumer); the listener reads the log, as does an SSE subscriber of \
         `pgpubsub serve` (SSE delivered).\n\
         seed: the seed's NOTIFY trigger; its notifications reach the listener as foreign (kind notify).\n\
         Latency: the writer's clock as it sent the row, to the line the listener printed.\n\
         DB CPU: this database's backends and the server's background processes (/proc); \
         machine CPU: every process, the writers and the listener included.\n",
    );
    o
}

/// The median ratio, with the range over rounds when there were several.
pub(super) fn ratio(r: &RunReport) -> String {
    let lo = r.ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if r.ratios.len() > 1 && r.target != r.target.baseline() {
        format!("{:.2} ({lo:.2}–{hi:.2})", r.ratio)
    } else {
        format!("{:.2}", r.ratio)
    }
}
