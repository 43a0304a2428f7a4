//! A shard actor owns the partial documents of the ids routed to it.
//!
//! - A part is applied in memory; if its item then has every part, the document goes to
//!   the bulk writer at once, without touching the state store.
//! - Every other partial in memory is dirty. Every flush interval, or when `max_dirty`
//!   partials are dirty, the shard merges all of them into the store in one batch (one
//!   pipeline) and evicts them from memory: the store holds them from then on, and a later
//!   part for the same id merges there. Items the store reports complete go to the writer.
//! - A document completed in memory is remembered in the store at the next flush, which
//!   drops any stored copy of its parts no newer than the completed ones (stored by this
//!   shard earlier, or by another instance): nothing of a completed item stays behind.
//! - Each part carries its stamp; the newest copy wins in memory and in the store alike,
//!   whatever order flushes (of this or another instance) reach the store in.
//! - A failed merge keeps the partial in memory for the next flush. If the store applied
//!   it and only the reply was lost, merging it again changes nothing (its stamps are no
//!   newer than what the store knows), and if it had completed the item there, that
//!   completion waits in the outbox: no orphan, no second completion.
//!
//! What may be lost: partials not yet flushed when the process dies without shutdown (at
//! most one flush interval of parts). On shutdown the actor drains its mailbox and
//! flushes everything before it exits.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::recorder::Recorder;
use crate::config::Settings;
use crate::delivery::{WriterClosed, WriterHandle};
use crate::metrics::{CompletedIn, CompletedLabels, Metrics, ShardLabels};
use crate::model::ack::ack_all;
use crate::model::document::Origin;
use crate::model::document::Partial;
use crate::model::{Document, Part, Schema};
use crate::state::{Completion, MergeOutcome, StateStore};

/// Messages a shard understands.
pub enum ShardMsg {
    Parts(Vec<Part>),
    /// Persist every dirty partial now; answers when done.
    Flush(oneshot::Sender<()>),
    /// Which parts of an item this shard holds in memory, as a bit mask of schema slots
    /// (`None`: it holds none). Answered after every message queued before it.
    Inspect(String, oneshot::Sender<Option<u32>>),
}

/// How a shard is told to stop: `cancel` to drain and flush; `give_up` when shutdown's
/// deadline passed (stop waiting for the writer or the store; park documents instead).
#[derive(Clone)]
pub struct Stops {
    pub cancel: CancellationToken,
    pub give_up: CancellationToken,
}

/// The shard has stopped (the service is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the service is shutting down")]
pub struct ShardClosed;

/// A cloneable handle on one shard's mailbox.
#[derive(Clone)]
pub struct ShardHandle {
    tx: mpsc::Sender<ShardMsg>,
}

impl ShardHandle {
    pub async fn send(&self, parts: Vec<Part>) -> Result<(), ShardClosed> {
        self.tx.send(ShardMsg::Parts(parts)).await.map_err(|_| ShardClosed)
    }

    /// A slot in the mailbox, to send into without waiting.
    pub async fn reserve(&self) -> Result<mpsc::Permit<'_, ShardMsg>, ShardClosed> {
        self.tx.reserve().await.map_err(|_| ShardClosed)
    }

    pub async fn flush(&self) -> Result<(), ShardClosed> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(ShardMsg::Flush(tx)).await.map_err(|_| ShardClosed)?;
        rx.await.map_err(|_| ShardClosed)
    }

    /// The slots of `id` held in memory (see [`ShardMsg::Inspect`]).
    pub async fn inspect(&self, id: String) -> Result<Option<u32>, ShardClosed> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(ShardMsg::Inspect(id, tx)).await.map_err(|_| ShardClosed)?;
        rx.await.map_err(|_| ShardClosed)
    }
}

pub struct ShardActor {
    index: usize,
    rx: mpsc::Receiver<ShardMsg>,
    schema: Schema,
    store: StateStore,
    writer: WriterHandle,
    /// Dirty partials: everything in memory has parts the store has not seen.
    partials: HashMap<String, Partial>,
    /// Completions decided in memory since the last flush, for the store to remember.
    completed: Vec<Completion>,
    /// Records them in the store, off this actor's path.
    recorder: Recorder,
    /// The lease a document completed in the store is delivered under (the writer renews it).
    lease: Duration,
    /// Vector bytes held in `partials`.
    bytes: usize,
    /// What the resident gauges were last told, so each shard adds only its change.
    reported: (i64, i64),
    metrics: Arc<Metrics>,
    flush_interval: Duration,
    max_dirty: usize,
    stops: Stops,
    /// Consecutive failed flushes; the next attempt waits longer each time.
    failures: u32,
    /// No flush before this instant (set after a failure).
    retry_at: Option<tokio::time::Instant>,
}

/// Longest pause between flush attempts while the store fails.
const MAX_FLUSH_BACKOFF: Duration = Duration::from_secs(5);

impl ShardActor {
    /// Starts shard `index`; it runs until `cancel` fires or every handle is dropped.
    pub fn spawn(
        index: usize,
        settings: &Settings,
        schema: Schema,
        store: StateStore,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
        stops: Stops,
    ) -> (ShardHandle, tokio::task::JoinHandle<()>) {
        let (lease, settings) = (settings.durability.outbox_resend_after, &settings.shards);
        let (tx, rx) = mpsc::channel(settings.mailbox_capacity);
        let recorder = Recorder::spawn(index, store.clone(), stops.give_up.clone());
        let actor = ShardActor {
            index,
            rx,
            schema,
            store,
            writer,
            partials: HashMap::new(),
            completed: Vec::new(),
            recorder,
            lease,
            bytes: 0,
            reported: (0, 0),
            metrics,
            flush_interval: settings.flush_interval,
            max_dirty: settings.max_dirty,
            stops,
            failures: 0,
            retry_at: None,
        };
        (ShardHandle { tx }, tokio::spawn(actor.run()))
    }

    async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.flush_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.stops.cancel.cancelled() => break,
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => break,
                },
                _ = ticker.tick() => self.flush().await,
            }
        }
        // Final step: take what is already queued, then persist everything.
        self.rx.close();
        while let Some(msg) = self.rx.recv().await {
            self.handle(msg).await;
        }
        let mut attempts = 0;
        while !self.partials.is_empty() && attempts < 20 {
            self.retry_at = None;
            let give_up = self.stops.give_up.clone();
            tokio::select! {
                _ = self.flush() => {}
                _ = give_up.cancelled() => break,
            }
            if !self.partials.is_empty() {
                attempts += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = self.stops.give_up.cancelled() => break,
                }
            }
        }
        if !self.partials.is_empty() {
            tracing::error!(
                shard = self.index,
                partials = self.partials.len(),
                "Shard stopped with partials the state store did not take; they are lost."
            );
        }
        // Every completion is recorded before the shard ends (unless the deadline passes).
        let (recorder, completed, give_up) = (self.recorder, self.completed, self.stops.give_up);
        tokio::select! {
            _ = async {
                recorder.record(completed).await;
                recorder.finish().await;
            } => {}
            _ = give_up.cancelled() => {}
        }
    }

    async fn handle(&mut self, msg: ShardMsg) {
        self.metrics
            .shard_mailbox_depth
            .get_or_create(&ShardLabels { shard: self.index as u32 })
            .set(self.rx.len() as i64);
        match msg {
            ShardMsg::Parts(parts) => self.apply(parts).await,
            ShardMsg::Flush(done) => {
                self.flush().await;
                self.recorder.barrier().await;
                let _ = done.send(());
            }
            ShardMsg::Inspect(id, answer) => {
                let _ = answer.send(self.partials.get(&id).map(Partial::mask));
            }
        }
    }

    /// Applies a message's parts. The parts of one item in one message are applied
    /// together before the item is checked for completeness, so a request that carries
    /// every part of an item completes it with exactly those copies (a stable sort groups
    /// them; stamps, not positions, decide which copy is newest).
    async fn apply(&mut self, mut parts: Vec<Part>) {
        let mut complete = Vec::new();
        let slots = self.schema.len();
        parts.sort_by(|a, b| a.id.cmp(&b.id));
        let mut parts = parts.into_iter().peekable();
        while let Some(mut part) = parts.next() {
            let last_of_item = parts.peek().is_none_or(|next| next.id != part.id);
            let id = std::mem::take(&mut part.id);
            let partial = match self.partials.get_mut(&id) {
                Some(partial) => partial,
                None => self.partials.entry(id.clone()).or_insert_with(|| Partial::new(slots, part.received_at)),
            };
            let before = partial.vector_bytes();
            partial.apply(part);
            self.bytes = self.bytes + partial.vector_bytes() - before;
            if !last_of_item || !partial.is_complete(&self.schema) {
                continue;
            }
            // Complete in memory: it leaves at once; the store hears of it at the next flush.
            let partial = self.partials.remove(&id).expect("present");
            self.bytes -= partial.vector_bytes();
            self.completed.push(Completion { id: id.clone(), stamps: partial.stamps.clone() });
            complete.push(partial.into_document(id));
        }
        self.metrics
            .documents_completed
            .get_or_create(&CompletedLabels { path: CompletedIn::Memory })
            .inc_by(complete.len() as u64);
        self.send(complete).await;
        if self.partials.len() >= self.max_dirty {
            self.flush().await;
        } else {
            self.report_resident();
        }
    }

    /// Records memory completions in the store, then merges every dirty partial into it and
    /// evicts it from memory, unless the store failed recently and its backoff has not
    /// passed.
    async fn flush(&mut self) {
        if (self.partials.is_empty() && self.completed.is_empty())
            || self.retry_at.is_some_and(|at| tokio::time::Instant::now() < at)
        {
            return;
        }
        self.record();
        if self.partials.is_empty() {
            self.failures = 0;
            self.retry_at = None;
            return;
        }
        self.merge_dirty().await;
    }

    /// Hands the completions decided in memory since the last flush to the recorder.
    fn record(&mut self) {
        if self.completed.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.completed);
        // Bounded queue: when it is full, the batch waits here for the next flush.
        if let Err(full) = self.recorder.try_record(batch) {
            self.completed = full;
        }
    }

    /// Merges every dirty partial into the store, evicts them, and sends what completed.
    async fn merge_dirty(&mut self) {
        let batch: Vec<(String, Partial)> = self.partials.drain().collect();
        self.metrics.store_flushes.inc();
        self.metrics.store_merges.inc_by(batch.len() as u64);
        self.metrics.store_merge_bytes.inc_by(self.bytes as u64);
        self.bytes = 0;
        let started = Instant::now();
        let mut complete = Vec::new();
        match self.store.merge(&batch, self.lease).await {
            Ok(outcomes) => {
                let mut failed = 0;
                let mut last_error = None;
                for ((id, partial), outcome) in batch.into_iter().zip(outcomes) {
                    match outcome {
                        // Durable either way: stored as a partial, or in the outbox.
                        MergeOutcome::Persisted => ack_all(partial.acks),
                        MergeOutcome::Completed(mut doc) => {
                            doc.received_at = partial.received_at;
                            ack_all(partial.acks);
                            complete.push(doc);
                        }
                        MergeOutcome::Failed(e) => {
                            failed += 1;
                            last_error = Some(e);
                            self.restore(id, partial);
                        }
                    }
                }
                match last_error {
                    Some(error) => {
                        self.failed_flush();
                        tracing::warn!(shard = self.index, failed, %error, "Some partials were not merged; they stay in memory for the next flush.");
                    }
                    None => self.failures = 0,
                }
            }
            Err(error) => {
                self.failed_flush();
                tracing::warn!(shard = self.index, partials = batch.len(), failures = self.failures, %error, "Flush to the state store failed; partials stay in memory for the next flush.");
                for (id, partial) in batch {
                    self.restore(id, partial);
                }
            }
        }
        if self.failures == 0 {
            self.retry_at = None;
        }
        self.metrics.store_flush_seconds.observe(started.elapsed().as_secs_f64());
        let updates = complete.iter().filter(|d| d.update).count() as u64;
        self.metrics.document_updates.inc_by(updates);
        self.metrics
            .documents_completed
            .get_or_create(&CompletedLabels { path: CompletedIn::Store })
            .inc_by(complete.len() as u64 - updates);
        self.report_resident();
        self.send(complete).await;
    }

    /// Moves the shared resident gauges by this shard's change since it last reported.
    fn report_resident(&mut self) {
        let now = (self.partials.len() as i64, self.bytes as i64);
        self.metrics.partials_resident.inc_by(now.0 - self.reported.0);
        self.metrics.partial_bytes_resident.inc_by(now.1 - self.reported.1);
        self.reported = now;
    }

    fn failed_flush(&mut self) {
        self.metrics.store_flush_failures.inc();
        self.failures += 1;
        let backoff = self.flush_interval.saturating_mul(1 << self.failures.min(16)).min(MAX_FLUSH_BACKOFF);
        self.retry_at = Some(tokio::time::Instant::now() + backoff);
    }

    /// Puts back a partial whose merge failed; per part, the newest copy wins. It never
    /// completes in memory from here on unless newer parts complete it: the store may have
    /// applied it already (a lost reply), and then merging it again is what settles it.
    fn restore(&mut self, id: String, old: Partial) {
        let slots = self.schema.len();
        let partial = self.partials.entry(id).or_insert_with(|| Partial::new(slots, old.received_at));
        let before = partial.vector_bytes();
        partial.acks.extend(old.acks);
        for (slot, ((vector, meta), stamp)) in old.vectors.into_iter().zip(old.metadata).zip(old.stamps).enumerate() {
            if stamp > partial.stamps[slot] {
                partial.vectors[slot] = vector;
                partial.metadata[slot] = meta;
                partial.stamps[slot] = stamp;
            }
        }
        self.bytes = self.bytes + partial.vector_bytes() - before;
    }

    /// Hands complete documents to the writer, waiting while it is full, unless shutdown's
    /// deadline passes first: then those completed in memory are parked in the store
    /// (those completed there wait in its outbox already).
    async fn send(&self, docs: Vec<Document>) {
        if docs.is_empty() {
            return;
        }
        let permit = tokio::select! {
            permit = self.writer.reserve() => permit,
            _ = self.stops.give_up.cancelled() => Err(WriterClosed(Vec::new())),
        };
        match permit {
            Ok(permit) => permit.send(docs),
            Err(_) => self.park(docs).await,
        }
    }

    async fn park(&self, docs: Vec<Document>) {
        let memory: Vec<Document> = docs.into_iter().filter(|d| d.origin == Origin::Memory).collect();
        if memory.is_empty() {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(2), self.store.park(&memory)).await {
            Ok(Ok(())) => {
                tracing::warn!(
                    shard = self.index,
                    documents = memory.len(),
                    "Shutdown deadline passed: documents parked in the state store's outbox."
                );
                for doc in memory {
                    ack_all(doc.acks);
                }
            }
            _ => {
                let ids: Vec<&str> = memory.iter().map(|d| d.id.as_str()).collect();
                tracing::error!(
                    shard = self.index,
                    ?ids,
                    "Documents lost: shutdown's deadline passed and the state store did not take them."
                );
            }
        }
    }
}
