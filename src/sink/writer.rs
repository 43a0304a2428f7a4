//! The bulk writer actor: batches complete documents into `_bulk` requests by count, bytes
//! and age, keeps up to `requests_in_flight` requests going, and hands each request to a
//! delivery task that reads every item's result.
//!
//! Invariants:
//! - Every document ends, exactly once, *settled*: indexed (2xx item) or dead-lettered
//!   (with its reason). Settling confirms its outbox entry (if it completed in the store)
//!   and releases the requests waiting on it (`persisted` mode).
//! - Whole-request failures that say "later" (no answer, 429, 5xx) are retried without
//!   limit, with capped backoff: a long outage stops the writer from taking documents, which
//!   stops the shards, which makes ingress answer 503, instead of growing memory. Item
//!   failures are retried `max_retries` times, then dead-lettered.
//! - When shutdown's deadline passes ([`BulkWriter::spawn`]'s `give_up`), unsettled
//!   documents stay recoverable: those that completed in the store are still in its outbox;
//!   those that completed in memory are stored into the outbox now.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::encode::{encode_index_op, VectorEncoding};
use super::retry::RetryPolicy;
use super::{SinkClient, SinkError};
use crate::config::ElasticsearchSettings;
use crate::metrics::{Metrics, StatusLabels};
use crate::model::ack::ack_all;
use crate::model::document::Partial;
use crate::model::{AckGroup, Document, Schema};
use crate::state::{DeadLetter, MergeOutcome, StateStore};

/// Sends complete documents to the bulk writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Vec<Document>>,
}

/// The writer has stopped; the documents were not taken.
#[derive(Debug, thiserror::Error)]
#[error("the bulk writer has stopped")]
pub struct WriterClosed(pub Vec<Document>);

impl WriterHandle {
    /// Queues documents, waiting while the writer's mailbox is full.
    pub async fn send(&self, docs: Vec<Document>) -> Result<(), WriterClosed> {
        self.tx.send(docs).await.map_err(|e| WriterClosed(e.0))
    }
}

/// What a delivery task needs, shared by all of them.
struct Delivery {
    sink: SinkClient,
    policy: RetryPolicy,
    store: StateStore,
    schema: Schema,
    /// How vectors are written into bodies.
    vectors: VectorEncoding,
    metrics: Arc<Metrics>,
    give_up: CancellationToken,
}

/// One encoded `index` operation and what settling it involves.
struct EncodedDoc {
    id: String,
    /// Action line and source line, each ending in `\n`.
    op: Bytes,
    /// The source line inside `op`.
    source: Range<usize>,
    /// When the part that completed it arrived.
    received_at: Instant,
    outbox: Option<String>,
    acks: Vec<Arc<AckGroup>>,
    /// The document itself, kept while it exists nowhere else (it completed in memory),
    /// so that shutdown can park it in the store.
    parked: Option<Document>,
}

/// The request being filled: documents, not yet encoded (delivery tasks encode, in
/// parallel), and an estimate of their encoded size.
struct Batch {
    docs: Vec<Document>,
    bytes: usize,
    started: Option<Instant>,
}

pub struct BulkWriter {
    rx: mpsc::Receiver<Vec<Document>>,
    delivery: Arc<Delivery>,
    max_docs: usize,
    max_bytes: usize,
    interval: Duration,
    max_in_flight: usize,
    batch: Batch,
    /// Documents received but not yet encoded, because the batch was full.
    pending: VecDeque<Document>,
    in_flight: JoinSet<()>,
}

impl BulkWriter {
    /// Starts the writer; it runs until every handle is dropped, then delivers what it
    /// holds. Once `give_up` fires, deliveries stop and park what is unsettled in the store.
    pub fn spawn(
        settings: &ElasticsearchSettings,
        mailbox_capacity: usize,
        schema: Schema,
        sink: SinkClient,
        store: StateStore,
        metrics: Arc<Metrics>,
        give_up: CancellationToken,
    ) -> (WriterHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(mailbox_capacity);
        let writer = BulkWriter {
            rx,
            delivery: Arc::new(Delivery {
                sink,
                policy: RetryPolicy::new(settings),
                store,
                schema,
                vectors: settings.vector_encoding,
                metrics,
                give_up,
            }),
            max_docs: settings.bulk_max_docs,
            max_bytes: settings.bulk_max_bytes,
            interval: settings.flush_interval,
            max_in_flight: settings.requests_in_flight,
            batch: Batch { docs: Vec::new(), bytes: 0, started: None },
            pending: VecDeque::new(),
            in_flight: JoinSet::new(),
        };
        (WriterHandle { tx }, tokio::spawn(writer.run()))
    }

    fn batch_is_full(&self) -> bool {
        self.batch.docs.len() >= self.max_docs || self.batch.bytes >= self.max_bytes
    }

    fn has_room(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    async fn run(mut self) {
        let mut closed = false;
        loop {
            while !self.batch_is_full() {
                let Some(doc) = self.pending.pop_front() else { break };
                self.push(doc);
            }
            if self.batch_is_full() && self.has_room() {
                self.dispatch();
                continue;
            }
            if closed && self.pending.is_empty() {
                break;
            }
            let waiting = self.pending.len() + self.batch.docs.len();
            self.delivery.metrics.writer_queue_depth.set(waiting as i64);
            let deadline = self.batch.started.map(|s| s + self.interval).unwrap_or_else(Instant::now);
            let batch_due = !self.batch.docs.is_empty() && self.has_room();
            tokio::select! {
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => log_task_end(done),
                msg = self.rx.recv(), if self.pending.is_empty() && !closed => match msg {
                    Some(docs) => self.pending.extend(docs),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(deadline.into()), if batch_due => self.dispatch(),
            }
        }
        // Final step: send what is left and wait for every request to settle (or give up).
        while !self.batch.docs.is_empty() {
            while !self.has_room() {
                if let Some(done) = self.in_flight.join_next().await {
                    log_task_end(done);
                }
            }
            self.dispatch();
        }
        while let Some(done) = self.in_flight.join_next().await {
            log_task_end(done);
        }
        tracing::debug!("Bulk writer stopped.");
    }

    fn push(&mut self, doc: Document) {
        self.batch.bytes += estimated_size(&doc);
        self.batch.docs.push(doc);
        self.batch.started.get_or_insert_with(Instant::now);
    }

    fn dispatch(&mut self) {
        let docs = std::mem::take(&mut self.batch.docs);
        self.batch.bytes = 0;
        self.batch.started = None;
        self.in_flight.spawn(deliver(self.delivery.clone(), docs));
    }
}

/// About how many bytes a document takes in a bulk body: floats print in up to ~12 bytes.
fn estimated_size(doc: &Document) -> usize {
    96 + 2 * doc.id.len() + doc.vectors.iter().map(|v| 12 * v.len()).sum::<usize>()
}

/// Encodes documents into one bulk body; each keeps a cheap slice of its operation.
fn encode(schema: &Schema, vectors: VectorEncoding, docs: Vec<Document>) -> (Bytes, Vec<EncodedDoc>) {
    let mut body = BytesMut::with_capacity(docs.iter().map(estimated_size).sum());
    let mut spans = Vec::with_capacity(docs.len());
    for doc in &docs {
        let start = body.len();
        let source = encode_index_op(&mut body, doc, schema, vectors);
        spans.push((start..body.len(), source.start - start..source.end - start));
    }
    let body = body.freeze();
    let encoded = docs
        .into_iter()
        .zip(spans)
        .map(|(mut doc, (op, source))| {
            let (op, acks, received_at) = (body.slice(op), std::mem::take(&mut doc.acks), doc.received_at);
            match doc.outbox.take() {
                Some(token) => {
                    EncodedDoc { id: doc.id, op, source, received_at, outbox: Some(token), acks, parked: None }
                }
                None => {
                    EncodedDoc { id: doc.id.clone(), op, source, received_at, outbox: None, acks, parked: Some(doc) }
                }
            }
        })
        .collect();
    (body, encoded)
}

fn log_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "A bulk delivery task failed; documents that completed in the state store will be resent from its outbox.");
    }
}

/// Sends one request and retries its retryable failures until each document is settled,
/// or shutdown gives up.
async fn deliver(ctx: Arc<Delivery>, docs: Vec<Document>) {
    let (mut body, mut docs) = encode(&ctx.schema, ctx.vectors, docs);
    let mut item_attempts: u32 = 0;
    let mut request_failures: u32 = 0;
    loop {
        let started = Instant::now();
        ctx.metrics.bulk_bytes.inc_by(body.len() as u64);
        let result = tokio::select! {
            r = ctx.sink.bulk(body, docs.len()) => r,
            _ = ctx.give_up.cancelled() => return park(&ctx, docs).await,
        };
        ctx.metrics.bulk_seconds.observe(started.elapsed().as_secs_f64());
        let mut retry: Vec<EncodedDoc> = Vec::new();
        let mut dead: Vec<(EncodedDoc, DeadLetter)> = Vec::new();
        let mut settled: Vec<EncodedDoc> = Vec::new();
        let wait;
        match result {
            Ok(statuses) => {
                ctx.metrics.bulk_requests.get_or_create(&StatusLabels { status: 200 }).inc();
                item_attempts += 1;
                request_failures = 0;
                let mut last_failure = None;
                for (doc, item) in docs.into_iter().zip(statuses) {
                    ctx.metrics.bulk_items.get_or_create(&StatusLabels { status: item.status }).inc();
                    if item.is_success() {
                        settled.push(doc);
                        continue;
                    }
                    let (error_type, reason) = item.error.unwrap_or_default();
                    if ctx.policy.retries_status(item.status) && item_attempts <= ctx.policy.max_retries {
                        last_failure = Some(format!("{} {error_type}: {reason}", item.status));
                        retry.push(doc);
                    } else {
                        let (error_type, reason) = if ctx.policy.retries_status(item.status) {
                            (
                                "retries_exhausted".to_owned(),
                                format!(
                                    "gave up after {item_attempts} attempts; last: {} {error_type}: {reason}",
                                    item.status
                                ),
                            )
                        } else {
                            (error_type, reason)
                        };
                        let letter = letter(&doc, Some(item.status), error_type, reason, item_attempts);
                        dead.push((doc, letter));
                    }
                }
                ctx.metrics.observe_indexed(settled.iter().map(|d| d.received_at.elapsed()));
                if let Some(last) = &last_failure {
                    tracing::debug!(documents = retry.len(), attempt = item_attempts, last_failure = %last, "Bulk items rejected; retrying them.");
                }
                wait = ctx.policy.backoff(item_attempts - 1);
            }
            Err(e) if ctx.policy.retries_request(&e) => {
                count_failed_request(&ctx.metrics, &e);
                request_failures += 1;
                wait = ctx.policy.backoff(request_failures - 1);
                tracing::warn!(documents = docs.len(), failures = request_failures, error = %e, ?wait, "Bulk request failed; retrying it.");
                retry = docs;
            }
            Err(e) => {
                count_failed_request(&ctx.metrics, &e);
                let status = match &e {
                    SinkError::Status { status, .. } => Some(*status),
                    _ => None,
                };
                dead = docs
                    .into_iter()
                    .map(|d| {
                        let letter = letter(&d, status, "request_failed".into(), e.to_string(), item_attempts + 1);
                        (d, letter)
                    })
                    .collect();
                wait = Duration::ZERO;
            }
        }
        if !dead.is_empty() {
            let (dead_docs, letters): (Vec<EncodedDoc>, Vec<DeadLetter>) = dead.into_iter().unzip();
            if store_dead_letters(&ctx, letters).await {
                settled.extend(dead_docs);
            }
        }
        settle(&ctx, settled).await;
        if retry.is_empty() {
            return;
        }
        ctx.metrics.bulk_retries.inc_by(retry.len() as u64);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.give_up.cancelled() => return park(&ctx, retry).await,
        }
        let mut again = BytesMut::with_capacity(retry.iter().map(|d| d.op.len()).sum());
        for d in &retry {
            again.extend_from_slice(&d.op);
        }
        body = again.freeze();
        docs = retry;
    }
}

fn count_failed_request(metrics: &Metrics, error: &SinkError) {
    match error {
        SinkError::Status { status, .. } => {
            metrics.bulk_requests.get_or_create(&StatusLabels { status: *status }).inc()
        }
        _ => metrics.bulk_request_failures.inc(),
    };
}

/// The sink took these documents (or they are stored as dead letters): confirm their
/// outbox entries and release the requests waiting for them.
async fn settle(ctx: &Delivery, docs: Vec<EncodedDoc>) {
    if docs.is_empty() {
        return;
    }
    let mut tokens = Vec::new();
    for doc in docs {
        if let Some(token) = doc.outbox {
            tokens.push((doc.id, token));
        }
        ack_all(doc.acks);
    }
    ctx.metrics.store_confirms.inc_by(tokens.len() as u64);
    if let Err(e) = ctx.store.confirm(&tokens).await {
        // Harmless but wasteful: these entries will be resent, and overwrite themselves.
        tracing::warn!(documents = tokens.len(), error = %e, "Cannot confirm delivered documents in the outbox; they will be sent again.");
    }
}

/// Shutdown gave up on these documents: leave them recoverable in the store. Those that
/// completed in the store are still in its outbox; those that completed in memory are
/// merged into it now (complete, so they land in the outbox).
async fn park(ctx: &Delivery, docs: Vec<EncodedDoc>) {
    let mut batch = Vec::new();
    let mut acks = Vec::new();
    for doc in docs {
        if let Some(document) = doc.parked {
            batch.push(Partial::from_document(document));
            acks.extend(doc.acks);
        }
    }
    if batch.is_empty() {
        return;
    }
    match ctx.store.merge(&batch).await {
        Ok(outcomes) => {
            let mut parked = 0;
            for ((id, _), outcome) in batch.iter().zip(outcomes) {
                match outcome {
                    MergeOutcome::Completed(_) => parked += 1,
                    other => tracing::error!(%id, ?other, "Document lost: the state store did not park it."),
                }
            }
            ack_all(acks);
            tracing::warn!(documents = parked, "Shutdown deadline passed: documents parked in the state store's outbox; they are sent at the next start.");
        }
        Err(e) => {
            tracing::error!(documents = batch.len(), error = %e, "Documents lost: shutdown gave up on the sink and the state store refused them.");
        }
    }
}

fn letter(doc: &EncodedDoc, status: Option<u16>, error_type: String, reason: String, attempts: u32) -> DeadLetter {
    DeadLetter {
        id: doc.id.clone(),
        status,
        error_type,
        reason,
        attempts,
        document: doc.op.slice(doc.source.clone()),
        at: SystemTime::now(),
    }
}

/// Writes dead letters, retrying the store for a while. Returns whether they were stored;
/// if not, the documents' ids go to the ERROR log, the last trace of them.
async fn store_dead_letters(ctx: &Delivery, letters: Vec<DeadLetter>) -> bool {
    for d in &letters {
        tracing::warn!(id = %d.id, status = ?d.status, error_type = %d.error_type, reason = %d.reason, "Document refused by the sink; dead-lettering it.");
    }
    ctx.metrics.dead_letters.inc_by(letters.len() as u64);
    for attempt in 0..=ctx.policy.max_retries {
        match ctx.store.dead_letter(&letters).await {
            Ok(()) => return true,
            Err(e) if attempt < ctx.policy.max_retries => {
                tracing::warn!(error = %e, letters = letters.len(), "Cannot store dead letters; retrying.");
                tokio::time::sleep(ctx.policy.backoff(attempt)).await;
            }
            Err(e) => {
                let ids: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
                tracing::error!(error = %e, ?ids, "Documents lost: the sink refused them and the dead-letter store is unavailable.");
            }
        }
    }
    false
}
