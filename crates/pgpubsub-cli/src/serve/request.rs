//! What a subscriber asks for (channels, filters, where to resume), from a
//! query string or a WebSocket's first message, checked against what the
//! server serves and what the token may read.

use pgpubsub::{Channel, Cursor, Filter, Op};
use serde_json::Value;

use super::auth::Claims;
use super::error::ApiError;
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
    pub columns: serde_json::Map<String, Value>,
    pub since: Option<String>,
    /// WebSocket only: the token, when not sent as a header or cookie.
    pub token: Option<String>,
    /// WebSocket only: first answer `{"type": "subscribed", "id": <resume>}`
    /// once subscribed, so a client knows where it stands before any event.
    #[serde(default)]
    pub ack: bool,
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
                    r.columns.insert(col.to_string(), val);
                }
                "since" => r.since = Some(v.into_owned()),
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

    /// The filter and resume point, checked against what this server serves.
    pub fn resolve(
        self,
        state: &AppState,
        claims: &Claims,
        last_event_id: Option<&str>,
    ) -> Result<(Filter, Option<Cursor>), ApiError> {
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
        let since = self.since.as_deref().or(last_event_id).map(str::parse::<Cursor>).transpose();
        let since = since.map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut filter = Filter::channels(channels);
        filter.table = self.table;
        filter.ops = ops;
        filter.columns = self.columns.into_iter().collect();
        Ok((filter, since))
    }
}
