//! Capture from the WAL in `/metrics`: what every gateway can see of the
//! capturers' replication slots (the WAL each keeps, so a capturer that is
//! gone is noticed before the disk fills), and with `--capture` the
//! capturer's own counters.

use std::sync::atomic::Ordering;

use super::AppState;

/// Sets the capture gauges and counters, read now. A database that cannot
/// be asked leaves the last values.
pub async fn record(state: &AppState) {
    if let Some(c) = &state.capture {
        let s = c.snapshot();
        for (name, help, value) in [
            ("pgpubsub_capture_events_total", "Events the capturer appended to the log.", s.events),
            ("pgpubsub_capture_batches_total", "Appends (transactions) of the capturer.", s.batches),
            ("pgpubsub_capture_resets_total", "Invalidated slots re-created (each a resync in the log).", s.resets),
            ("pgpubsub_capture_reconnects_total", "Capture sessions replaced after a failure.", s.reconnects),
        ] {
            metrics::describe_counter!(name, help);
            metrics::counter!(name).absolute(value);
        }
        metrics::describe_gauge!("pgpubsub_capture_active", "1 while this process's capturer streams the slot.");
        metrics::gauge!("pgpubsub_capture_active").set(c.active.load(Ordering::Relaxed) as f64);
        metrics::describe_gauge!(
            "pgpubsub_capture_lag_seconds",
            "Commit to append, for the newest event of the last batch."
        );
        metrics::gauge!("pgpubsub_capture_lag_seconds").set(s.lag_us as f64 / 1e6);
    }
    let Ok(client) = state.db.pick().client().await else { return };
    let Ok(Ok(slots)) =
        tokio::time::timeout(std::time::Duration::from_secs(2), pgpubsub::capture::slots(&client)).await
    else {
        return;
    };
    metrics::describe_gauge!(
        "pgpubsub_capture_slot_retained_bytes",
        "WAL kept by a pgpubsub replication slot (grows while no capturer reads it)."
    );
    metrics::describe_gauge!("pgpubsub_capture_slot_active", "1 while a capturer streams the slot.");
    for slot in slots {
        metrics::gauge!("pgpubsub_capture_slot_retained_bytes", "slot" => slot.name.clone())
            .set(slot.retained_bytes as f64);
        metrics::gauge!("pgpubsub_capture_slot_active", "slot" => slot.name).set(f64::from(u8::from(slot.active)));
    }
}
