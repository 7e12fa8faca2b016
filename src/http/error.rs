//! The HTTP edge's one error type: a status code and a message, sent as `{"error": "..."}`.

use log::error;

#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    NotFound(String),
    MethodNotAllowed(&'static [&'static str]),
    PayloadTooLarge(usize),
    UnsupportedMediaType(String),
    /// A dependency (database or broker) cannot do it right now; the request changed nothing.
    Unavailable(String),
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Unavailable(_) => 503,
            ApiError::Internal(_) => 500,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m) | ApiError::NotFound(m) | ApiError::Unavailable(m) => m.clone(),
            ApiError::Unauthorized => {
                "missing or wrong bearer token (Authorization: Bearer <token>)".into()
            }
            ApiError::UnsupportedMediaType(t) => {
                format!("request body must be application/json, not {t}")
            }
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

    /// A database failure: the server being unreachable is 503, anything else is a bug (500).
    pub fn database(e: anyhow::Error) -> ApiError {
        let unreachable = e.chain().any(|c| {
            c.downcast_ref::<postgres::Error>()
                .is_some_and(|pg| pg.is_closed() || pg.code().is_none())
        });
        if unreachable {
            ApiError::Unavailable(format!("database unavailable: {e:#}"))
        } else {
            ApiError::Internal(e)
        }
    }

    pub fn broker(e: anyhow::Error) -> ApiError {
        ApiError::Unavailable(format!("message broker unavailable: {e:#}"))
    }
}
