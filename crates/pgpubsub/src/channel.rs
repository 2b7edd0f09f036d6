//! Channel names: validated and quoted here and nowhere else.
//!
//! A channel is 1 to 63 bytes (Postgres truncates longer identifiers, so
//! `LISTEN` and `pg_notify` would disagree), starting with an ASCII letter or
//! underscore, then ASCII letters, digits or underscores. Case is kept: the
//! name is always quoted, so `Orders` and `orders` are two channels, exactly
//! as `pg_notify` sees them. `pubsub.check_channel` in SQL applies the same rule.

use std::fmt;

use crate::error::InvalidChannel;

/// The longest channel name Postgres keeps whole (NAMEDATALEN - 1).
pub const MAX_CHANNEL_BYTES: usize = 63;

/// A channel name known to be valid.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(String);

impl Channel {
    /// Whether the name is one pgpubsub uses for itself: `pubsub_wake` (the
    /// writers' wake-up) and `pgpubsub_fence_*` (a listener's heartbeat). A
    /// subscriber never LISTENs or UNLISTENs those.
    pub fn is_reserved(&self) -> bool {
        self.0 == crate::event_log::WAKE_CHANNEL || self.0.starts_with("pgpubsub_fence_")
    }

    /// Validates a channel name.
    ///
    /// # Errors
    /// [`InvalidChannel`] when it is empty, longer than 63 bytes or not an
    /// identifier.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidChannel> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_CHANNEL_BYTES {
            Some("it is longer than 63 bytes")
        } else if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            Some("it must start with an ASCII letter or underscore")
        } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            Some("only ASCII letters, digits and underscores are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidChannel { name, reason }),
            None => Ok(Channel(name)),
        }
    }

    /// The name as Postgres sees it in `pg_notify`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier, for `LISTEN`/`UNLISTEN`, which take
    /// no parameters.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }
}

/// `name` as a quoted SQL identifier: between double quotes, each one
/// inside doubled, so no name can end it early. The one place identifiers
/// (channels for LISTEN, columns of a filter) are quoted.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for Channel {
    type Err = InvalidChannel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Channel::new(s)
    }
}

impl AsRef<str> for Channel {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_identifiers() {
        for ok in ["a", "_", "job_channel", "Orders", "x1", &"a".repeat(63)] {
            assert_eq!(Channel::new(ok).map(|c| c.to_string()), Ok(ok.to_string()));
        }
    }

    #[test]
    fn refuses_the_rest_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            (&"a".repeat(64), "63 bytes"),
            ("1abc", "start"),
            ("a-b", "only"),
            ("a b", "only"),
            ("a\"b", "only"),
            ("é", "start"),
            ("aé", "only"),
        ] {
            let err = Channel::new(bad).unwrap_err();
            assert!(err.reason.contains(why), "{bad:?}: {err}");
            assert!(err.to_string().contains("invalid channel name"));
        }
    }

    #[test]
    fn quotes_for_listen() {
        assert_eq!(Channel::new("Ab_1").unwrap().quoted(), "\"Ab_1\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
