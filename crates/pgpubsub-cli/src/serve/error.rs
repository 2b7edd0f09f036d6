//! The gateway's one error type: every refusal as a status code and a JSON
//! body `{"error": "..."}`, and how a library error maps to one.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgpubsub::store;

/// The body of every refusal.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What was wrong, for a person to read.
    pub error: String,
}

/// Every refusal, as a status and `{"error": "..."}`.
#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed (400).
    BadRequest(String),
    /// No valid token (401).
    Unauthorized(String),
    /// Not served here, or not allowed to this token or origin (403).
    Forbidden(String),
    /// Nothing there (404).
    NotFound(String),
    /// A version precondition failed, or the data conflicts (409).
    Conflict(String),
    /// The body is over the limit (413).
    TooLarge(String),
    /// Over the publish rate (429).
    TooMany(String),
    /// The database cannot do it now (503).
    Unavailable(String),
    /// The gateway is at its connection limit (503).
    Busy(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            ApiError::TooMany(m) => (StatusCode::TOO_MANY_REQUESTS, m),
            ApiError::Unavailable(m) | ApiError::Busy(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
        };
        (status, Json(ErrorBody { error: msg })).into_response()
    }
}

impl ApiError {
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::TooLarge(m)
            | ApiError::TooMany(m)
            | ApiError::Unavailable(m)
            | ApiError::Busy(m) => m,
        }
    }
}

impl From<pgpubsub::Error> for ApiError {
    fn from(e: pgpubsub::Error) -> Self {
        match e {
            pgpubsub::Error::InvalidChannel(c) => ApiError::BadRequest(c.to_string()),
            other => match other.sqlstate() {
                // Bad input is the client's to fix, never a 5xx: SQLSTATE
                // class 22 (data exception: a NUL byte, bad encoding, out of
                // range) and 23 (integrity); uniqueness and exclusion
                // conflicts are 409, as is the store's version check.
                Some(s) if s == store::VERSION_CONFLICT || s == "23505" || s == "23P01" => {
                    ApiError::Conflict(other.to_string())
                }
                Some(s) if s.starts_with("22") || s.starts_with("23") => ApiError::BadRequest(other.to_string()),
                _ => ApiError::Unavailable(other.to_string()),
            },
        }
    }
}
