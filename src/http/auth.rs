//! Bearer-token authentication of the data endpoints (`POST /aggregate*`,
//! `GET /documents/*`), as middleware on those resources only: `/health`, `/ready`,
//! `/metrics` and `/openapi.json` stay open for probes and scrapers.
//!
//! With `http.auth_token` empty every request passes. Otherwise a request needs
//! `Authorization: Bearer <token>` (scheme case-insensitive, RFC 7235); the token is
//! compared in constant time, and checked before the body is read, so an unauthenticated
//! client cannot make the service read a large body. A refusal is a 401 with the JSON error
//! shape and `WWW-Authenticate: Bearer`. The token itself is never logged.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use actix_web::middleware::Next;

use super::error::ApiError;
use crate::secret::{constant_time_eq, Secret};

/// The configured token, as app data; empty means no authentication.
#[derive(Clone, Debug)]
pub struct BearerToken(pub Secret);

/// Middleware: lets a request through when it carries the configured token.
pub async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(BearerToken(token)) = req.app_data::<BearerToken>() {
        check(req.headers(), token)?;
    }
    next.call(req).await
}

/// `Ok` when no token is configured or the request carries it.
pub fn check(headers: &HeaderMap, token: &Secret) -> Result<(), ApiError> {
    if token.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim());
    match presented {
        None => Err(ApiError::Unauthorized { missing: true }),
        Some(given) if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized { missing: false }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn only_the_configured_bearer_token_passes() {
        let token = Secret::new("s3cret");
        assert!(check(&with("Bearer s3cret"), &token).is_ok());
        assert!(check(&with("bearer  s3cret"), &token).is_ok());
        assert!(matches!(check(&HeaderMap::new(), &token), Err(ApiError::Unauthorized { missing: true })));
        assert!(matches!(check(&with("Basic s3cret"), &token), Err(ApiError::Unauthorized { missing: true })));
        assert!(matches!(check(&with("Bearer s3cre"), &token), Err(ApiError::Unauthorized { missing: false })));
        assert!(matches!(check(&with("Bearer s3cret2"), &token), Err(ApiError::Unauthorized { missing: false })));
    }

    #[test]
    fn no_token_configured_means_no_check() {
        assert!(check(&HeaderMap::new(), &Secret::default()).is_ok());
    }
}
