//! `POST /aggregate/`: takes a batch of parts, validates each item, hands the valid ones to
//! their shards, and answers which items were taken and why the others were not.
//!
//! Ingress cannot be starved or made to hold unbounded memory:
//! - the body must arrive within `http.body_timeout` (from the end of the headers, which
//!   actix bounds by the same setting), else 408 `body_timeout` and the connection is closed:
//!   a slow client holds one connection and its buffer for that long at most;
//! - the bytes of bodies being read and parsed are charged to
//!   `metrics.request_bytes_resident` until the request ends, and count with the partials
//!   against `shards.max_resident_bytes`: a request that would take them over is refused
//!   with 503 before its body is read (one request is always admitted when nothing else is
//!   held, so the bound is `max_resident_bytes` plus one `http.max_body_bytes`).

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
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

/// How long a request's body may take to arrive (`http.body_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

pub async fn aggregate(
    state: web::Data<AppState>,
    timeout: web::Data<BodyTimeout>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let format = body_format(&req)?;
    let declared =
        req.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if let Some(size) = declared.filter(|size| *size > state.max_body_bytes) {
        return Err(ApiError::BodyTooLarge { size, limit: state.max_body_bytes });
    }
    // Held until the parts are handed over: the body, then the parts parsed from it.
    let mut charge = Charge::new(&state.metrics.request_bytes_resident);
    admit(&state, declared.unwrap_or(0))?;
    let reading = read_body(payload, declared, state.max_body_bytes, &mut charge);
    let body = tokio::time::timeout(timeout.0, reading).await.map_err(|_| ApiError::BodyTimeout(timeout.0))??;
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
        submit(&state, parts, charge).await?;
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

/// Refuses a request whose body would take the memory ingress and the shards hold past
/// `shards.max_resident_bytes`; when nothing is held, any body (up to `max_body_bytes`) is
/// admitted, so that a cap below the body limit cannot refuse everything.
fn admit(state: &AppState, body_bytes: usize) -> Result<(), ApiError> {
    let held = state.metrics.resident_bytes() + state.metrics.request_bytes_resident.get().max(0) as usize;
    if held > 0 && held + body_bytes > state.durability.max_resident_bytes {
        state.metrics.overloaded.inc();
        return Err(ApiError::Overloaded("partials, documents and request bodies held in memory are at their cap"));
    }
    Ok(())
}

/// Bytes charged to a gauge for as long as this lives.
struct Charge<'a> {
    gauge: &'a Gauge,
    bytes: i64,
}

impl<'a> Charge<'a> {
    fn new(gauge: &'a Gauge) -> Charge<'a> {
        Charge { gauge, bytes: 0 }
    }

    /// Raises the charge to `bytes` (never lowers it).
    fn raise_to(&mut self, bytes: usize) {
        let bytes = bytes as i64;
        if bytes > self.bytes {
            self.gauge.inc_by(bytes - self.bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

/// Hands the parts to the shards and, in `persisted` mode, waits until they are durable.
/// The body's charge ends once the parts are in the shards' mailboxes.
async fn submit(state: &AppState, mut parts: Vec<Part>, charge: Charge<'_>) -> Result<(), ApiError> {
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
    drop(charge);
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

/// Reads the body, refusing it as soon as it is known to exceed the limit; its buffer is
/// charged as it grows.
async fn read_body(
    mut payload: web::Payload,
    declared: Option<usize>,
    limit: usize,
    charge: &mut Charge<'_>,
) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(64 * 1024));
    charge.raise_to(body.capacity());
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadBody(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::BodyTooLarge { size: body.len() + chunk.len(), limit });
        }
        body.extend_from_slice(&chunk);
        charge.raise_to(body.capacity());
    }
    Ok(body)
}
