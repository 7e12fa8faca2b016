//! The HTTP edge's one error type: a status code and a message, sent as `{"error": "..."}`.
//! The service's errors become statuses here and nowhere else.

use log::error;

use crate::service::ServiceError;

#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    /// No credential (`None`), or one that does not verify (why, in words safe to show).
    Unauthorized(Option<&'static str>),
    /// A valid credential that does not reach this route.
    Forbidden(String),
    /// A caller refused before any credential: a web page of an origin not allowed, or a
    /// `Host` an open API does not answer to.
    ForeignCaller(String),
    NotFound(String),
    MethodNotAllowed(&'static [&'static str]),
    Conflict(String),
    PayloadTooLarge(usize),
    UnsupportedMediaType(String),
    /// The caller's bucket is empty: whose it is, and when the next request may come.
    TooManyRequests(String, std::time::Duration),
    /// A dependency (database or broker) cannot do it right now, or the tenant is busy.
    Unavailable(String),
    /// The replica is not ready; why is for the log and the operator, not for anyone.
    NotReady(String),
    Internal(anyhow::Error),
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        match e {
            ServiceError::Invalid(m) => ApiError::BadRequest(m),
            ServiceError::NotFound(m) => ApiError::NotFound(m),
            ServiceError::Conflict(m) => ApiError::Conflict(m),
            ServiceError::Busy(m) | ServiceError::Unavailable(m) => ApiError::Unavailable(m),
            ServiceError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized(_) => 401,
            ApiError::Forbidden(_) | ApiError::ForeignCaller(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Conflict(_) => 409,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::TooManyRequests(..) => 429,
            ApiError::Unavailable(_) | ApiError::NotReady(_) => 503,
            ApiError::Internal(_) => 500,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::Forbidden(m)
            | ApiError::ForeignCaller(m)
            | ApiError::Unavailable(m) => m.clone(),
            ApiError::Unauthorized(None) => {
                "missing bearer token (Authorization: Bearer <token>)".into()
            }
            ApiError::Unauthorized(Some(why)) => format!("invalid bearer token: {why}"),
            ApiError::UnsupportedMediaType(t) if t.is_empty() => {
                "a request body needs Content-Type: application/json".into()
            }
            ApiError::UnsupportedMediaType(t) => {
                format!("request body must be application/json, not {t}")
            }
            ApiError::TooManyRequests(whose, wait) => format!(
                "too many requests from {whose}; try again in {} s",
                retry_after_secs(*wait)
            ),
            ApiError::NotReady(_) => "not ready".into(),
            ApiError::MethodNotAllowed(allow) => {
                format!("method not allowed here; allowed: {}", allow.join(", "))
            }
            ApiError::PayloadTooLarge(max) => format!("request body is larger than {max} bytes"),
            ApiError::Internal(e) => {
                error!("internal error: {e:#}");
                "internal error".into()
            }
        }
    }
}

/// Whole seconds until a request may come again (`Retry-After`), at least 1.
pub fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}
