//! One bulk request's delivery: encode the documents once, cut them into bodies of at most
//! `bulk_max_bytes` real bytes, send, read every item's result, and send again what the
//! sink did not take, until each document reaches its end ([`super::End`]) or shutdown
//! gives up (then they are parked).
//!
//! Busy is not wrong: 429s, 5xx, no answer, an unreadable answer, 401/403 and a missing
//! index are retried with backoff for as long as it takes (or `elasticsearch.retry_for`);
//! a request refused as a whole with 413 or 400 is split in halves until the document that
//! causes it stands alone, and only that one is dead-lettered. A delivery task keeps its
//! request slot while it waits, so a cluster that does not take documents stops the
//! writer, the shards, and then ingress (503): backpressure, not memory growth.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio_util::sync::CancellationToken;

use super::concurrency::AdaptiveLimit;
use super::settle::{self, Ended};
use super::{End, InFlight, SinkHealth};
use crate::config::{LatePartsAction, OrphanAction};
use crate::metrics::{Metrics, StatusLabels};
use crate::model::document::{Origin, OrphanKind};
use crate::model::{AckGroup, Document, Schema};
use crate::sink::encode::{encode_op, reencode, Action, VectorEncoding};
use crate::sink::retry::{RequestVerdict, RetryPolicy, Verdict};
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
    /// Requests allowed in flight now.
    pub limit: AdaptiveLimit,
    /// Whether the cluster refuses us, for `/ready`.
    pub health: SinkHealth,
    /// Most bytes in one request body.
    pub max_bytes: usize,
    /// Which action writes which document.
    pub writes: Writes,
    /// How long an update waits for its document to appear (its completion may still be on
    /// its way) before its parts go back to the store as a new item's (reopened):
    /// `durability.outbox_resend_after`.
    pub missing_grace: std::time::Duration,
}

/// Which action writes a document, from `state.late_parts` and the sink.
#[derive(Debug, Clone, Copy)]
pub enum Writes {
    /// `late_parts = "new_item"`: every document replaces the indexed one if it is newer.
    Versioned,
    /// `late_parts = "update"`, to a search engine: `create`, a guarded update if the id
    /// exists; an update of some parts is a guarded update.
    Guarded,
    /// `late_parts = "update"`, to files: every document as a guarded upsert, which gives
    /// the same result whatever the index holds when the files are loaded.
    Upserts,
}

impl Writes {
    pub fn new(late_parts: LatePartsAction, sink: &SinkClient) -> Writes {
        match (late_parts, sink) {
            (LatePartsAction::NewItem, _) => Writes::Versioned,
            (LatePartsAction::Update, SinkClient::File(_)) => Writes::Upserts,
            (LatePartsAction::Update, _) => Writes::Guarded,
        }
    }

    fn action(self, doc: &Document) -> Action {
        match self {
            Writes::Versioned => Action::Index,
            Writes::Upserts => Action::Upsert,
            Writes::Guarded if doc.update => Action::Merge,
            Writes::Guarded => Action::Create,
        }
    }
}

/// One encoded operation and what ending it involves.
pub struct Encoded {
    pub id: String,
    pub version: u64,
    pub action: Action,
    /// It updates some parts of an indexed document ([`Document::update`]).
    pub update: bool,
    /// It has every part (an update of every part can create its document).
    pub complete: bool,
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

/// What became of one attempt at a body.
enum Step {
    /// Every document in it ended.
    Done,
    /// These documents are sent again after the backoff.
    Again(Vec<Encoded>),
    /// The body was refused as a whole for its content: its halves go separately.
    Split(Vec<Encoded>, Vec<Encoded>),
    /// Shutdown's deadline passed: park them.
    GaveUp(Vec<Encoded>),
}

/// Delivers documents until each has ended, or shutdown gives up (then parks them).
pub async fn deliver(ctx: Arc<Context>, docs: Vec<Document>) {
    let (letters, docs) = orphans_to_dead_letter(&ctx, docs);
    settle::dead_letter(&ctx, letters).await;
    if docs.is_empty() {
        return;
    }
    let (_, docs) = encode(&ctx, docs);
    let mut pending: VecDeque<Vec<Encoded>> = by_bytes(docs, ctx.max_bytes).into();
    let started = Instant::now();
    let mut failures: u32 = 0;
    while let Some(docs) = pending.pop_front() {
        match attempt(&ctx, docs, started).await {
            Step::Done => failures = 0,
            Step::Split(first, second) => {
                pending.push_front(second);
                pending.push_front(first);
            }
            Step::Again(docs) => {
                ctx.metrics.bulk_retries.inc_by(docs.len() as u64);
                let wait = ctx.policy.backoff(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => pending.push_front(docs),
                    _ = ctx.give_up.cancelled() => {
                        pending.push_front(docs);
                        return settle::park(&ctx, pending.into_iter().flatten().collect()).await;
                    }
                }
            }
            Step::GaveUp(docs) => {
                pending.push_front(docs);
                return settle::park(&ctx, pending.into_iter().flatten().collect()).await;
            }
        }
    }
}

/// Sends one body and ends, dead-letters, splits or keeps for a retry what is in it.
async fn attempt(ctx: &Context, docs: Vec<Encoded>, started: Instant) -> Step {
    let body = rebuild(&docs);
    let sent = Instant::now();
    ctx.metrics.bulk_bytes.inc_by(body.len() as u64);
    let result = tokio::select! {
        r = ctx.sink.bulk(body, docs.len()) => r,
        _ = ctx.give_up.cancelled() => return Step::GaveUp(docs),
    };
    ctx.metrics.bulk_seconds.observe(sent.elapsed().as_secs_f64());
    let expired = ctx.policy.retry_for.is_some_and(|limit| started.elapsed() >= limit);
    match result {
        Ok(statuses) => {
            ctx.metrics.bulk_requests.get_or_create(&StatusLabels { status: 200 }).inc();
            let Sorted { ended, letters, again, busy } = sort_items(ctx, docs, statuses, started);
            if busy {
                ctx.limit.on_backpressure();
            } else {
                ctx.limit.on_success(sent.elapsed());
            }
            settle::dead_letter(ctx, letters).await;
            settle::end(ctx, ended).await;
            keep_or_expire(ctx, again, expired, "the cluster kept refusing them").await
        }
        Err(e) => {
            count_failed_request(&ctx.metrics, &e);
            match ctx.policy.classify_request(&e) {
                RequestVerdict::Retry => {
                    ctx.limit.on_backpressure();
                    tracing::warn!(documents = docs.len(), error = %e, "Bulk request failed; retrying it.");
                    keep_or_expire(ctx, docs, expired, &e.to_string()).await
                }
                RequestVerdict::Stall => {
                    ctx.health.stall(e.to_string());
                    keep_or_expire(ctx, docs, expired, &e.to_string()).await
                }
                RequestVerdict::Split if docs.len() > 1 => {
                    tracing::warn!(documents = docs.len(), error = %e, "Bulk request refused as a whole; splitting it to find the document that causes it.");
                    let mut first = docs;
                    let second = first.split_off(first.len() / 2);
                    Step::Split(first, second)
                }
                RequestVerdict::Split => {
                    let (status, error_type) = match &e {
                        SinkError::Status { status: 413, .. } => (Some(413), "too_large".to_owned()),
                        SinkError::Status { status, error_type, .. } => (Some(*status), error_type.clone()),
                        _ => (None, "request_rejected".to_owned()),
                    };
                    let letters = docs.into_iter().map(|d| {
                        let l = letter(&d, status, error_type.clone(), e.to_string(), 1);
                        (d, l)
                    });
                    settle::dead_letter(ctx, letters.collect()).await;
                    Step::Done
                }
            }
        }
    }
}

/// Documents still refused: kept for another attempt, or dead-lettered once
/// `elasticsearch.retry_for` has passed.
async fn keep_or_expire(ctx: &Context, docs: Vec<Encoded>, expired: bool, last: &str) -> Step {
    if docs.is_empty() {
        return Step::Done;
    }
    if !expired {
        return Step::Again(docs);
    }
    let reason = format!("still refused after elasticsearch.retry_for; last: {last}");
    let letters = docs.into_iter().map(|d| {
        let l = letter(&d, None, "retries_exhausted".into(), reason.clone(), 0);
        (d, l)
    });
    settle::dead_letter(ctx, letters.collect()).await;
    Step::Done
}

/// A bulk response's documents, sorted by what comes next for them.
struct Sorted {
    ended: Vec<Ended>,
    letters: Vec<(Encoded, DeadLetter)>,
    again: Vec<Encoded>,
    /// The cluster pushed back on some (429, 5xx).
    busy: bool,
}

/// Sorts a bulk response's items; stalls and recoveries are recorded on the way.
fn sort_items(ctx: &Context, docs: Vec<Encoded>, statuses: Vec<crate::sink::ItemStatus>, started: Instant) -> Sorted {
    let (mut ended, mut letters, mut again) = (Vec::new(), Vec::new(), Vec::new());
    let (mut busy, mut stall) = (None, None);
    for (mut doc, item) in docs.into_iter().zip(statuses) {
        ctx.metrics.bulk_items.get_or_create(&StatusLabels { status: item.status }).inc();
        let verdict = ctx.policy.classify_item(doc.action, &item);
        let (error_type, reason) = item.error.unwrap_or_default();
        match verdict {
            Verdict::Indexed if doc.update => ended.push((doc, End::Updated)),
            Verdict::Indexed => ended.push((doc, End::Indexed)),
            Verdict::Superseded => ended.push((doc, End::Superseded)),
            Verdict::Exists => {
                doc.rewrite(&ctx.schema, Action::Merge);
                again.push(doc);
            }
            Verdict::Missing if doc.complete => {
                doc.rewrite(&ctx.schema, Action::Create);
                again.push(doc);
            }
            // Its document may still be on its way (a completion in another request).
            Verdict::Missing if started.elapsed() < ctx.missing_grace => again.push(doc),
            // Gone (deleted): its parts start the item again, as any part of an item
            // not remembered would.
            Verdict::Missing => {
                tracing::info!(id = %doc.id, "The document to update is not in the index; its parts wait for the others as a new item.");
                ended.push((doc, End::Reopened));
            }
            Verdict::Retry => {
                busy = Some(format!("{} {error_type}: {reason}", item.status));
                again.push(doc);
            }
            Verdict::Stall => {
                stall = Some(format!("{} {error_type}: {reason}", item.status));
                again.push(doc);
            }
            Verdict::Reject => {
                let letter = letter(&doc, Some(item.status), error_type, reason, 1);
                letters.push((doc, letter));
            }
        }
    }
    match stall {
        Some(reason) => ctx.health.stall(reason),
        None => ctx.health.recover(),
    }
    if let Some(last) = &busy {
        tracing::debug!(documents = again.len(), last_failure = %last, "Bulk items refused for now; retrying them.");
    }
    Sorted { ended, letters, again, busy: busy.is_some() }
}

/// Cuts encoded documents into bodies of at most `max_bytes` (a larger document goes alone).
fn by_bytes(docs: Vec<Encoded>, max_bytes: usize) -> Vec<Vec<Encoded>> {
    let mut groups: Vec<Vec<Encoded>> = Vec::new();
    let mut size = 0;
    for doc in docs {
        match groups.last_mut() {
            Some(group) if size + doc.op.len() <= max_bytes => {
                size += doc.op.len();
                group.push(doc);
            }
            _ => {
                size = doc.op.len();
                groups.push(vec![doc]);
            }
        }
    }
    groups
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
pub(super) fn encode(ctx: &Context, docs: Vec<Document>) -> (Bytes, Vec<Encoded>) {
    let mut body = BytesMut::with_capacity(docs.iter().map(super::writer::estimated_size).sum());
    let mut spans = Vec::with_capacity(docs.len());
    for doc in &docs {
        let start = body.len();
        let action = ctx.writes.action(doc);
        let source = encode_op(&mut body, doc, &ctx.schema, ctx.vectors, action);
        spans.push((action, start..body.len(), source.start - start..source.end - start));
    }
    let body = body.freeze();
    let encoded = docs
        .into_iter()
        .zip(spans)
        .map(|(mut doc, (action, op, source))| {
            let version = doc.version();
            if doc.origin == Origin::Outbox {
                ctx.outbox.start(&doc.id, version);
            }
            Encoded {
                id: doc.id.clone(),
                version,
                action,
                update: doc.update,
                complete: !doc.is_incomplete(),
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

impl Encoded {
    /// Writes it with another action, around the same source.
    fn rewrite(&mut self, schema: &Schema, action: Action) {
        let (op, source) = reencode(&self.id, self.version, &self.op[self.source.clone()], schema, action);
        (self.op, self.source, self.action) = (op, source, action);
    }
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
        // A replay writes it with this version: it never overwrites a newer document.
        version: Some(doc.version),
    }
}
