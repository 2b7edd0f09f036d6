//! Which channels are served (`--channel` patterns) and which browser
//! origins are trusted (`--allowed-origins`).
//!
//! Patterns are channel names with `*` (any run of characters) and `?` (one
//! character). Channel names are identifiers (`[A-Za-z_][A-Za-z0-9_]*`), so
//! these two are all a pattern needs: a matcher of a few lines, rather than a
//! glob crate built for paths (separators, classes, braces).

use axum::http::{header, HeaderMap, HeaderValue, Method};
use pgpubsub::Channel;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Whether `name` matches `pattern` (`*`: any run, `?`: one character).
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            (pi, si) = (pi + 1, si + 1);
        } else if pi < p.len() && p[pi] == b'*' {
            (star, mark, pi) = (Some(pi), si, pi + 1);
        } else if let Some(st) = star {
            (pi, mark) = (st + 1, mark + 1);
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

fn is_pattern(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// The channels served: empty means every channel of the log.
#[derive(Debug, Clone, Default)]
pub struct Served(Vec<String>);

impl Served {
    /// From `--channel` values.
    ///
    /// # Errors
    /// A value that is neither a channel name nor a pattern of one.
    pub fn parse(list: &[String]) -> anyhow::Result<Served> {
        let mut out = Vec::new();
        for p in list.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            // A pattern is valid when some name matches it: its wildcards
            // made letters.
            Channel::new(p.replace(['*', '?'], "x")).map_err(|e| anyhow::anyhow!("--channel {p}: {e}"))?;
            out.push(p.to_string());
        }
        Ok(Served(out))
    }

    /// Whether every channel is served.
    pub fn all(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `channel` is served.
    pub fn allows(&self, channel: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| glob(p, channel))
    }

    /// The channels, when every entry is a plain name (the listener then
    /// reads only those); `None` for all channels or any pattern.
    pub fn names(&self) -> Option<Vec<Channel>> {
        if self.0.is_empty() || self.0.iter().any(|p| is_pattern(p)) {
            return None;
        }
        self.0.iter().map(|p| Channel::new(p.as_str()).ok()).collect()
    }

    /// For logs.
    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            "every channel".into()
        } else {
            self.0.join(",")
        }
    }
}

/// Plain names among `list` (what a subscription without channels gets),
/// or `None` when it has a pattern.
pub fn plain_names(list: &[String]) -> Option<Vec<String>> {
    (!list.iter().any(|c| is_pattern(c))).then(|| list.to_vec())
}

/// The origins trusted with the `pgpubsub_token` cookie and given CORS
/// headers. The gateway's own origin (the `Origin` naming the `Host` asked
/// for) is always trusted.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    listed: Vec<String>,
    /// `*`: CORS headers for every origin (bearer tokens only: the cookie
    /// stays limited to the listed and the same origin).
    any: bool,
}

impl Origins {
    /// From `--allowed-origins` (`https://app.example,http://localhost:3000`, or `*`).
    ///
    /// # Errors
    /// An entry that is not `scheme://host[:port]`.
    pub fn parse(list: &[String]) -> anyhow::Result<Origins> {
        let mut o = Origins::default();
        for entry in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if entry == "*" {
                o.any = true;
                continue;
            }
            let norm = entry.trim_end_matches('/').to_ascii_lowercase();
            let rest = norm.strip_prefix("http://").or_else(|| norm.strip_prefix("https://"));
            anyhow::ensure!(
                rest.is_some_and(|r| !r.is_empty() && !r.contains('/')),
                "--allowed-origins {entry}: expected scheme://host[:port], such as https://app.example"
            );
            o.listed.push(norm);
        }
        Ok(o)
    }

    fn listed(&self, origin: &str) -> bool {
        self.listed.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }

    /// Whether a request with these headers may use the cookie: it has no
    /// `Origin` (not a browser's cross-site request), or a trusted one.
    pub fn trusted(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else { return true };
        let Ok(origin) = origin.to_str() else { return false };
        if self.listed(origin) {
            return true;
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let bare = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        matches!((bare, host), (Some(b), Some(h)) if b.eq_ignore_ascii_case(h))
    }

    /// The `Origin` of a request, for messages.
    pub fn of(headers: &HeaderMap) -> String {
        headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()).unwrap_or("?").to_string()
    }

    /// CORS for the listed origins (with credentials, so a listed page may
    /// send the cookie), or every origin with `*`. Same-origin pages need none.
    pub fn cors(&self) -> CorsLayer {
        let me = self.clone();
        CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
                me.any || origin.to_str().is_ok_and(|o| me.listed(o))
            }))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::HeaderName::from_static("last-event-id"),
            ])
            .allow_credentials(true)
            .max_age(std::time::Duration::from_secs(600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, s, m) in [
            ("orders", "orders", true),
            ("orders", "orders2", false),
            ("tenant_*", "tenant_42", true),
            ("tenant_*", "tenant_", true),
            ("tenant_*", "tenan", false),
            ("*", "anything", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("t?_x", "t1_x", true),
            ("t?_x", "t12_x", false),
            ("*_log", "audit_log", true),
        ] {
            assert_eq!(glob(p, s), m, "{p} vs {s}");
        }
    }

    #[test]
    fn served() {
        let s = Served::parse(&["orders".into(), "tenant_*".into()]).unwrap();
        assert!(s.allows("tenant_1") && s.allows("orders") && !s.allows("chat"));
        assert!(s.names().is_none());
        let s = Served::parse(&["a".into(), "b".into()]).unwrap();
        assert_eq!(s.names().map(|n| n.len()), Some(2));
        assert!(Served::parse(&["bad-name".into()]).is_err());
        assert!(Served::parse(&[]).unwrap().allows("x"));
    }

    #[test]
    fn origins() {
        let o = Origins::parse(&["https://app.example/".into()]).unwrap();
        let h = |origin: Option<&str>, host: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, host.parse().unwrap());
            if let Some(origin) = origin {
                m.insert(header::ORIGIN, origin.parse().unwrap());
            }
            m
        };
        assert!(o.trusted(&h(None, "gw:8080")));
        assert!(o.trusted(&h(Some("https://app.example"), "gw:8080")));
        assert!(o.trusted(&h(Some("http://gw:8080"), "gw:8080")));
        assert!(!o.trusted(&h(Some("http://evil.example"), "gw:8080")));
        assert!(!o.trusted(&h(Some("null"), "gw:8080")));
        assert!(Origins::parse(&["app.example".into()]).is_err());
    }
}
