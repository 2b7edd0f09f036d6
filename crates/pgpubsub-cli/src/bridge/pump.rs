//! The active bridge's loop: events from the listener into the outbox,
//! the cursor stored only when JetStream acknowledged everything before it.

use std::time::Instant;

use anyhow::{bail, Context};
use pgpubsub::Listener;

use super::lock::Lock;
use super::metrics::BridgeStats;
use super::outbox::{Outbox, Prepared};
use super::{stopped, Ctx, Exit, Fatal, OWED_MAX, OWED_POLL, SAVE_EVERY, STOP_GRACE};

/// Copies events until the lock is lost or the bridge is told to stop.
///
/// The cursor. `Listener::save` stores a position that counts as handled
/// every event returned before the last `recv`/`try_recv` call. So the
/// bridge may call `save` only at a moment when *every* event returned so
/// far is acknowledged by JetStream, and it makes such moments: it reads
/// events only while there is room in the window, and it saves only with
/// nothing in flight. With events in flight it may read on (the cursor
/// moves in memory) but never saves; when a store falls due (every
/// `SAVE_EVERY`, if the cursor moved) it stops reading until the window is
/// empty, then saves. While JetStream does not acknowledge, the bridge
/// waits on the oldest event and reads nothing more.
///
/// A store is owed while some acknowledged event lies above the stored
/// cursor. With nothing in flight and nothing ready, the bridge then saves
/// at once if the listener's cursor already covers every acknowledged
/// event (one store settles it: the end of a catch-up page, or a burst
/// followed by a fence), else every `SAVE_EVERY` as the cursor moves;
/// meanwhile it polls with `try_recv` rather than block in `recv`, so that
/// the store is not left waiting for the next event. The listener's cursor
/// moves on its fences (about once a second), which `try_recv` processes.
/// But `try_recv` does not read the log: when the listener has been
/// reading the log (its `polls` or `resyncs` counters moved since the last
/// blocking `recv`) and one store does not settle the debt, the bridge
/// stores what it can and blocks in `recv` at once, so the next page is
/// read; it also gives up polling after `OWED_MAX` (a transaction held open
/// keeps the cursor back). So an idle bridge's stored cursor normally
/// covers everything acknowledged within about a heartbeat. The exception:
/// a catch-up that ends exactly on a full page leaves its last event
/// covered only in memory until the next event arrives.
///
/// A crash therefore re-sends what was returned after the stored cursor:
/// up to `SAVE_EVERY` plus about a heartbeat of events (more behind a long
/// transaction). JetStream drops them by their `Nats-Msg-Id` as long as
/// they were first sent within the duplicate window.
pub(super) async fn pump(
    ctx: &Ctx<'_>,
    lock: &Lock,
    mut listener: Listener,
    mut outbox: Outbox,
    source: &str,
) -> anyhow::Result<Exit> {
    let mut saved = listener.cursor();
    let mut acked = saved;
    let mut last_save = Instant::now();
    let stats = listener.stats();
    // Gaps and replayed events as of the last blocking `recv`; more since:
    // the listener is (or was) reading the log, which `try_recv` does not.
    let reading_log = |s: pgpubsub::StatsSnapshot| (s.polls, s.resyncs);
    let mut seen = reading_log(stats.snapshot());
    let mut polling_since: Option<Instant> = None;
    let mut stopping: Option<Instant> = None;
    let mut take_state = TakeState::default();
    loop {
        if lock.is_lost() {
            return Ok(Exit::LockLost);
        }
        if stopping.is_none() && *ctx.stop.borrow() {
            stopping = Some(Instant::now() + STOP_GRACE);
        }
        let owed = acked > saved;
        let save_due = owed && last_save.elapsed() >= SAVE_EVERY && listener.cursor() > saved;
        // 1. Take what is ready now, while there is room.
        if !save_due && stopping.is_none() {
            while outbox.has_room() {
                let Some(item) = listener.try_recv() else { break };
                take(ctx, &mut outbox, Some(item), source, &mut take_state).await?;
            }
        }
        // 2. Wait for the oldest acknowledgement.
        if outbox.in_flight() > 0 {
            let confirmed = match stopping {
                None => tokio::select! {
                    confirmed = outbox.confirm_oldest() => confirmed,
                    () = lock.lost() => return Ok(Exit::LockLost),
                    () = stopped(&ctx.stop) => Vec::new(),
                },
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, outbox.confirm_oldest()).await {
                        Ok(confirmed) => confirmed,
                        Err(_) => {
                            tracing::warn!(
                                in_flight = outbox.in_flight(),
                                "stopping with events unacknowledged; the next bridge sends them again"
                            );
                            return Ok(Exit::Stopped);
                        }
                    }
                }
            };
            acked = confirmed.into_iter().fold(acked, Ord::max);
            continue;
        }
        // 3. Nothing in flight: every event returned so far is in JetStream.
        if stopping.is_some() {
            BridgeStats::bump(&ctx.stats.saves);
            listener.close().await.context("storing the cursor")?;
            return Ok(Exit::Stopped);
        }
        if owed {
            let cursor = listener.cursor();
            let settles = cursor >= acked;
            let catch_up_waits = reading_log(stats.snapshot()) != seen;
            let polled_enough = polling_since.get_or_insert_with(Instant::now).elapsed() >= OWED_MAX;
            let give_up = catch_up_waits || polled_enough;
            let mut failed = false;
            // Between catch-up pages a store is only made when due.
            if cursor > saved && (settles || polled_enough || last_save.elapsed() >= SAVE_EVERY) {
                if lock.is_lost() {
                    return Ok(Exit::LockLost);
                }
                match listener.save().await {
                    Ok(()) => {
                        BridgeStats::bump(&ctx.stats.saves);
                        saved = cursor;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not store the cursor; will retry");
                        failed = true;
                    }
                }
                last_save = Instant::now();
            }
            if failed || (!settles && !give_up) {
                tokio::select! {
                    () = tokio::time::sleep(if failed { SAVE_EVERY } else { OWED_POLL }) => {}
                    () = lock.lost() => return Ok(Exit::LockLost),
                    () = stopped(&ctx.stop) => {}
                }
                continue;
            }
            if settles {
                continue;
            }
        }
        // 4. Nothing in flight, nothing ready, nothing owed (or a catch-up
        // waits, or polling gave up): wait for the next event. Everything
        // returned so far is acknowledged, so while it waits the listener
        // may store its cursor by itself (its position moves as it reads).
        listener.set_autosave(true);
        let item = tokio::select! {
            item = listener.recv() => item,
            () = lock.lost() => return Ok(Exit::LockLost),
            () = stopped(&ctx.stop) => continue,
        };
        listener.set_autosave(false);
        seen = reading_log(stats.snapshot());
        polling_since = None;
        take(ctx, &mut outbox, item, source, &mut take_state).await?;
    }
}

/// What [`take`] remembers between events.
#[derive(Default)]
struct TakeState {
    warned_foreign: bool,
    /// The server's max_payload, read again after each disconnection (the
    /// client may be on another server).
    max_payload: Option<(u64, usize)>,
}

/// Publishes one item from the listener (or counts why not).
async fn take(
    ctx: &Ctx<'_>,
    outbox: &mut Outbox,
    item: Option<pgpubsub::Result<pgpubsub::Event>>,
    source: &str,
    state: &mut TakeState,
) -> anyhow::Result<()> {
    let event = match item {
        None => bail!("the listener stopped"),
        Some(Ok(event)) => event,
        Some(Err(pgpubsub::Error::ResyncNeeded { cursor, pruned })) => {
            BridgeStats::bump(&ctx.stats.resyncs);
            tracing::error!(%cursor, %pruned,
                "RESYNC NEEDED: events were pruned from the log before the bridge copied them; going on from the oldest kept");
            return Ok(());
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "listener reported an error; going on");
            return Ok(());
        }
    };
    let Some(msg) = Prepared::new(&event, &ctx.args.subject_prefix, source) else {
        BridgeStats::bump(&ctx.stats.skipped_foreign);
        if !state.warned_foreign {
            tracing::warn!(channel = %event.channel,
                "a foreign notification (not in the log, no seq) is not copied; counted in pgpubsub_bridge_skipped_foreign_total");
            state.warned_foreign = true;
        }
        return Ok(());
    };
    let connection = *ctx.disconnections.borrow();
    let max_payload = match state.max_payload {
        Some((on, max)) if on == connection && max > 0 => max,
        _ => {
            let max = ctx.client.server_info().max_payload;
            state.max_payload = Some((connection, max));
            max
        }
    };
    if max_payload > 0 && msg.size > max_payload {
        if ctx.args.skip_oversize {
            BridgeStats::bump(&ctx.stats.skipped_oversize);
            tracing::warn!(seq = msg.seq, bytes = msg.size, max_payload, "event larger than NATS max_payload skipped");
            return Ok(());
        }
        return Err(Fatal(format!(
            "event {} is {} bytes, more than the NATS server's max_payload ({max_payload}); \
             raise max_payload on the server or run with --skip-oversize",
            msg.seq, msg.size
        ))
        .into());
    }
    outbox.publish(msg).await;
    Ok(())
}
