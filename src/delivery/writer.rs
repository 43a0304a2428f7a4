//! The bulk writer actor: batches complete documents into `_bulk` requests by count, bytes
//! and age, keeps up to `requests_in_flight` requests going, and hands each request to a
//! delivery task ([`super::request`]) that carries every document in it to its end.
//!
//! Backpressure: the mailbox is bounded and the writer takes no new documents while its
//! batch is full and every request slot is busy, so a slow or absent sink stops the
//! shards, which makes ingress answer 503, instead of growing memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::concurrency::AdaptiveLimit;
use super::request::{deliver, encode, Context, Writes};
use super::{settle, InFlight, SinkHealth};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::{Document, Schema};
use crate::sink::retry::RetryPolicy;
use crate::sink::SinkClient;
use crate::state::StateStore;

/// Sends complete documents to the bulk writer. Documents count in
/// `document_bytes_resident` from the moment they are handed over until their delivery
/// task ends, so that ingress sheds load whatever the traffic's shape.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Vec<Document>>,
    held: Gauge,
}

/// A reserved slot in the writer's mailbox.
pub struct Slot<'a> {
    permit: mpsc::Permit<'a, Vec<Document>>,
    held: &'a Gauge,
}

impl Slot<'_> {
    pub fn send(self, docs: Vec<Document>) {
        self.held.inc_by(held_bytes(&docs));
        self.permit.send(docs);
    }
}

/// The writer has stopped; the documents were not taken.
#[derive(Debug, thiserror::Error)]
#[error("the bulk writer has stopped")]
pub struct WriterClosed(pub Vec<Document>);

impl WriterHandle {
    /// Queues documents, waiting while the writer's mailbox is full.
    pub async fn send(&self, docs: Vec<Document>) -> Result<(), WriterClosed> {
        let bytes = held_bytes(&docs);
        self.held.inc_by(bytes);
        self.tx.send(docs).await.map_err(|e| {
            self.held.dec_by(bytes);
            WriterClosed(e.0)
        })
    }

    /// A slot in the writer's mailbox, to wait for without holding the documents.
    pub async fn reserve(&self) -> Result<Slot<'_>, WriterClosed> {
        let permit = self.tx.reserve().await.map_err(|_| WriterClosed(Vec::new()))?;
        Ok(Slot { permit, held: &self.held })
    }
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
    ctx: Arc<Context>,
    max_docs: usize,
    max_bytes: usize,
    interval: Duration,
    batch: Batch,
    /// Documents received but not yet batched, because the batch was full.
    pending: VecDeque<Document>,
    in_flight: JoinSet<()>,
}

impl BulkWriter {
    /// Starts the writer; it runs until every handle is dropped, then delivers what it
    /// holds. Once `give_up` fires, deliveries stop and park what is unsettled.
    pub fn spawn(
        settings: &Settings,
        schema: Schema,
        sink: SinkClient,
        store: StateStore,
        metrics: Arc<Metrics>,
        (outbox, health): (InFlight, SinkHealth),
        give_up: CancellationToken,
    ) -> (WriterHandle, tokio::task::JoinHandle<()>) {
        let es = &settings.elasticsearch;
        // Each message holds up to a flush of documents: bound it tightly.
        let (tx, rx) = mpsc::channel(settings.shard_count().max(4));
        let held = metrics.document_bytes_resident.clone();
        let orphans = settings.durability.orphans;
        let writer = BulkWriter {
            rx,
            ctx: Arc::new(Context {
                writes: Writes::new(settings.state.late_parts, &sink),
                missing_grace: settings.durability.outbox_resend_after,
                sink,
                policy: RetryPolicy::new(es),
                store,
                schema,
                vectors: es.vector_encoding,
                limit: AdaptiveLimit::new(es.requests_in_flight, metrics.sink_concurrency_limit.clone()),
                metrics,
                give_up,
                outbox,
                orphans,
                health,
                max_bytes: es.bulk_max_bytes,
            }),
            max_docs: es.bulk_max_docs,
            max_bytes: es.bulk_max_bytes,
            interval: es.flush_interval,
            batch: Batch { docs: Vec::new(), bytes: 0, started: None },
            pending: VecDeque::new(),
            in_flight: JoinSet::new(),
        };
        (WriterHandle { tx, held }, tokio::spawn(writer.run()))
    }

    fn batch_is_full(&self) -> bool {
        self.batch.docs.len() >= self.max_docs || self.batch.bytes >= self.max_bytes
    }

    fn has_room(&self) -> bool {
        self.in_flight.len() < self.ctx.limit.current()
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
            self.ctx.metrics.writer_queue_depth.set(waiting as i64);
            let deadline = self.batch.started.map(|s| s + self.interval).unwrap_or_else(Instant::now);
            let batch_due = !self.batch.docs.is_empty() && self.has_room();
            tokio::select! {
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => log_task_end(done),
                msg = self.rx.recv(), if self.pending.is_empty() && !closed => match msg {
                    Some(docs) => self.pending.extend(docs),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(deadline.into()), if batch_due => self.dispatch(),
                _ = self.ctx.give_up.cancelled() => return self.park_all().await,
            }
        }
        // Final step: send what is left and wait for every request to settle (or give up).
        while !self.batch.docs.is_empty() {
            while !self.has_room() {
                tokio::select! {
                    Some(done) = self.in_flight.join_next() => log_task_end(done),
                    _ = self.ctx.give_up.cancelled() => return self.park_all().await,
                }
            }
            self.dispatch();
        }
        while let Some(done) = self.in_flight.join_next().await {
            log_task_end(done);
        }
        tracing::debug!("Bulk writer stopped.");
    }

    /// Shutdown's deadline passed: parks what was never sent (the batch, the queue, the
    /// mailbox); the delivery tasks park what they hold.
    async fn park_all(mut self) {
        self.rx.close();
        let mut docs = std::mem::take(&mut self.batch.docs);
        docs.extend(self.pending.drain(..));
        while let Ok(more) = self.rx.try_recv() {
            docs.extend(more);
        }
        let bytes = held_bytes(&docs);
        let (_, encoded) = encode(&self.ctx, docs);
        settle::park(&self.ctx, encoded).await;
        self.ctx.metrics.document_bytes_resident.dec_by(bytes);
        while let Some(done) = self.in_flight.join_next().await {
            log_task_end(done);
        }
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
        let ctx = self.ctx.clone();
        self.in_flight.spawn(async move {
            let bytes = held_bytes(&docs);
            deliver(ctx.clone(), docs).await;
            ctx.metrics.document_bytes_resident.dec_by(bytes);
        });
    }
}

/// The bytes a batch of documents is counted for while it is held (its encoded estimate).
fn held_bytes(docs: &[Document]) -> i64 {
    docs.iter().map(estimated_size).sum::<usize>() as i64
}

/// About how many bytes a document takes in a bulk body: floats print in up to ~12 bytes.
pub(crate) fn estimated_size(doc: &Document) -> usize {
    160 + 2 * doc.id.len() + doc.vectors.iter().map(|v| 12 * v.len()).sum::<usize>()
}

fn log_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "A bulk delivery task failed; documents that completed in the state store will be resent from its outbox.");
    }
}
