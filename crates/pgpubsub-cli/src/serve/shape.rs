//! Shapes in the gateway (`pgpubsub::shape`): a subscription to a table's
//! rows that match a filter, with some columns, first as a snapshot then
//! as changes, handed over exactly.
//!
//! A request is a shape when it has `filter`, `columns` or `snapshot`
//! beside its `table`. The table must be watched into the log; its channel
//! must be served and readable with the token, as for any subscription.
//! Snapshots are read on connections of their own, at most
//! [`SNAPSHOTS_AT_ONCE`] at a time (a crowd opening shapes waits its turn
//! rather than exhausting the server's connections).

use std::sync::Arc;

use pgpubsub::db::Config;
use pgpubsub::shape::{Filter, Shape, ShapeError, Snapshotting};
use pgpubsub::Viewer;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::Claims;
use super::error::ApiError;
use super::AppState;

/// Snapshots read at once; more wait.
pub const SNAPSHOTS_AT_ONCE: usize = 4;

/// What a subscriber asks of a shape.
#[derive(Debug, Default, Clone)]
pub struct Ask {
    /// The filter (text or JSON form), if any.
    pub filter: Option<Filter>,
    /// The columns to send, if not all.
    pub columns: Option<Vec<String>>,
    /// Send the rows first.
    pub snapshot: bool,
}

impl Ask {
    /// The filter in its text form (`status = 'paid'`) or, in a WebSocket
    /// request, its JSON form.
    pub fn filter(value: &Value) -> Result<Filter, ApiError> {
        let parsed = match value {
            // A query string carries either form: JSON when it is an object.
            Value::String(text) if text.trim_start().starts_with('{') => Filter::from_json(text),
            Value::String(text) => Filter::parse(text),
            other => Filter::from_json(&other.to_string()),
        };
        parsed.map_err(|e| ApiError::BadRequest(format!("filter: {e}")))
    }
}

/// The shape of `table` asked for, resolved against the catalog and
/// checked against the token: its channel must be served and readable.
pub async fn resolve(state: &AppState, claims: &Claims, table: &str, ask: &Ask) -> Result<Arc<Shape>, ApiError> {
    if state.source.is_some() {
        return Err(ApiError::BadRequest(
            "shapes are served by gateways that read the log (not --source nats): the snapshot and the log must be one database's"
                .into(),
        ));
    }
    let log = state.db.pick();
    let (filter, columns) = (ask.filter.clone(), ask.columns.clone());
    let table = table.to_string();
    let shape = log
        .run("reading a shape's table", |c| async move {
            match Shape::resolve(&c, &table, filter.as_ref(), columns.as_deref()).await {
                Ok(s) => Ok(Ok(s)),
                Err(ShapeError::Db(e)) => Err(e),
                Err(other) => Ok(Err(other)),
            }
        })
        .await?
        .map_err(refused)?;
    if !state.served.allows(&shape.channel) {
        return Err(ApiError::Forbidden(format!(
            "channel {} (of table {}) is not served here",
            shape.channel, shape.table
        )));
    }
    if !claims.can_read(&shape.channel) {
        return Err(ApiError::Forbidden(format!(
            "this token may not read channel {} (of table {})",
            shape.channel, shape.table
        )));
    }
    Ok(Arc::new(shape))
}

/// A shape's error as the subscriber's answer.
pub fn refused(e: ShapeError) -> ApiError {
    match e {
        ShapeError::Db(e) if pgpubsub::views::refused(&e) => ApiError::Forbidden(format!("{e}")),
        ShapeError::Db(e) => ApiError::from(e),
        ShapeError::Unreadable(_) => ApiError::Forbidden(e.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    }
}

/// Where snapshots are read: connections of their own, a few at a time.
pub struct Snapshots {
    config: Config,
    permits: Arc<Semaphore>,
}

impl Snapshots {
    /// Snapshots of the database `config` names.
    pub fn new(config: &Config) -> Snapshots {
        Snapshots { config: pgpubsub::db::tuned(config), permits: Arc::new(Semaphore::new(SNAPSHOTS_AT_ONCE)) }
    }

    /// Starts reading `shape`'s snapshot as `viewer`, once a place is free.
    ///
    /// # Errors
    /// [`ShapeError`] when it cannot begin: no connection, a role that
    /// cannot be taken, a filter on a column the role may not read.
    pub async fn read(&self, shape: &Arc<Shape>, viewer: Option<Viewer>) -> Result<Reading, ShapeError> {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let client = pgpubsub::db::connect(&self.config).await?;
        Ok(Reading { parts: shape.snapshot(client, viewer).await?, _permit: permit })
    }
}

/// A snapshot being read, holding its place.
pub struct Reading {
    pub parts: Snapshotting,
    _permit: OwnedSemaphorePermit,
}
