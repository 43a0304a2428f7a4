//! The HTTP API's errors: one enum, each variant with its status and a stable code.
//! Bodies are `{"error":{"code":"...","message":"..."}}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body cannot be read as this endpoint's request: {0}")]
    MalformedJson(String),
    #[error("expected Content-Type: application/json or application/msgpack, got {0:?}")]
    UnsupportedContentType(String),
    #[error("the body is {size} bytes; at most {limit} are accepted")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("the batch has {count} items; at most {limit} are accepted")]
    TooManyItems { count: usize, limit: usize },
    #[error("the batch has no items")]
    EmptyBatch,
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    /// The body did not arrive within `http.body_timeout`; the connection is closed.
    #[error("the request body did not arrive within {0:?}; send it faster or in smaller requests")]
    BodyTimeout(std::time::Duration),
    #[error("the service is shutting down; retry on another instance")]
    ShuttingDown,
    #[error("the service is saturated ({0}); retry later")]
    Overloaded(&'static str),
    #[error("the parts were taken but not stored durably within {0:?}; retry the request")]
    NotDurableInTime(std::time::Duration),
    /// No `Authorization: Bearer` header (`missing`), or not the configured token.
    #[error("{}", if *missing { "this endpoint needs `Authorization: Bearer <token>`" } else { "wrong bearer token" })]
    Unauthorized { missing: bool },
    #[error("{0}")]
    NotFound(String),
    #[error("the state store did not answer ({0}); retry later")]
    StateUnavailable(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::UnsupportedContentType(_) => "unsupported_content_type",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::TooManyItems { .. } => "too_many_items",
            ApiError::EmptyBatch => "empty_batch",
            ApiError::BadBody(_) => "bad_body",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::NotDurableInTime(_) => "not_durable_in_time",
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::StateUnavailable(_) => "state_unavailable",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_)
            | ApiError::UnsupportedContentType(_)
            | ApiError::EmptyBatch
            | ApiError::BadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } | ApiError::TooManyItems { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ShuttingDown | ApiError::Overloaded(_) | ApiError::NotDurableInTime(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::StateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header(("Retry-After", "1"));
        }
        if let ApiError::BodyTimeout(_) = self {
            // The rest of the body may still be on its way: the connection cannot be reused.
            response.force_close();
        }
        if let ApiError::Unauthorized { missing } = self {
            // RFC 6750: a request without credentials gets no error code.
            let challenge = if *missing {
                r#"Bearer realm="embedjoin""#
            } else {
                r#"Bearer realm="embedjoin", error="invalid_token""#
            };
            response.insert_header(("WWW-Authenticate", challenge));
        }
        response.json(serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}}))
    }
}
