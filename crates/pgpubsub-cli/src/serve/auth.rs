//! Who may read and write which channel: JSON Web Tokens.
//!
//! A token is signed with the configured secret (HS256) or by the holder of
//! the configured public key (RS256 or ES256); no other algorithm is
//! accepted, `none` included. `exp` is required, `nbf` and `aud` (when an
//! audience is configured) are checked. The claims `read` and `write` list
//! the channels the bearer may subscribe to and publish on, as names or
//! patterns (`"*"`: all served, `"tenant_42_*"`). Tokens come in the `Authorization: Bearer` header, the
//! `pgpubsub_token` cookie (what a browser's EventSource can send), or a
//! WebSocket's first message; never in the URL, which ends up in logs. The
//! cookie counts only for requests from a trusted origin (`access.rs`).

use std::path::PathBuf;

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::access::{glob, Origins};
use super::error::ApiError;

/// The cookie a browser sends its token in.
pub const COOKIE: &str = "pgpubsub_token";

/// Auth settings (flags and environment).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Shared secret for HS256 tokens. With neither this nor a public key,
    /// authentication is off.
    #[arg(long, env = "PGPUBSUB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA or EC) for RS256 / ES256 tokens.
    #[arg(long, env = "PGPUBSUB_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,
    /// Required `aud` claim.
    #[arg(long, env = "PGPUBSUB_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The PostgreSQL role whose table policies decide what a subscriber
    /// receives when its token has no `role` claim (with authentication
    /// off: every subscriber), as PostgREST's anonymous role. Without it,
    /// such subscribers receive every row change of their channels.
    #[arg(long, env = "PGPUBSUB_DEFAULT_ROLE")]
    pub default_role: Option<String>,
}

/// What a valid token grants.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    /// PostgREST's `role` claim: the PostgreSQL role the bearer's row
    /// changes are decided as (row-level authorization, `pgpubsub::views`).
    #[serde(default)]
    pub role: Option<String>,
    /// Every claim, as the JSON object policies read in
    /// `request.jwt.claims`.
    #[serde(skip)]
    pub all: Option<String>,
}

impl Claims {
    /// Whether the bearer may subscribe to `channel` (entries may be
    /// patterns: `"*"`, `"tenant_42_*"`).
    pub fn can_read(&self, channel: &str) -> bool {
        self.read.iter().any(|c| glob(c, channel))
    }

    /// Whether the bearer may publish on `channel`.
    pub fn can_write(&self, channel: &str) -> bool {
        self.write.iter().any(|c| glob(c, channel))
    }

    /// Whether the token may read every channel.
    pub fn can_read_all(&self) -> bool {
        self.read.iter().any(|c| !c.is_empty() && c.chars().all(|ch| ch == '*'))
    }

    /// The channels the token may read, when they are all plain names.
    pub fn readable_names(&self) -> Option<Vec<String>> {
        super::access::plain_names(&self.read)
    }
}

/// The verifier; `None` inside means authentication is off.
#[derive(Clone)]
pub struct Auth {
    verify: Option<(DecodingKey, Validation)>,
    /// `--default-role`.
    default_role: Option<String>,
}

impl Auth {
    /// From the settings.
    ///
    /// # Errors
    /// An unreadable or invalid key, or both a secret and a key.
    pub fn new(args: &AuthArgs) -> anyhow::Result<Auth> {
        let (key, algorithms) = match (&args.jwt_secret, &args.jwt_public_key) {
            (None, None) => return Ok(Auth { verify: None, default_role: args.default_role.clone() }),
            (Some(_), Some(_)) => anyhow::bail!("give PGPUBSUB_JWT_SECRET or PGPUBSUB_JWT_PUBLIC_KEY, not both"),
            (Some(secret), None) => {
                anyhow::ensure!(secret.len() >= 32, "PGPUBSUB_JWT_SECRET must be at least 32 bytes");
                (DecodingKey::from_secret(secret.as_bytes()), vec![Algorithm::HS256])
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                match DecodingKey::from_rsa_pem(&pem) {
                    Ok(k) => (k, vec![Algorithm::RS256]),
                    Err(_) => (
                        DecodingKey::from_ec_pem(&pem)
                            .map_err(|e| anyhow::anyhow!("{} is not an RSA or EC public key: {e}", path.display()))?,
                        vec![Algorithm::ES256],
                    ),
                }
            }
        };
        let mut v = Validation::new(algorithms[0]);
        v.algorithms = algorithms;
        v.leeway = 5;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        match &args.jwt_audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        Ok(Auth { verify: Some((key, v)), default_role: args.default_role.clone() })
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        self.verify.is_some()
    }

    /// The claims of `token`; with authentication off, everything.
    ///
    /// # Errors
    /// `Unauthorized` for a missing, malformed, badly signed, expired or
    /// not-yet-valid token, or one for another audience.
    pub fn check(&self, token: Option<&str>) -> Result<Claims, ApiError> {
        let Some((key, validation)) = &self.verify else {
            let role = self.default_role.clone();
            return Ok(Claims { exp: u64::MAX, read: vec!["*".into()], write: vec!["*".into()], role, all: None });
        };
        let token = token.ok_or_else(|| {
            ApiError::Unauthorized(
                "a token is required: Authorization: Bearer <jwt>, or the pgpubsub_token cookie".into(),
            )
        })?;
        let all = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, validation)
            .map_err(|e| ApiError::Unauthorized(format!("token refused: {e}")))?
            .claims;
        let text = serde_json::Value::Object(all.clone()).to_string();
        let mut claims: Claims = serde_json::from_value(serde_json::Value::Object(all))
            .map_err(|e| ApiError::Unauthorized(format!("token refused: {e}")))?;
        claims.all = Some(text);
        if claims.role.is_none() {
            claims.role.clone_from(&self.default_role);
        }
        Ok(claims)
    }
}

/// The token of an HTTP request: the bearer header, else the cookie. The
/// cookie counts only from a trusted origin (or a request with no `Origin`):
/// a browser sends it along with a foreign page's requests too.
///
/// # Errors
/// `Forbidden` when the token would be the cookie of a request from an
/// origin not trusted.
pub fn token_from(headers: &HeaderMap, origins: &Origins) -> Result<Option<String>, ApiError> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        return Ok(v.strip_prefix("Bearer ").map(|t| t.trim().to_string()));
    }
    match cookie(headers) {
        Some(_) if !origins.trusted(headers) => Err(ApiError::Forbidden(format!(
            "the {COOKIE} cookie is not accepted from origin {} (see --allowed-origins); send the token in the Authorization header or a WebSocket's first message",
            Origins::of(headers)
        ))),
        found => Ok(found),
    }
}

/// The `pgpubsub_token` cookie.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}
