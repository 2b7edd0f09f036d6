//! One event as the log stores it, and how it becomes the JSON delivered:
//! a large published message keeps its payload apart and unescaped, and is
//! rendered here, byte for byte as `pubsub.event_json` renders it in SQL.

use super::json_string;
use crate::error::Result;
use crate::event::Event;

/// One event as the log stores it. A large published message keeps its
/// payload apart and unescaped (escaping in PostgreSQL costs more than the
/// rest of publishing a megabyte); its JSON is rendered here, byte for byte
/// what `pubsub.event_json` renders in SQL (docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    body: String,
    payload: Option<String>,
}

/// Why a logged event could not be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreadable {
    /// Its JSON is over the size limit (the bytes it would take).
    TooLarge(u64),
    /// It is not one of our events: not JSON, or a payload apart whose body
    /// is not a message envelope to put it in (only a hand-written row).
    NotAnEvent,
}

/// The member a message logged apart gets back.
const PAYLOAD_KEY: &str = r#","payload":"#;

impl Logged {
    /// An event stored as `body`, with its message `payload` apart if set.
    pub fn new(body: String, payload: Option<String>) -> Self {
        Logged { body, payload }
    }

    /// Bytes stored, body and payload: what a reference `~r:<seq>:<bytes>`
    /// names.
    pub fn stored_len(&self) -> u64 {
        (self.body.len() + self.payload.as_ref().map_or(0, String::len)) as u64
    }

    /// Bytes of the JSON text it renders to, counted without rendering it.
    pub fn json_len(&self) -> u64 {
        let Some(payload) = &self.payload else { return self.body.len() as u64 };
        (self.body.len() + PAYLOAD_KEY.len() + json_string::len(payload.as_bytes())) as u64
    }

    /// The envelope `body` with `payload` put back as its last member.
    fn render(body: &str, payload: &str) -> Result<String, Unreadable> {
        let head = match body.strip_suffix('}') {
            Some(head) if head.starts_with('{') && head.len() > 1 => head,
            _ => return Err(Unreadable::NotAnEvent),
        };
        // Room for the payload with a few escapes; more only if it has many.
        let mut out = String::with_capacity(head.len() + PAYLOAD_KEY.len() + payload.len() + payload.len() / 64 + 3);
        out.push_str(head);
        out.push_str(PAYLOAD_KEY);
        json_string::write(&mut out, payload);
        out.push('}');
        Ok(out)
    }

    /// The JSON text as delivered.
    ///
    /// # Errors
    /// [`Unreadable::NotAnEvent`] when the payload is apart and the body is
    /// not a non-empty JSON object to put it in.
    pub fn into_json(self) -> Result<String, Unreadable> {
        match &self.payload {
            None => Ok(self.body),
            Some(payload) => Logged::render(&self.body, payload),
        }
    }

    /// The event that arrived on `channel`, if its JSON fits in `max_bytes`.
    /// A payload apart is moved into the event, not parsed back out of the
    /// JSON rendered for it.
    ///
    /// # Errors
    /// [`Unreadable::TooLarge`] past the limit (nothing is rendered);
    /// [`Unreadable::NotAnEvent`] when it is not one of our events.
    pub fn into_event(self, channel: &str, max_bytes: u64) -> Result<Event, Unreadable> {
        // Escaping at most sixfolds a byte: count only when that could matter.
        if self.stored_len().saturating_mul(6) + 16 > max_bytes {
            let len = self.json_len();
            if len > max_bytes {
                return Err(Unreadable::TooLarge(len));
            }
        }
        match self.payload {
            None => Event::decode(channel, self.body).map_err(|_| Unreadable::NotAnEvent),
            Some(payload) => {
                let json = Logged::render(&self.body, &payload)?;
                Event::message_apart(channel, &self.body, payload, json).ok_or(Unreadable::NotAnEvent)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Logged, Unreadable};

    const HEAD: &str = r#"{"seq":7,"txid":9,"kind":"message","channel":"c","time":"2026-11-21T00:00:00Z"}"#;

    #[test]
    fn a_body_without_a_payload_is_the_json() {
        let logged = Logged::new("[1]".into(), None);
        assert_eq!((logged.stored_len(), logged.json_len()), (3, 3));
        assert_eq!(logged.into_json().unwrap(), "[1]");
    }

    #[test]
    fn a_payload_apart_renders_as_the_last_member_and_moves_into_the_event() {
        let payload = "q\"\n😀";
        let logged = Logged::new(HEAD.into(), Some(payload.into()));
        assert_eq!(logged.stored_len() as usize, HEAD.len() + payload.len());
        let want = format!("{},\"payload\":{}}}", &HEAD[..HEAD.len() - 1], serde_json::to_string(payload).unwrap());
        assert_eq!(logged.json_len() as usize, want.len());
        assert_eq!(logged.clone().into_json().unwrap(), want);
        let e = logged.into_event("c", u64::MAX).unwrap();
        assert_eq!((e.json(), e.seq, e.txid), (want.as_str(), Some(7), Some(9)));
        assert_eq!(e.message().unwrap().payload, payload);
    }

    #[test]
    fn no_envelope_is_not_an_event_and_the_limit_is_on_the_json() {
        for body in ["", "}", "{}", "[]", "x}", "{\"a\":1} "] {
            let logged = Logged::new(body.into(), Some("p".into()));
            assert_eq!(logged.clone().into_json().err(), Some(Unreadable::NotAnEvent), "{body:?}");
            assert_eq!(logged.into_event("c", u64::MAX).err(), Some(Unreadable::NotAnEvent), "{body:?}");
        }
        // An envelope for another channel, or of another kind, is not ours.
        for body in [HEAD.replace("\"c\"", "\"d\""), HEAD.replace("message", "change")] {
            assert_eq!(
                Logged::new(body, Some("p".into())).into_event("c", u64::MAX).err(),
                Some(Unreadable::NotAnEvent)
            );
        }
        let logged = Logged::new(HEAD.into(), Some("\u{1}".repeat(10)));
        let len = logged.json_len();
        assert_eq!(len as usize, HEAD.len() + 11 + 2 + 60);
        assert_eq!(logged.clone().into_event("c", len - 1).err(), Some(Unreadable::TooLarge(len)));
        assert_eq!(logged.into_event("c", len).map(|e| e.json().len() as u64).ok(), Some(len));
    }
}
