//! The HTTP API's errors: one enum, each variant with its status and a stable code.
//! Bodies are `{"error":{"code":"...","message":"..."}}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body is not valid JSON for this endpoint: {0}")]
    MalformedJson(String),
    #[error("expected Content-Type: application/json, got {0:?}")]
    UnsupportedContentType(String),
    #[error("the body is {size} bytes; at most {limit} are accepted")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("the batch has {count} items; at most {limit} are accepted")]
    TooManyItems { count: usize, limit: usize },
    #[error("the batch has no items")]
    EmptyBatch,
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    #[error("the service is shutting down; retry on another instance")]
    ShuttingDown,
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
            ApiError::ShuttingDown => "shutting_down",
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
            ApiError::BodyTooLarge { .. } | ApiError::TooManyItems { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::ShuttingDown) {
            response.insert_header(("Retry-After", "1"));
        }
        response
            .json(serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}}))
    }
}
