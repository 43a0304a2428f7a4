//! The bulk writer actor: batches complete documents into `_bulk` requests by count, bytes
//! and age, keeps up to `requests_in_flight` requests going, and hands each request to a
//! delivery task that reads every item's result.
//!
//! Invariants: every document that enters the mailbox ends, exactly once, as indexed
//! (2xx item), dead-lettered (with its reason), or, if even the dead-letter store fails,
//! in an ERROR log line with its id. The mailbox is bounded and the actor stops reading it
//! while its batch is full and every request slot is taken, so a slow sink slows the
//! shards down instead of growing memory.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::encode::encode_index_op;
use super::retry::RetryPolicy;
use super::SinkClient;
use crate::config::ElasticsearchSettings;
use crate::metrics::{Metrics, StatusLabels};
use crate::model::{Document, Schema};
use crate::state::{DeadLetter, StateStore};

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
    dead_letters: StateStore,
    metrics: Arc<Metrics>,
}

/// One encoded `index` operation.
struct EncodedDoc {
    id: String,
    /// Action line and source line, each ending in `\n`.
    op: Bytes,
    /// The source line inside `op`.
    source: Range<usize>,
    /// When the part that completed it arrived.
    received_at: Instant,
}

/// The request being filled.
struct Batch {
    body: BytesMut,
    /// Per document: id, its operation's bytes, its source line within them, arrival.
    docs: Vec<(String, Range<usize>, Range<usize>, Instant)>,
    started: Option<Instant>,
}

pub struct BulkWriter {
    rx: mpsc::Receiver<Vec<Document>>,
    schema: Schema,
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
    /// Starts the writer; it runs until every handle is dropped, then delivers what it holds.
    pub fn spawn(
        settings: &ElasticsearchSettings,
        mailbox_capacity: usize,
        schema: Schema,
        sink: SinkClient,
        dead_letters: StateStore,
        metrics: Arc<Metrics>,
    ) -> (WriterHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(mailbox_capacity);
        let writer = BulkWriter {
            rx,
            schema,
            delivery: Arc::new(Delivery {
                sink,
                policy: RetryPolicy::new(settings),
                dead_letters,
                metrics,
            }),
            max_docs: settings.bulk_max_docs,
            max_bytes: settings.bulk_max_bytes,
            interval: settings.flush_interval,
            max_in_flight: settings.requests_in_flight,
            batch: Batch {
                body: BytesMut::new(),
                docs: Vec::new(),
                started: None,
            },
            pending: VecDeque::new(),
            in_flight: JoinSet::new(),
        };
        (WriterHandle { tx }, tokio::spawn(writer.run()))
    }

    fn batch_is_full(&self) -> bool {
        self.batch.docs.len() >= self.max_docs || self.batch.body.len() >= self.max_bytes
    }

    fn has_room(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    async fn run(mut self) {
        let mut closed = false;
        loop {
            while !self.batch_is_full() {
                let Some(doc) = self.pending.pop_front() else {
                    break;
                };
                self.push(doc);
            }
            if self.batch_is_full() && self.has_room() {
                self.dispatch();
                continue;
            }
            if closed && self.pending.is_empty() {
                break;
            }
            let deadline = self
                .batch
                .started
                .map(|s| s + self.interval)
                .unwrap_or_else(Instant::now);
            let batch_due = !self.batch.docs.is_empty() && self.has_room();
            tokio::select! {
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "A bulk delivery task failed; its documents stay in the state store only if they came through it.");
                    }
                }
                msg = self.rx.recv(), if self.pending.is_empty() && !closed => match msg {
                    Some(docs) => self.pending.extend(docs),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(deadline.into()), if batch_due => self.dispatch(),
            }
        }
        // Final step: send what is left and wait for every request to finish.
        while !self.batch.docs.is_empty() {
            while !self.has_room() {
                self.in_flight.join_next().await;
            }
            self.dispatch();
        }
        while self.in_flight.join_next().await.is_some() {}
        tracing::debug!("Bulk writer stopped.");
    }

    fn push(&mut self, doc: Document) {
        let start = self.batch.body.len();
        let source = encode_index_op(&mut self.batch.body, &doc, &self.schema);
        let end = self.batch.body.len();
        self.batch.docs.push((
            doc.id,
            start..end,
            source.start - start..source.end - start,
            doc.received_at,
        ));
        self.batch.started.get_or_insert_with(Instant::now);
    }

    fn dispatch(&mut self) {
        let body = std::mem::take(&mut self.batch.body).freeze();
        let docs: Vec<EncodedDoc> = std::mem::take(&mut self.batch.docs)
            .into_iter()
            .map(|(id, op, source, received_at)| EncodedDoc {
                id,
                op: body.slice(op),
                source,
                received_at,
            })
            .collect();
        self.batch.started = None;
        self.in_flight
            .spawn(deliver(self.delivery.clone(), body, docs));
    }
}

/// Sends one request and retries its retryable failures until each document is indexed or
/// dead-lettered.
async fn deliver(ctx: Arc<Delivery>, mut body: Bytes, mut docs: Vec<EncodedDoc>) {
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let mut retry: Vec<EncodedDoc> = Vec::new();
        let mut dead: Vec<DeadLetter> = Vec::new();
        let mut last_failure = String::new();
        let started = Instant::now();
        ctx.metrics.bulk_bytes.inc_by(body.len() as u64);
        let result = ctx.sink.bulk(body, docs.len()).await;
        ctx.metrics
            .bulk_seconds
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => ctx
                .metrics
                .bulk_requests
                .get_or_create(&StatusLabels { status: 200 })
                .inc(),
            Err(super::SinkError::Status { status, .. }) => ctx
                .metrics
                .bulk_requests
                .get_or_create(&StatusLabels { status: *status })
                .inc(),
            Err(_) => ctx.metrics.bulk_request_failures.inc(),
        };
        match result {
            Ok(statuses) => {
                let mut indexed = Vec::with_capacity(docs.len());
                for (doc, item) in docs.into_iter().zip(statuses) {
                    ctx.metrics
                        .bulk_items
                        .get_or_create(&StatusLabels {
                            status: item.status,
                        })
                        .inc();
                    if item.is_success() {
                        indexed.push(doc.received_at.elapsed());
                        continue;
                    }
                    let (error_type, reason) = item.error.unwrap_or_default();
                    if ctx.policy.retries_status(item.status) {
                        last_failure =
                            format!("item status {} {error_type}: {reason}", item.status);
                        retry.push(doc);
                    } else {
                        dead.push(letter(&doc, Some(item.status), error_type, reason, attempt));
                    }
                }
                ctx.metrics.observe_indexed(indexed.into_iter());
            }
            Err(e) if ctx.policy.retries_request(&e) => {
                last_failure = e.to_string();
                retry = docs;
            }
            Err(e) => {
                let status = match &e {
                    super::SinkError::Status { status, .. } => Some(*status),
                    _ => None,
                };
                dead.extend(
                    docs.iter().map(|d| {
                        letter(d, status, "request_failed".into(), e.to_string(), attempt)
                    }),
                );
            }
        }
        if !dead.is_empty() {
            for d in &dead {
                tracing::warn!(id = %d.id, status = ?d.status, error_type = %d.error_type, reason = %d.reason, "Document rejected by the sink; dead-lettering it.");
            }
            store_dead_letters(&ctx, dead).await;
        }
        if retry.is_empty() {
            return;
        }
        if attempt > ctx.policy.max_retries {
            tracing::warn!(documents = retry.len(), attempts = attempt, last_failure = %last_failure, "Bulk retries exhausted; dead-lettering the documents.");
            let reason = format!("gave up after {attempt} attempts; last failure: {last_failure}");
            let dead = retry
                .iter()
                .map(|d| letter(d, None, "retries_exhausted".into(), reason.clone(), attempt))
                .collect();
            store_dead_letters(&ctx, dead).await;
            return;
        }
        ctx.metrics.bulk_retries.inc_by(retry.len() as u64);
        let wait = ctx.policy.backoff(attempt - 1);
        tracing::debug!(documents = retry.len(), attempt, ?wait, last_failure = %last_failure, "Bulk items failed; retrying.");
        tokio::time::sleep(wait).await;
        let mut again = BytesMut::with_capacity(retry.iter().map(|d| d.op.len()).sum());
        for d in &retry {
            again.extend_from_slice(&d.op);
        }
        body = again.freeze();
        docs = retry;
    }
}

fn letter(
    doc: &EncodedDoc,
    status: Option<u16>,
    error_type: String,
    reason: String,
    attempts: u32,
) -> DeadLetter {
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

/// Writes dead letters, retrying the store for a while; if it still fails, the documents'
/// ids go to the ERROR log, the last trace of them.
async fn store_dead_letters(ctx: &Delivery, letters: Vec<DeadLetter>) {
    ctx.metrics.dead_letters.inc_by(letters.len() as u64);
    for attempt in 0..=ctx.policy.max_retries {
        match ctx.dead_letters.dead_letter(&letters).await {
            Ok(()) => return,
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
}
