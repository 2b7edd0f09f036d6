//! What a subscriber asks for (channels, filters, where to resume), from a
//! query string or a WebSocket's first message, checked against what the
//! server serves and what the token may read.

use pgpubsub::shape::Position;
use pgpubsub::{Channel, Filter, Op};
use serde_json::Value;

use super::auth::Claims;
use super::error::ApiError;
use super::shape::Ask;
use super::AppState;

/// What a subscriber asks for: channels, filters, and where to resume.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub channels: Vec<String>,
    pub table: Option<String>,
    #[serde(default)]
    pub ops: Vec<String>,
    /// Column equality: `{"status": "done"}`.
    #[serde(default, rename = "where")]
    pub columns_eq: serde_json::Map<String, Value>,
    pub since: Option<String>,
    /// WebSocket only: the token, when not sent as a header or cookie.
    pub token: Option<String>,
    /// WebSocket only: first answer `{"type": "subscribed", "id": <resume>}`
    /// once subscribed, so a client knows where it stands before any event.
    #[serde(default)]
    pub ack: bool,
    /// A shape's filter: its text form, or (WebSocket) its JSON form.
    pub filter: Option<Value>,
    /// A shape's columns (the key's are always sent).
    pub columns: Option<Vec<String>>,
    /// A shape: send its rows first (unless resuming with `since`).
    #[serde(default)]
    pub snapshot: bool,
}

/// A request checked: the hub's filter, where to resume, and the shape
/// asked for (its table and what of it), if any.
#[derive(Debug)]
pub struct Resolved {
    pub filter: Filter,
    pub since: Option<Position>,
    pub shape: Option<(String, Ask)>,
}

impl Request {
    /// From `?channel=a&channel=b&table=t&op=INSERT&where=col:value&since=…`.
    pub fn from_query(query: Option<&str>) -> Result<Request, ApiError> {
        let mut r = Request::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*k {
                "channel" => r.channels.extend(v.split(',').map(str::to_string)),
                "table" => r.table = Some(v.into_owned()),
                "op" => r.ops.push(v.into_owned()),
                "where" => {
                    let (col, val) = v
                        .split_once(':')
                        .ok_or_else(|| ApiError::BadRequest(format!("where={v}: expected column:value")))?;
                    // A JSON value when it parses as one ("5", "true", "\"x\""), text otherwise.
                    let val = serde_json::from_str(val).unwrap_or_else(|_| Value::String(val.to_string()));
                    r.columns_eq.insert(col.to_string(), val);
                }
                "since" => r.since = Some(v.into_owned()),
                "filter" => r.filter = Some(Value::String(v.into_owned())),
                "columns" => {
                    r.columns.get_or_insert_with(Vec::new).extend(v.split(',').filter(|c| !c.is_empty()).map(str::to_string))
                }
                "snapshot" => {
                    r.snapshot = match &*v {
                        "" | "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(ApiError::BadRequest(format!("snapshot={v}: expected true or false"))),
                    }
                }
                "token" | "access_token" | "jwt" => {
                    return Err(ApiError::BadRequest(
                        "tokens never travel in the URL (it ends up in logs): use the Authorization header or the pgpubsub_token cookie".into(),
                    ))
                }
                other => return Err(ApiError::BadRequest(format!("unknown parameter {other:?}"))),
            }
        }
        Ok(r)
    }

    /// The filter and resume point, checked against what this server
    /// serves; a shape's table is checked by `super::shape::resolve`.
    pub fn resolve(self, state: &AppState, claims: &Claims, last_event_id: Option<&str>) -> Result<Resolved, ApiError> {
        let since = self.since.as_deref().or(last_event_id).map(str::parse::<Position>).transpose();
        let since = since.map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if self.filter.is_some() || self.columns.is_some() || self.snapshot {
            let table = self.table.clone().ok_or_else(|| {
                ApiError::BadRequest("filter, columns and snapshot make a shape of a table: name it with table".into())
            })?;
            if !self.channels.is_empty() || !self.columns_eq.is_empty() || !self.ops.is_empty() {
                return Err(ApiError::BadRequest(
                    "a shape is a table, a filter and columns: its channel is its table's, and filter replaces where and op"
                        .into(),
                ));
            }
            let filter = self.filter.as_ref().map(Ask::filter).transpose()?;
            let ask = Ask { filter, columns: self.columns, snapshot: self.snapshot };
            let mut filter = Filter::channels(Vec::<String>::new());
            filter.table = Some(table.clone());
            return Ok(Resolved { filter, since, shape: Some((table, ask)) });
        }
        let mut channels = Vec::new();
        for name in self.channels {
            let c = Channel::new(name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            if !state.served.allows(c.as_str()) {
                return Err(ApiError::Forbidden(format!("channel {c} is not served here")));
            }
            if !claims.can_read(c.as_str()) {
                return Err(ApiError::Forbidden(format!("this token may not read channel {c}")));
            }
            channels.push(c.as_str().to_string());
        }
        if channels.is_empty() {
            // Every channel served that the token may read: all of them when
            // both say "all"; else the plain names of either list.
            let everything = state.served.all() && claims.can_read_all();
            if !everything {
                let names = state.served.names().map(|n| n.iter().map(|c| c.as_str().to_string()).collect());
                let names = names.or_else(|| claims.readable_names()).ok_or_else(|| {
                    ApiError::BadRequest(
                        "name the channels to subscribe to (the channels served or readable are patterns)".into(),
                    )
                })?;
                channels = names.into_iter().filter(|c| state.served.allows(c) && claims.can_read(c)).collect();
                if channels.is_empty() {
                    return Err(ApiError::Forbidden("this token may read none of the served channels".into()));
                }
            }
        }
        let mut ops = Vec::new();
        for op in self.ops {
            let parsed = serde_json::from_value::<Op>(Value::String(op.to_uppercase()))
                .map_err(|_| ApiError::BadRequest(format!("op {op:?}: expected INSERT, UPDATE, DELETE or TRUNCATE")))?;
            ops.push(parsed);
        }
        let mut filter = Filter::channels(channels);
        filter.table = self.table;
        filter.ops = ops;
        filter.columns = self.columns_eq.into_iter().collect();
        Ok(Resolved { filter, since, shape: None })
    }
}
