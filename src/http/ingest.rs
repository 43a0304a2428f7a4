//! `POST /aggregate/`: takes a batch of parts, validates each item, hands the valid ones to
//! their shards, and answers which items were taken and why the others were not.

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::config::AckMode;
use crate::metrics::ReasonLabels;
use crate::model::ingest::{parse_batch, parse_batch_msgpack, Rejection};
use crate::model::{AckGroup, Part};
use crate::shard::SubmitError;

/// The answer to an ingest request.
#[derive(Debug, Serialize)]
pub struct IngestResponse {
    /// Items taken: they will be joined and indexed.
    pub accepted: usize,
    /// Items refused, by position in the request, with the reason.
    pub rejected: Vec<Rejection>,
}

pub async fn aggregate(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let format = body_format(&req)?;
    let body = read_body(payload, req.headers().get("content-length"), state.max_body_bytes).await?;
    let parsed = match format {
        BodyFormat::Json => parse_batch(&body, &state.schema, state.limits).map_err(|e| e.to_string()),
        BodyFormat::MessagePack => parse_batch_msgpack(&body, &state.schema, state.limits).map_err(|e| e.to_string()),
    };
    let (parts, rejected) = parsed.map_err(ApiError::MalformedJson)?;
    drop(body);
    let count = parts.len() + rejected.len();
    if count == 0 {
        return Err(ApiError::EmptyBatch);
    }
    if count > state.max_batch_items {
        return Err(ApiError::TooManyItems { count, limit: state.max_batch_items });
    }
    let accepted = parts.len();
    if accepted > 0 {
        submit(&state, parts).await?;
    }
    state.metrics.parts_received.inc_by(accepted as u64);
    for r in &rejected {
        state.metrics.parts_rejected.get_or_create(&ReasonLabels { reason: r.code }).inc();
        tracing::debug!(index = r.index, id = ?r.id, code = r.code, reason = %r.reason, "Item rejected.");
    }
    let response = IngestResponse { accepted, rejected };
    // Nothing taken is not a success a client should mistake for one.
    Ok(if accepted == 0 { HttpResponse::UnprocessableEntity() } else { HttpResponse::Accepted() }.json(response))
}

/// Hands the parts to the shards and, in `persisted` mode, waits until they are durable.
async fn submit(state: &AppState, mut parts: Vec<Part>) -> Result<(), ApiError> {
    if state.metrics.resident_bytes() > state.durability.max_resident_bytes {
        state.metrics.overloaded.inc();
        return Err(ApiError::Overloaded("partials held in memory are at their cap"));
    }
    let group = (state.durability.ack == AckMode::Persisted).then(|| AckGroup::new(parts.len()));
    if let Some(group) = &group {
        for part in &mut parts {
            part.ack = Some(group.clone());
        }
    }
    match state.router.try_submit(parts, state.durability.enqueue_timeout).await {
        Ok(()) => {}
        Err(SubmitError::Busy) => {
            state.metrics.overloaded.inc();
            return Err(ApiError::Overloaded("shard mailboxes are full"));
        }
        Err(SubmitError::Closed) => return Err(ApiError::ShuttingDown),
    }
    if let Some(group) = group {
        let timeout = state.durability.ack_timeout;
        tokio::time::timeout(timeout, group.wait()).await.map_err(|_| ApiError::NotDurableInTime(timeout))?;
    }
    Ok(())
}

/// The body formats ingress reads, negotiated by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    Json,
    MessagePack,
}

fn body_format(req: &HttpRequest) -> Result<BodyFormat, ApiError> {
    let Some(value) = req.headers().get(CONTENT_TYPE) else {
        return Ok(BodyFormat::Json); // like the seed service, a missing type is read as JSON
    };
    let text = value.to_str().unwrap_or("");
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => Ok(BodyFormat::MessagePack),
        _ => Err(ApiError::UnsupportedContentType(text.to_owned())),
    }
}

/// Reads the body, refusing it as soon as it is known to exceed the limit.
async fn read_body(
    mut payload: web::Payload,
    content_length: Option<&actix_web::http::header::HeaderValue>,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let declared = content_length.and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if let Some(size) = declared {
        if size > limit {
            return Err(ApiError::BodyTooLarge { size, limit });
        }
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(64 * 1024));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadBody(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::BodyTooLarge { size: body.len() + chunk.len(), limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
