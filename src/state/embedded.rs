//! The embedded backend: an on-disk store inside the process (redb, one file), so that the
//! service runs with no server. It reproduces the Redis backend's semantics (`merge.lua`,
//! `confirm.lua`, `expire.lua`) with these tables:
//!
//! - `partials`: id -> [`Record`] of an incomplete item (its parts, last update).
//! - `partial_index`: (last update ms, id) -> (), for the orphan sweeper.
//! - `outbox`: id -> [`Record`] of a completed item not yet confirmed by the sink, with its
//!   completion token.
//! - `outbox_index`: (completion or last claim ms, id) -> (), for resends.
//! - `dead_letters`: sequence number -> [`DeadLetter::to_json`].
//!
//! Invariants: a record's stamp is its index key's first half, and an index entry exists
//! exactly when its record does; every operation keeps both in one write transaction.
//!
//! Atomicity and crashes: each call is ONE write transaction, committed with redb's
//! `Durability::Immediate` (fsync) before it returns. A transaction runs alone, so an item
//! completes exactly once, and a crash leaves the store as of the last committed call:
//! what `merge` answered is on disk. Items of a batch are still independent: an item whose
//! stored record cannot be read fails alone and the others are written. A call whose caller
//! stopped waiting still commits; an item it completed waits in the outbox for a resend.
//!
//! One process opens a store file (redb locks it): clones of one [`EmbeddedStore`] share
//! it; several instances cannot share one store, which is what Redis is for.
//! Transactions block, so they run on tokio's blocking pool, never on the runtime.

mod record;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use self::record::Record;
use super::{completed_document, DeadLetter, MergeOutcome, Orphan, StateError, StoredItem};
use crate::config::EmbeddedSettings;
use crate::model::document::{merge_metadata, Partial};
use crate::model::{Document, Metadata, Schema};

const PARTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("partials");
const PARTIAL_INDEX: TableDefinition<(u64, &str), ()> = TableDefinition::new("partial_index");
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");
const OUTBOX_INDEX: TableDefinition<(u64, &str), ()> = TableDefinition::new("outbox_index");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// A handle on the embedded store; cheap to clone, every clone on the same open file.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    schema: Schema,
    /// Makes completion tokens unique across runs: a random id of this open, and a counter.
    instance: u64,
    batches: AtomicU64,
}

/// One item's new parts, encoded before the transaction: (slot, f32 LE bytes, metadata JSON).
type Writes = (String, Vec<(usize, Vec<u8>, Option<Vec<u8>>)>);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Everything stamped at or before `deadline`, as an index range.
fn up_to(deadline: u64) -> std::ops::RangeTo<(u64, &'static str)> {
    ..(deadline.saturating_add(1), "")
}

impl EmbeddedStore {
    /// Opens the store file, creating it and its directory if missing.
    pub async fn open(settings: &EmbeddedSettings, schema: &Schema) -> Result<EmbeddedStore, StateError> {
        let (path, schema) = (settings.path.clone(), schema.clone());
        let inner = blocking(move || Inner::open(&path, schema)).await?;
        Ok(EmbeddedStore { inner: Arc::new(inner) })
    }

    /// Merges each partial; one outcome per input, in order. One transaction for the batch.
    pub async fn merge(&self, batch: &[(String, Partial)]) -> Result<Vec<MergeOutcome>, StateError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let writes: Vec<Writes> = batch
            .iter()
            .map(|(id, partial)| {
                let parts = (partial.vectors.iter().zip(&partial.metadata).enumerate())
                    .filter_map(|(slot, (vector, meta))| {
                        let meta = meta.as_ref().map(|m| serde_json::to_vec(m).expect("metadata serialises"));
                        vector.as_ref().map(|v| (slot, super::redis::f32_le_bytes(v), meta))
                    })
                    .collect();
                (id.clone(), parts)
            })
            .collect();
        let inner = self.inner.clone();
        let token = format!("{:x}-{}", inner.instance, inner.batches.fetch_add(1, Ordering::Relaxed));
        blocking(move || inner.write(|tx| inner.merge(tx, writes, &token))).await
    }

    /// Removes outbox entries whose completion token matches: `(id, token)` pairs.
    pub async fn confirm(&self, done: &[(String, String)]) -> Result<(), StateError> {
        if done.is_empty() {
            return Ok(());
        }
        let (inner, done) = (self.inner.clone(), done.to_vec());
        blocking(move || inner.write(|tx| Inner::confirm(tx, &done))).await
    }

    /// Outbox entries completed (or claimed) more than `older_than` ago, re-stamped now.
    pub async fn claim_outbox(&self, older_than: Duration, limit: usize) -> Result<Vec<Document>, StateError> {
        let inner = self.inner.clone();
        blocking(move || inner.write(|tx| inner.claim_outbox(tx, older_than, limit))).await
    }

    /// Partials not updated for `older_than`, removed.
    pub async fn take_orphans(&self, older_than: Duration, limit: usize) -> Result<Vec<Orphan>, StateError> {
        let inner = self.inner.clone();
        blocking(move || inner.write(|tx| inner.take_orphans(tx, older_than, limit))).await
    }

    /// Appends dead letters under increasing sequence numbers.
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StateError> {
        if letters.is_empty() {
            return Ok(());
        }
        let (inner, json): (_, Vec<Vec<u8>>) = (self.inner.clone(), letters.iter().map(DeadLetter::to_json).collect());
        blocking(move || inner.write(|tx| Inner::dead_letter(tx, &json))).await
    }

    /// Every dead letter, oldest first (tests, inspection).
    pub async fn dead_letters(&self) -> Result<Vec<Vec<u8>>, StateError> {
        let inner = self.inner.clone();
        blocking(move || {
            let table = inner.db.begin_read()?.open_table(DEAD_LETTERS)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                out.push(entry?.1.value().to_vec());
            }
            Ok(out)
        })
        .await
    }

    /// The parts stored as a partial, and whether the item waits in the outbox; one read
    /// transaction, so a merge in between cannot show it in both places or in neither.
    pub async fn inspect(&self, id: &str) -> Result<StoredItem, StateError> {
        let (inner, id) = (self.inner.clone(), id.to_owned());
        blocking(move || {
            let tx = inner.db.begin_read()?;
            let partials = tx.open_table(PARTIALS)?;
            let outbox = tx.open_table(OUTBOX)?;
            let mut item = StoredItem::default();
            if let Some(bytes) = partials.get(id.as_str())? {
                let record = Record::decode(bytes.value())?;
                item.partial = (record.parts.iter())
                    .filter_map(|p| inner.schema.slot_of(&p.type_name))
                    .fold(0, |mask, slot| mask | (1 << slot));
            }
            item.in_outbox = outbox.get(id.as_str())?.is_some();
            Ok(item)
        })
        .await
    }

    /// A store in this process cannot lose its data behind its back: always `false`.
    pub async fn check_epoch(&self) -> Result<bool, StateError> {
        Ok(false)
    }

    pub async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}

// redb's errors, one type per step, into the store's error (through `redb::Error`).
macro_rules! from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for StateError {
            fn from(e: $error) -> StateError {
                redb::Error::from(e).into()
            }
        }
    )*};
}
from_redb!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// Runs a transaction on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Protocol(format!("the embedded store's task failed: {e}")))?
}

impl Inner {
    fn open(path: &Path, schema: Schema) -> Result<Inner, StateError> {
        let failed = |source: redb::Error| StateError::EmbeddedOpen {
            path: path.display().to_string(),
            source: Box::new(source),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| failed(redb::Error::Io(e)))?;
        }
        let db = Database::create(path).map_err(|e| failed(e.into()))?;
        let inner = Inner { db, schema, instance: rand::random(), batches: AtomicU64::new(0) };
        // Creates the tables, so that read transactions find them.
        inner.write(|tx| {
            tx.open_table(PARTIALS)?;
            tx.open_table(PARTIAL_INDEX)?;
            tx.open_table(OUTBOX)?;
            tx.open_table(OUTBOX_INDEX)?;
            tx.open_table(DEAD_LETTERS)?;
            Ok(())
        })?;
        Ok(inner)
    }

    /// Runs `f` in one write transaction and commits it (fsync) if `f` succeeds.
    fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T, StateError>) -> Result<T, StateError> {
        let tx = self.db.begin_write()?;
        let out = f(&tx)?; // an error drops `tx`, which aborts it
        tx.commit()?;
        Ok(out)
    }

    fn merge(&self, tx: &WriteTransaction, batch: Vec<Writes>, token: &str) -> Result<Vec<MergeOutcome>, StateError> {
        let (mut partials, mut partial_index) = (tx.open_table(PARTIALS)?, tx.open_table(PARTIAL_INDEX)?);
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(batch.len());
        for (id, parts) in batch {
            let stored = match partials.get(id.as_str())? {
                Some(bytes) => Record::decode(bytes.value()).map(Some),
                None => Ok(None),
            };
            let (mut record, existed) = match stored {
                Ok(Some(record)) => (record, true),
                Ok(None) => (Record::default(), false),
                Err(e) => {
                    outcomes.push(MergeOutcome::Failed(e));
                    continue;
                }
            };
            let old_stamp = record.stamp;
            for (slot, vector, meta) in parts {
                record.set(&self.schema.part(slot).type_name, vector, meta);
            }
            record.stamp = now;
            let complete = self.schema.parts().iter().all(|p| record.part(&p.type_name).is_some());
            if !complete {
                if existed {
                    partial_index.remove((old_stamp, id.as_str()))?;
                }
                partials.insert(id.as_str(), record.encode().as_slice())?;
                partial_index.insert((now, id.as_str()), ())?;
                outcomes.push(MergeOutcome::Persisted);
                continue;
            }
            record.token = Some(token.to_owned());
            let doc = match self.document(&id, &record) {
                Ok(doc) => doc,
                Err(e) => {
                    outcomes.push(MergeOutcome::Failed(e));
                    continue;
                }
            };
            if existed {
                partials.remove(id.as_str())?;
                partial_index.remove((old_stamp, id.as_str()))?;
            }
            // A newer completion replaces an unconfirmed one (RENAME in Redis): only the
            // newest token confirms it.
            let replaced =
                outbox.insert(id.as_str(), record.encode().as_slice())?.map(|old| Record::decode(old.value()));
            if let Some(Ok(old)) = replaced {
                outbox_index.remove((old.stamp, id.as_str()))?;
            }
            outbox_index.insert((now, id.as_str()), ())?;
            outcomes.push(MergeOutcome::Completed(doc));
        }
        Ok(outcomes)
    }

    fn confirm(tx: &WriteTransaction, done: &[(String, String)]) -> Result<(), StateError> {
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        for (id, token) in done {
            let stamp = match outbox.get(id.as_str())? {
                Some(bytes) => match Record::decode(bytes.value()) {
                    Ok(record) if record.token.as_deref() == Some(token.as_str()) => record.stamp,
                    _ => continue,
                },
                None => continue,
            };
            outbox.remove(id.as_str())?;
            outbox_index.remove((stamp, id.as_str()))?;
        }
        Ok(())
    }

    fn claim_outbox(
        &self,
        tx: &WriteTransaction,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<Document>, StateError> {
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        let now = now_ms();
        let due = due(&outbox_index, now.saturating_sub(older_than.as_millis() as u64), limit)?;
        let mut docs = Vec::with_capacity(due.len());
        for (stamp, id) in due {
            outbox_index.remove((stamp, id.as_str()))?;
            let stored = outbox.get(id.as_str())?.map(|bytes| Record::decode(bytes.value()));
            let mut record = match stored {
                Some(Ok(record)) => record,
                Some(Err(e)) => {
                    // Unreadable: keep it, out of the index so that it is not claimed again.
                    tracing::error!(%id, error = %e, "An outbox entry cannot be read; it stays in the embedded store.");
                    continue;
                }
                None => continue,
            };
            record.stamp = now;
            match self.document(&id, &record) {
                Ok(doc) => docs.push(doc),
                Err(e) => {
                    tracing::error!(%id, error = %e, "An outbox entry cannot be read; it stays in the embedded store.");
                    continue;
                }
            }
            outbox.insert(id.as_str(), record.encode().as_slice())?;
            outbox_index.insert((now, id.as_str()), ())?;
        }
        Ok(docs)
    }

    fn take_orphans(
        &self,
        tx: &WriteTransaction,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<Orphan>, StateError> {
        let (mut partials, mut partial_index) = (tx.open_table(PARTIALS)?, tx.open_table(PARTIAL_INDEX)?);
        let due = due(&partial_index, now_ms().saturating_sub(older_than.as_millis() as u64), limit)?;
        let mut orphans = Vec::with_capacity(due.len());
        for (stamp, id) in due {
            partial_index.remove((stamp, id.as_str()))?;
            let Some(stored) = partials.remove(id.as_str())?.map(|bytes| Record::decode(bytes.value())) else {
                continue;
            };
            match stored {
                Ok(record) => {
                    let (vectors, metadata) = self.slots(&id, &record);
                    orphans.push(Orphan { id, vectors, metadata: merge_metadata(metadata) });
                }
                Err(e) => tracing::error!(%id, error = %e, "An unreadable partial expired; it is lost."),
            }
        }
        Ok(orphans)
    }

    fn dead_letter(tx: &WriteTransaction, letters: &[Vec<u8>]) -> Result<(), StateError> {
        let mut table = tx.open_table(DEAD_LETTERS)?;
        let next = table.last()?.map_or(0, |(key, _)| key.value() + 1);
        for (seq, json) in (next..).zip(letters) {
            table.insert(seq, json.as_slice())?;
        }
        Ok(())
    }

    /// A record's vectors and metadata by schema slot. A vector of the wrong size (the
    /// configured dims changed) counts as missing.
    fn slots(&self, id: &str, record: &Record) -> (Vec<Option<Vec<f32>>>, Vec<Option<Metadata>>) {
        let n = self.schema.len();
        let (mut vectors, mut metadata) = (vec![None; n], vec![None; n]);
        for part in &record.parts {
            let Some(slot) = self.schema.slot_of(&part.type_name) else { continue };
            let dims = self.schema.part(slot).dims;
            if part.vector.len() != dims * 4 {
                tracing::warn!(%id, part = %part.type_name, bytes = part.vector.len(), dims, "A stored part has the wrong size; it is ignored.");
                continue;
            }
            vectors[slot] =
                Some(part.vector.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect());
            metadata[slot] = part.meta.as_deref().and_then(|m| serde_json::from_slice(m).ok());
        }
        (vectors, metadata)
    }

    /// A complete record as its document, metadata merged in slot order.
    fn document(&self, id: &str, record: &Record) -> Result<Document, StateError> {
        let (vectors, metadata) = self.slots(id, record);
        completed_document(&self.schema, id, vectors, metadata, record.token.clone())
    }
}

/// Up to `limit` index entries stamped at or before `deadline`, oldest first.
fn due(
    index: &impl ReadableTable<(u64, &'static str), ()>,
    deadline: u64,
    limit: usize,
) -> Result<Vec<(u64, String)>, StateError> {
    let mut out = Vec::new();
    for entry in index.range(up_to(deadline))?.take(limit) {
        let (key, _) = entry?;
        let (stamp, id) = key.value();
        out.push((stamp, id.to_owned()));
    }
    Ok(out)
}
