//! `ApiError` → RFC 9457 `application/problem+json` with a stable `type`.
//!
//! Internal errors are logged once (by the error itself, without request bodies) and answered
//! with a generic message; every other variant says what was wrong and what to do.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use uuid::Uuid;

/// Base of every problem `type` URI; the last segment is the stable slug.
pub const PROBLEM_BASE: &str = "https://freshplan.de/problems/";

/// Everything a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication required: send a bearer token or log in")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("feature {0} is disabled")]
    FeatureDisabled(&'static str),
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidField(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body is too large (limit: freshplan.http.max-body-bytes)")]
    PayloadTooLarge,
    #[error("If-Match header with the lead's current ETag is required for this change")]
    PreconditionRequired,
    #[error("the lead was changed by someone else (current version {current}); reload and retry")]
    StaleVersion { current: i64 },
    #[error("status transition {from} → {to} is not allowed")]
    InvalidTransition {
        from: String,
        to: String,
        reason: String,
    },
    #[error("a live lead with this contact email already exists in the territory")]
    DuplicateContact { existing: Option<Uuid> },
    /// Stored contact data failed authentication or its key is not configured. The detail names
    /// the lead only; the reason (tampered, unknown key id) goes to the log, never clear text.
    #[error("the contact data of lead {lead} cannot be decrypted: it was altered or copied in the database, or its key is not configured; the lead's other fields are intact, ask an administrator to restore or re-enter the contact data")]
    ContactDataUnreadable { lead: Uuid, reason: String },
    #[error("{0}")]
    Conflict(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The request was not answered within the per-request time limit.
    #[error("the request took too long (a slow upload or an overloaded service); retry")]
    RequestTimeout,
    /// `minPosition` was not reflected within the bounded wait.
    #[error("the numbers do not include position {0} yet; retry shortly")]
    NotYetConsistentAt(i64),
    /// A serialization failure or deadlock that persisted after one retry.
    #[error("the change collided with concurrent changes; retry shortly")]
    Contention,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// Media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem: every error answer of the API (`application/problem+json`).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Problem)]
pub struct Problem<'a> {
    /// `https://freshplan.de/problems/<slug>`; the slug is stable: unauthenticated, forbidden,
    /// not-found, feature-disabled, malformed-json, invalid-field, unsupported-media-type,
    /// payload-too-large, precondition-required, stale-version, invalid-transition,
    /// duplicate-contact, conflict, contact-data-unreadable, unavailable, request-timeout,
    /// not-yet-consistent, contention, internal.
    #[serde(rename = "type")]
    #[schema(format = "uri", pattern = r"^https://freshplan\.de/problems/[a-z-]+$")]
    type_: String,
    /// Short title of the slug.
    #[schema(value_type = String)]
    title: &'a str,
    /// The HTTP status code.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// What was wrong and what to do; names the field for `invalid-field`.
    detail: String,
    /// `duplicate-contact`: the live lead with the same contact email, when the caller sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    existing_lead_id: Option<Uuid>,
    /// `stale-version`: the lead's current version (its `ETag`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    current_version: Option<i64>,
}

impl ApiError {
    /// Status code, stable slug and title.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Unauthenticated",
            ),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            FeatureDisabled(_) => (
                StatusCode::NOT_FOUND,
                "feature-disabled",
                "Feature disabled",
            ),
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON"),
            InvalidField(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-field",
                "Invalid field",
            ),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            ),
            PreconditionRequired => (
                StatusCode::PRECONDITION_REQUIRED,
                "precondition-required",
                "Precondition required",
            ),
            StaleVersion { .. } => (
                StatusCode::PRECONDITION_FAILED,
                "stale-version",
                "Stale version",
            ),
            InvalidTransition { .. } => (
                StatusCode::CONFLICT,
                "invalid-transition",
                "Invalid status transition",
            ),
            DuplicateContact { .. } => (
                StatusCode::CONFLICT,
                "duplicate-contact",
                "Duplicate contact",
            ),
            ContactDataUnreadable { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "contact-data-unreadable",
                "Contact data unreadable",
            ),
            Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request timeout",
            ),
            NotYetConsistentAt(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not-yet-consistent",
                "Not yet consistent",
            ),
            Contention => (
                StatusCode::SERVICE_UNAVAILABLE,
                "contention",
                "Concurrent change",
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }

    /// True for a failure that the same request may not meet again (serialization failure,
    /// deadlock): worth one retry of the whole transaction.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ApiError::Contention)
    }

    /// Shorthand for an invalid field with a message naming it.
    pub fn field(message: impl Into<String>) -> Self {
        ApiError::InvalidField(message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.parts();
        let detail = match &self {
            ApiError::InvalidTransition { reason, .. } if !reason.is_empty() => {
                format!("{self}: {reason}")
            }
            _ => self.to_string(),
        };
        match &self {
            ApiError::Internal(e) => tracing::error!(error = %format!("{e:#}"), "internal error"),
            ApiError::ContactDataUnreadable { lead, reason } => {
                tracing::error!(lead_id = %lead, reason = %reason, "contact data unreadable")
            }
            _ => {}
        }
        let problem = Problem {
            type_: format!("{PROBLEM_BASE}{slug}"),
            title,
            status: status.as_u16(),
            detail,
            existing_lead_id: match &self {
                ApiError::DuplicateContact { existing } => *existing,
                _ => None,
            },
            current_version: match &self {
                ApiError::StaleVersion { current } => Some(*current),
                _ => None,
            },
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonSyntaxError(e) => ApiError::MalformedJson(format!(
                "request body is not valid JSON: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            )),
            JsonRejection::JsonDataError(e) => ApiError::InvalidField(
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.body_text()),
            ),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "send the body as Content-Type: application/json".into(),
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            other => ApiError::MalformedJson(other.body_text()),
        }
    }
}

/// Database errors mapped by cause (SQLSTATE), so a refusal or a conflict the database detects
/// answers like the same refusal detected in Rust. Messages name the constraint, never a value
/// (a value could be contact data).
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        let db = match &e {
            sqlx::Error::PoolTimedOut => {
                return ApiError::Unavailable(
                    "database connections exhausted, retry shortly".into(),
                )
            }
            sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                return ApiError::Unavailable("the database is unreachable, retry shortly".into())
            }
            sqlx::Error::Database(db) => db,
            _ => return ApiError::Internal(e.into()),
        };
        let code = db.code().unwrap_or_default();
        let constraint = db.constraint().unwrap_or("a constraint").to_string();
        match code.as_ref() {
            // insufficient_privilege: row-level security refused the row.
            "42501" => ApiError::Forbidden(
                "the change is outside what your role, territory or ownership allows".into(),
            ),
            // serialization_failure, deadlock_detected: the caller retries once.
            "40001" | "40P01" => ApiError::Contention,
            "23505" if constraint == "leads_email_unique" => {
                ApiError::DuplicateContact { existing: None }
            }
            "23505" => ApiError::Conflict(format!(
                "the change conflicts with an existing record ({constraint})"
            )),
            // The database's assignment rules (migration 0003), named by the field they concern.
            "23514" if constraint == "leads_owner_of_territory" => ApiError::InvalidField(
                "ownerUserId must be a sales user or manager of the lead's territory".into(),
            ),
            "23514" if constraint == "leads_collaborators_of_territory" => {
                ApiError::InvalidField("collaborators must be users of the lead's territory".into())
            }
            // check, not-null and foreign-key violations, too long or malformed values.
            "23514" | "23502" | "23503" | "22001" | "22P02" | "22007" | "22008" | "22003" => {
                ApiError::InvalidField(format!("a value is not acceptable (violates {constraint})"))
            }
            // character_not_in_repertoire (a NUL in text), untranslatable_character: the input
            // validation refuses these first; this is the net behind it.
            "22021" | "22P05" => ApiError::InvalidField(
                "a text value contains a character that cannot be stored (e.g. NUL)".into(),
            ),
            // statement_timeout: the database took too long for this request.
            "57014" => {
                ApiError::Unavailable("the database took too long to answer, retry shortly".into())
            }
            // connection exceptions, shutdown in progress, too many connections.
            c if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                ApiError::Unavailable("the database is unavailable, retry shortly".into())
            }
            _ => ApiError::Internal(e.into()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

impl From<PathRejection> for ApiError {
    /// A path segment that cannot be decoded (invalid percent-encoded UTF-8) names no resource.
    fn from(rejection: PathRejection) -> Self {
        tracing::debug!(error = %rejection.body_text(), "path not decodable");
        ApiError::NotFound("resource")
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// JSON body extractor whose rejections use the problem format.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl<T: Serialize> IntoResponse for AppJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Path extractor whose rejections (a segment that is not valid UTF-8, say) use the problem
/// format.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct AppPath<T>(pub T);
