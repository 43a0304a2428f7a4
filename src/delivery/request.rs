//! One bulk request's delivery: encode the documents once, send, read every item's result,
//! and send again what the sink asked to retry, until each document reaches its end
//! ([`super::End`]) or shutdown gives up (then they are parked).

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio_util::sync::CancellationToken;

use super::settle::{self, Ended};
use super::{End, InFlight};
use crate::config::OrphanAction;
use crate::metrics::{Metrics, StatusLabels};
use crate::model::document::{Origin, OrphanKind};
use crate::model::{AckGroup, Document, Schema};
use crate::sink::encode::{encode_index_op, VectorEncoding};
use crate::sink::retry::{RetryPolicy, Verdict};
use crate::sink::{SinkClient, SinkError};
use crate::state::{DeadLetter, StateStore};

/// What delivery tasks share.
pub struct Context {
    pub sink: SinkClient,
    pub policy: RetryPolicy,
    pub store: StateStore,
    pub schema: Schema,
    /// How vectors are written into bodies.
    pub vectors: VectorEncoding,
    pub metrics: Arc<Metrics>,
    /// Fires when shutdown's deadline passes: stop waiting for the sink, park.
    pub give_up: CancellationToken,
    /// Outbox entries being delivered by this instance (their leases are renewed).
    pub outbox: InFlight,
    pub orphans: OrphanAction,
}

/// One encoded `index` operation and what ending it involves.
pub struct Encoded {
    pub id: String,
    pub version: u64,
    /// Action line and source line, each ending in `\n`.
    pub op: Bytes,
    /// The source line inside `op`.
    pub source: Range<usize>,
    /// When the part that completed it arrived.
    pub received_at: Instant,
    pub origin: Origin,
    pub acks: Vec<Arc<AckGroup>>,
    /// The document itself while it exists nowhere else (it completed in memory), so that
    /// shutdown can park it in the store.
    pub memory_copy: Option<Document>,
}

/// Sends one request and retries its retryable failures until each document has ended,
/// or shutdown gives up.
pub async fn deliver(ctx: Arc<Context>, docs: Vec<Document>) {
    let (letters, docs) = orphans_to_dead_letter(&ctx, docs);
    if !letters.is_empty() {
        settle::dead_letter(&ctx, letters).await;
    }
    if docs.is_empty() {
        return;
    }
    let (mut body, mut docs) = encode(&ctx, docs);
    let mut item_attempts: u32 = 0;
    let mut request_failures: u32 = 0;
    loop {
        let started = Instant::now();
        ctx.metrics.bulk_bytes.inc_by(body.len() as u64);
        let result = tokio::select! {
            r = ctx.sink.bulk(body, docs.len()) => r,
            _ = ctx.give_up.cancelled() => return settle::park(&ctx, docs).await,
        };
        ctx.metrics.bulk_seconds.observe(started.elapsed().as_secs_f64());
        let (ended, letters, retry, wait) = match result {
            Ok(statuses) => {
                ctx.metrics.bulk_requests.get_or_create(&StatusLabels { status: 200 }).inc();
                item_attempts += 1;
                request_failures = 0;
                let (ended, letters, retry) = sort_items(&ctx, docs, statuses, item_attempts);
                (ended, letters, retry, ctx.policy.backoff(item_attempts - 1))
            }
            Err(e) if ctx.policy.retries_request(&e) => {
                count_failed_request(&ctx.metrics, &e);
                request_failures += 1;
                let wait = ctx.policy.backoff(request_failures - 1);
                tracing::warn!(documents = docs.len(), failures = request_failures, error = %e, ?wait, "Bulk request failed; retrying it.");
                (Vec::new(), Vec::new(), docs, wait)
            }
            Err(e) => {
                count_failed_request(&ctx.metrics, &e);
                let status = match &e {
                    SinkError::Status { status, .. } => Some(*status),
                    _ => None,
                };
                let letters = (docs.into_iter())
                    .map(|d| {
                        let letter = letter(&d, status, "request_failed".into(), e.to_string(), item_attempts + 1);
                        (d, letter)
                    })
                    .collect();
                (Vec::new(), letters, Vec::new(), Duration::ZERO)
            }
        };
        settle::dead_letter(&ctx, letters).await;
        settle::end(&ctx, ended).await;
        if retry.is_empty() {
            return;
        }
        ctx.metrics.bulk_retries.inc_by(retry.len() as u64);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.give_up.cancelled() => return settle::park(&ctx, retry).await,
        }
        body = rebuild(&retry);
        docs = retry;
    }
}

/// Splits a bulk response's items into ended documents, dead letters and retries.
fn sort_items(
    ctx: &Context,
    docs: Vec<Encoded>,
    statuses: Vec<crate::sink::ItemStatus>,
    attempts: u32,
) -> (Vec<Ended>, Vec<(Encoded, DeadLetter)>, Vec<Encoded>) {
    let (mut ended, mut letters, mut retry) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_failure = None;
    for (doc, item) in docs.into_iter().zip(statuses) {
        ctx.metrics.bulk_items.get_or_create(&StatusLabels { status: item.status }).inc();
        let (error_type, reason) = item.error.unwrap_or_default();
        match ctx.policy.classify_item(item.status, Some(error_type.as_str())) {
            Verdict::Indexed => ended.push((doc, End::Indexed)),
            Verdict::Superseded => ended.push((doc, End::Superseded)),
            Verdict::Retry if attempts <= ctx.policy.max_retries => {
                last_failure = Some(format!("{} {error_type}: {reason}", item.status));
                retry.push(doc);
            }
            Verdict::Retry => {
                let reason = format!("gave up after {attempts} attempts; last: {} {error_type}: {reason}", item.status);
                let letter = letter(&doc, Some(item.status), "retries_exhausted".into(), reason, attempts);
                letters.push((doc, letter));
            }
            Verdict::Reject => {
                let letter = letter(&doc, Some(item.status), error_type, reason, attempts);
                letters.push((doc, letter));
            }
        }
    }
    if let Some(last) = &last_failure {
        tracing::debug!(documents = retry.len(), attempt = attempts, last_failure = %last, "Bulk items rejected; retrying them.");
    }
    (ended, letters, retry)
}

/// Orphans the settings (or their kind) send to the dead letters instead of the index: a
/// late part is never indexed over its complete document.
fn orphans_to_dead_letter(ctx: &Context, docs: Vec<Document>) -> (Vec<(Encoded, DeadLetter)>, Vec<Document>) {
    let (dead, keep): (Vec<Document>, Vec<Document>) = docs.into_iter().partition(|d| match d.orphan {
        None => false,
        Some(OrphanKind::Late) => true,
        Some(OrphanKind::Partial) => ctx.orphans != OrphanAction::Index,
    });
    if dead.is_empty() {
        return (Vec::new(), keep);
    }
    let reasons: Vec<String> = dead.iter().map(|d| orphan_reason(&ctx.schema, d)).collect();
    let (_, encoded) = encode(ctx, dead);
    let letters = (encoded.into_iter().zip(reasons))
        .map(|(d, reason)| {
            let letter = letter(&d, None, "incomplete".into(), reason, 0);
            (d, letter)
        })
        .collect();
    (letters, keep)
}

fn orphan_reason(schema: &Schema, doc: &Document) -> String {
    let missing: Vec<&str> = (doc.vectors.iter().enumerate())
        .filter(|(_, v)| v.is_empty())
        .map(|(slot, _)| schema.part(slot).type_name.as_str())
        .collect();
    let missing = missing.join(", ");
    match doc.orphan {
        Some(OrphanKind::Late) => format!(
            "parts that came after the item was completed waited longer than the partial TTL for the others ({missing}); not indexed over the complete document"
        ),
        _ => format!("did not complete within the partial TTL; missing: {missing}"),
    }
}

/// Encodes documents into one bulk body; each keeps a cheap slice of its operation.
fn encode(ctx: &Context, docs: Vec<Document>) -> (Bytes, Vec<Encoded>) {
    let mut body = BytesMut::with_capacity(docs.iter().map(super::writer::estimated_size).sum());
    let mut spans = Vec::with_capacity(docs.len());
    for doc in &docs {
        let start = body.len();
        let source = encode_index_op(&mut body, doc, &ctx.schema, ctx.vectors);
        spans.push((start..body.len(), source.start - start..source.end - start));
    }
    let body = body.freeze();
    let encoded = docs
        .into_iter()
        .zip(spans)
        .map(|(mut doc, (op, source))| {
            let version = doc.version();
            if doc.origin == Origin::Outbox {
                ctx.outbox.start(&doc.id, version);
            }
            Encoded {
                id: doc.id.clone(),
                version,
                op: body.slice(op),
                source,
                received_at: doc.received_at,
                origin: doc.origin,
                acks: std::mem::take(&mut doc.acks),
                memory_copy: (doc.origin == Origin::Memory).then_some(doc),
            }
        })
        .collect();
    (body, encoded)
}

/// The body of a retry: the operations of the documents sent again.
fn rebuild(docs: &[Encoded]) -> Bytes {
    let mut again = BytesMut::with_capacity(docs.iter().map(|d| d.op.len()).sum());
    for d in docs {
        again.extend_from_slice(&d.op);
    }
    again.freeze()
}

fn count_failed_request(metrics: &Metrics, error: &SinkError) {
    match error {
        SinkError::Status { status, .. } => {
            metrics.bulk_requests.get_or_create(&StatusLabels { status: *status }).inc()
        }
        _ => metrics.bulk_request_failures.inc(),
    };
}

fn letter(doc: &Encoded, status: Option<u16>, error_type: String, reason: String, attempts: u32) -> DeadLetter {
    DeadLetter {
        id: doc.id.clone(),
        status,
        error_type,
        reason,
        attempts,
        document: doc.op.slice(doc.source.clone()),
        at: SystemTime::now(),
        version: None,
    }
}
