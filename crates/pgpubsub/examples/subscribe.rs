//! Subscribe to a table's changes from Rust, with rows as your own types.
//!
//! ```sh
//! cargo run -p pgpubsub --example subscribe
//! ```
//! then, in psql: `INSERT INTO todo (title) VALUES ('write docs');`
//! (it also writes two rows itself, so it shows something on its own).
//! Uses `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).

use pgpubsub::{Channel, Listener, ListenerOptions, Op};
use serde::Deserialize;

/// A row of the example table.
#[derive(Debug, Deserialize)]
struct Todo {
    id: i64,
    title: String,
    done: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| pgpubsub::db::DEFAULT_DATABASE_URL.into());
    let config = pgpubsub::db::parse_config(&url)?;
    let mut client = pgpubsub::db::connect(&config).await?;

    // Install the schema (idempotent) and watch the table.
    pgpubsub::migrate::up(&mut client, false).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS todo (
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 title text NOT NULL,
                 done boolean NOT NULL DEFAULT false)",
        )
        .await?;
    let channel: Channel = pgpubsub::watch(&client, "todo", None).await?;

    let mut listener = Listener::connect(&config, std::slice::from_ref(&channel), ListenerOptions::default()).await?;
    println!("listening on {channel}; Ctrl-C to stop");

    client
        .batch_execute("INSERT INTO todo (title) VALUES ('try pgpubsub'); UPDATE todo SET done = true WHERE title = 'try pgpubsub';")
        .await?;
    pgpubsub::publish(&client, &channel, "messages share the channel").await?;

    while let Some(event) = listener.recv().await {
        let event = event?;
        let seq = event.seq.unwrap_or_default();
        if let Some(change) = event.change() {
            // The row after the change, or before it for a delete.
            let row = match change.op {
                Op::Delete => change.old_as::<Todo>()?,
                _ => change.new_as::<Todo>()?,
            };
            if let Some(Todo { id, title, done }) = row {
                println!("#{seq} {} todo {id}: {title:?} done={done}", change.op.as_str());
            }
        } else if let Some(message) = event.message() {
            println!("#{seq} message: {}", message.payload);
        }
    }
    Ok(())
}
