//! Records the completions a shard decides in memory in the state store, off the shard's
//! path: the shard hands each flush's completions over and goes on applying parts, and
//! this task writes them (`StateStore::remember`), in order, retrying while the store
//! fails. Recording commutes with the shard's merges (both keep, per part, the newest
//! stamp), so it need not happen before them; `barrier` waits for what was handed over
//! (an explicit flush answers only after it).
//!
//! What may be lost: completions not yet recorded when shutdown's deadline passes (or the
//! process dies). Their documents are delivered or parked all the same; what is lost is
//! the cleanup of older stored copies, which then complete later with an older version
//! (superseded in the index) or expire as orphans.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::state::{Completion, StateStore};

/// Batches waiting before the shard waits too: bounded, like every queue.
const QUEUE: usize = 8;
/// Most completions in one store call.
const CHUNK: usize = 1000;
/// Longest pause between attempts while the store fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

enum Job {
    Record(Vec<Completion>),
    Barrier(oneshot::Sender<()>),
}

/// A shard's recorder: a task and the queue to it.
pub struct Recorder {
    tx: mpsc::Sender<Job>,
    task: JoinHandle<()>,
}

impl Recorder {
    pub fn spawn(shard: usize, store: StateStore, give_up: CancellationToken) -> Recorder {
        let (tx, rx) = mpsc::channel(QUEUE);
        Recorder { tx, task: tokio::spawn(run(shard, store, rx, give_up)) }
    }

    /// Hands completions over without waiting; gives them back when `QUEUE` batches wait
    /// already (the store is slow or down: the shard keeps them for its next flush).
    pub fn try_record(&self, batch: Vec<Completion>) -> Result<(), Vec<Completion>> {
        self.tx.try_send(Job::Record(batch)).map_err(|e| match e.into_inner() {
            Job::Record(batch) => batch,
            Job::Barrier(_) => unreachable!("a record job was sent"),
        })
    }

    /// Hands completions over, waiting for room in the queue.
    pub async fn record(&self, batch: Vec<Completion>) {
        if !batch.is_empty() {
            let _ = self.tx.send(Job::Record(batch)).await;
        }
    }

    /// Resolves once everything handed over before is recorded (or given up on).
    pub async fn barrier(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Job::Barrier(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Records what is queued, then stops.
    pub async fn finish(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

async fn run(shard: usize, store: StateStore, mut rx: mpsc::Receiver<Job>, give_up: CancellationToken) {
    while let Some(job) = rx.recv().await {
        let batch = match job {
            Job::Record(batch) => batch,
            Job::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
        };
        // A shard whose recorder fell behind hands over large batches: each store call
        // takes a bounded part, so that it ends within the store's response timeout.
        for (i, chunk) in batch.chunks(CHUNK).enumerate() {
            if !record(shard, &store, chunk, &give_up).await {
                lost(shard, batch.len() - i * CHUNK);
                break;
            }
        }
    }
}

/// Records one chunk, retrying while the store fails; `false` if shutdown gave up first.
async fn record(shard: usize, store: &StateStore, chunk: &[Completion], give_up: &CancellationToken) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = tokio::select! {
            r = store.remember(chunk) => r,
            _ = give_up.cancelled() => return false,
        };
        let Err(error) = result else { return true };
        tracing::warn!(shard, documents = chunk.len(), %error, "Cannot record completions in the state store; retrying.");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(MAX_BACKOFF),
            _ = give_up.cancelled() => return false,
        }
    }
}

fn lost(shard: usize, documents: usize) {
    tracing::warn!(
        shard,
        documents,
        "Shutdown's deadline passed before the state store recorded some completions; older copies of their parts stored earlier may complete again later (the index keeps the newest version)."
    );
}
