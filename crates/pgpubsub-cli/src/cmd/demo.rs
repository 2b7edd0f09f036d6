//! `pgpubsub demo`: the whole flow once, on the configured database.
//!
//! Migrates (with the seed's `job` example), watches a demo table, starts a
//! listener, writes rows (insert, update, delete, one row too large for a
//! single notification), publishes a message, runs the seed's job flow, and
//! prints every event as `listen` would. Fails if any event does not arrive.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use pgpubsub::db::Config;
use pgpubsub::{Channel, Listener, ListenerOptions};

use crate::output::{self, Style};

const TABLE: &str = "public.pgpubsub_demo";

/// Runs the demo; an error if an expected event is missing.
pub async fn run(config: &Config, debug: bool) -> anyhow::Result<()> {
    let mut client = super::connect(config).await?;
    let applied = pgpubsub::migrate::up(&mut client, true).await.context("migrating")?;
    eprintln!("== migrated ({} new steps) on {}", applied.len(), pgpubsub::db::describe(config));

    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS public.pgpubsub_demo (
                 id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 name text NOT NULL,
                 note text)",
        )
        .await
        .context("creating the demo table")?;
    let demo = pgpubsub::watch(&client, TABLE, None).await.context("watching the demo table")?;
    let job = Channel::new("job_channel")?;
    eprintln!("== watching {TABLE} on channel {demo}; the seed's job table notifies {job}");

    let mut listener = Listener::connect(config, &[demo.clone(), job], ListenerOptions::default()).await?;

    eprintln!("== writing: 3 inserts, 1 update, 1 delete, 1 row of 20 kB, 1 message, 1 job inserted and updated");
    client
        .batch_execute(
            "INSERT INTO public.pgpubsub_demo (name) VALUES ('ada'), ('grace'), ('edsger');
             UPDATE public.pgpubsub_demo SET name = 'Ada Lovelace' WHERE id = (SELECT min(id) FROM public.pgpubsub_demo);
             DELETE FROM public.pgpubsub_demo WHERE id = (SELECT max(id) FROM public.pgpubsub_demo);
             INSERT INTO public.pgpubsub_demo (name, note) VALUES ('big', repeat('ünïcödé ', 2500));",
        )
        .await
        .context("writing demo rows")?;
    pgpubsub::publish(&client, &demo, "hello from pgpubsub").await?;
    client
        .batch_execute(
            "INSERT INTO public.job (status) VALUES ('queued');
             UPDATE public.job SET status = 'done' WHERE id = (SELECT max(id) FROM public.job);",
        )
        .await
        .context("running the job example")?;

    let expected = 9;
    let style = if debug { Style::Pretty } else { Style::Line };
    let mut out = std::io::stdout().lock();
    let mut received = 0;
    while received < expected {
        let next = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await;
        let event = match next {
            Ok(Some(event)) => event?,
            Ok(None) => bail!("the listener stopped after {received} of {expected} events"),
            Err(_) => bail!("only {received} of {expected} events arrived within 10 s"),
        };
        output::write_event(&mut out, &event, style, None)?;
        received += 1;
    }
    out.flush()?;
    let s = listener.stats().snapshot();
    eprintln!(
        "== {received} of {expected} events received ({} notifications, {} of them chunks)",
        s.notifications, s.chunks
    );
    eprintln!("== next: `pgpubsub listen --channel {demo}` in one terminal, and in psql:");
    eprintln!("   INSERT INTO {TABLE} (name) VALUES ('you');");
    Ok(())
}
