//! The embedded backend: an on-disk store inside the process (redb, one file), so that the
//! service runs with no server. It reproduces the Redis backend's semantics (the scripts
//! beside `redis.rs`) with these tables:
//!
//! - `items`: id -> [`Record`]: per part type the newest stamp known, the copy waiting for
//!   the others (vector, metadata), and the version of the last completion.
//! - `partial_index`: (last update ms, id) -> (), for items with a waiting copy (orphans).
//! - `remember_index`: (expiry ms, id) -> (), for completed items' records with nothing
//!   waiting: they go after `state.remember_completed`.
//! - `outbox`: id -> [`Record`] of a completed item not yet settled, with its version.
//! - `outbox_index`: (lease expiry ms, id) -> (), for resends.
//! - `dead_letters`: sequence number -> [`DeadLetter::to_json`].
//!
//! Invariants: an index entry exists exactly when its record is in the state it indexes
//! (its key's first half is the record's `updated`, or the expiry or lease kept beside
//! it); every operation keeps them in one write transaction.
//!
//! Atomicity and crashes: each call is ONE write transaction, committed with redb's
//! `Durability::Immediate` (fsync) before it returns. A transaction runs alone, so an item
//! completes exactly once, and a crash leaves the store as of the last committed call.
//! Items of a batch are still independent: an item whose stored record cannot be read
//! fails alone and the others are written.
//!
//! One process opens a store file (redb locks it): clones of one [`EmbeddedStore`] share
//! it; several instances cannot share one store, which is what Redis is for.
//! Transactions block, so they run on tokio's blocking pool, never on the runtime.

mod record;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};

use self::record::Record;
use super::{
    Completion, DeadLetter, LetterCap, LetterCursor, MergeOutcome, StateError, StoredEntry, StoredItem, StoredLetter,
    Swept,
};
use crate::config::{EmbeddedSettings, LatePartsAction, StateSettings};
use crate::model::document::{OrphanKind, Partial};
use crate::model::{Document, Schema};

const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");
const PARTIAL_INDEX: TableDefinition<(u64, &str), ()> = TableDefinition::new("partial_index");
const REMEMBER_INDEX: TableDefinition<(u64, &str), ()> = TableDefinition::new("remember_index");
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox_v2");
const OUTBOX_INDEX: TableDefinition<(u64, &str), ()> = TableDefinition::new("outbox_index_v2");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// A handle on the embedded store; cheap to clone, every clone on the same open file.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    pub(super) letter_cap: LetterCap,
}

struct Inner {
    db: Database,
    schema: Schema,
    /// How long a completed item's record is kept, in ms.
    remember_ms: u64,
    /// Newer copies for a remembered completed item update its document (late_parts).
    late_updates: bool,
}

/// One item's parts to merge, encoded before the transaction: (slot, stamp, f32 LE bytes,
/// metadata JSON).
type Writes = (String, Vec<(usize, u64, Vec<u8>, Option<Vec<u8>>)>);

/// A copy of a part by type name: (type, stamp, f32 LE bytes, metadata JSON).
type PartCopy = (String, u64, Vec<u8>, Option<Vec<u8>>);

type Index<'t> = Table<'t, (u64, &'static str), ()>;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Everything stamped at or before `deadline`, as an index range.
fn up_to(deadline: u64) -> std::ops::RangeTo<(u64, &'static str)> {
    ..(deadline.saturating_add(1), "")
}

impl EmbeddedStore {
    /// Opens the store file, creating it and its directory if missing.
    pub async fn open(
        settings: &EmbeddedSettings,
        state: &StateSettings,
        schema: &Schema,
    ) -> Result<EmbeddedStore, StateError> {
        let (path, schema, remember_ms) = (settings.path.clone(), schema.clone(), ms(state.remember_completed));
        let late_updates = state.late_parts == LatePartsAction::Update;
        let inner = blocking(move || Inner::open(&path, schema, remember_ms, late_updates)).await?;
        // The cap is set by `StateStore::connect` from durability.dead_letter_max.
        let letter_cap = LetterCap { max: usize::MAX, dropped: Default::default() };
        Ok(EmbeddedStore { inner: Arc::new(inner), letter_cap })
    }

    /// Merges each partial; one outcome per input, in order. One transaction for the batch.
    pub async fn merge(&self, batch: &[(String, Partial)], lease: Duration) -> Result<Vec<MergeOutcome>, StateError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let writes: Vec<Writes> = batch
            .iter()
            .map(|(id, partial)| {
                let parts = (partial.vectors.iter().zip(&partial.metadata).enumerate())
                    .filter_map(|(slot, (vector, meta))| {
                        let meta = meta.as_ref().map(|m| serde_json::to_vec(m).expect("metadata serialises"));
                        vector.as_ref().map(|v| (slot, partial.stamps[slot], super::redis::f32_le_bytes(v), meta))
                    })
                    .collect();
                (id.clone(), parts)
            })
            .collect();
        let inner = self.inner.clone();
        let lease_until = now_ms() + ms(lease);
        blocking(move || inner.write(|tx| inner.merge(tx, writes, lease_until))).await
    }

    /// Records completions decided in memory.
    pub async fn remember(&self, done: &[Completion]) -> Result<(), StateError> {
        if done.is_empty() {
            return Ok(());
        }
        let (inner, done) = (self.inner.clone(), done.to_vec());
        blocking(move || inner.write(|tx| inner.remember(tx, &done))).await
    }

    /// Settles outbox entries whose version is at most the given one: `(id, version)` pairs.
    pub async fn confirm(&self, done: &[(String, u64)]) -> Result<(), StateError> {
        if done.is_empty() {
            return Ok(());
        }
        let (inner, done) = (self.inner.clone(), done.to_vec());
        blocking(move || inner.write(|tx| Inner::confirm(tx, &done))).await
    }

    /// Puts the parts of updates whose document is gone back as waiting copies.
    pub async fn reopen(&self, done: &[(String, u64)]) -> Result<(), StateError> {
        let (inner, done) = (self.inner.clone(), done.to_vec());
        blocking(move || inner.write(|tx| inner.reopen(tx, &done))).await
    }

    /// Outbox entries whose lease lapsed, leased to the caller.
    pub async fn claim_outbox(&self, lease: Duration, limit: usize) -> Result<Vec<Swept>, StateError> {
        let inner = self.inner.clone();
        blocking(move || inner.write(|tx| inner.claim_outbox(tx, lease, limit))).await
    }

    /// Sets the leases of outbox entries to end `lease` from now (0 releases them).
    pub async fn renew(&self, ids: &[String], lease: Duration) -> Result<(), StateError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (inner, ids) = (self.inner.clone(), ids.to_vec());
        blocking(move || inner.write(|tx| Inner::renew(tx, &ids, now_ms() + ms(lease)))).await
    }

    /// Parks documents completed in memory in the outbox, due at once.
    pub async fn park(&self, docs: &[Document]) -> Result<(), StateError> {
        if docs.is_empty() {
            return Ok(());
        }
        let records: Vec<(String, Record)> = docs.iter().map(|d| (d.id.clone(), self.inner.outbox_record(d))).collect();
        let inner = self.inner.clone();
        blocking(move || inner.write(|tx| Inner::park(tx, records))).await
    }

    /// Orphans not updated for `older_than`; also drops completed items' records that
    /// expired.
    pub async fn sweep_orphans(
        &self,
        older_than: Duration,
        limit: usize,
        deliver_lease: Option<Duration>,
    ) -> Result<Vec<Swept>, StateError> {
        let inner = self.inner.clone();
        blocking(move || inner.write(|tx| inner.sweep_orphans(tx, older_than, limit, deliver_lease))).await
    }

    /// Appends dead letters under increasing sequence numbers, then drops the oldest past
    /// the cap, in one transaction; returns how many were dropped.
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<u64, StateError> {
        if letters.is_empty() {
            return Ok(0);
        }
        let (inner, json): (_, Vec<Vec<u8>>) = (self.inner.clone(), letters.iter().map(DeadLetter::to_json).collect());
        let max = self.letter_cap.max as u64;
        blocking(move || inner.write(|tx| Inner::dead_letter(tx, &json, max))).await
    }

    pub async fn read_dead_letters(
        &self,
        cursor: &mut LetterCursor,
        limit: usize,
    ) -> Result<Vec<StoredLetter>, StateError> {
        let (inner, from) = (self.inner.clone(), cursor.next);
        let page = blocking(move || {
            let table = inner.db.begin_read()?.open_table(DEAD_LETTERS)?;
            let mut out = Vec::new();
            for entry in table.range(from..)?.take(limit) {
                let (key, json) = entry?;
                out.push(StoredLetter { json: json.value().to_vec(), key: key.value() });
            }
            Ok(out)
        })
        .await?;
        if let Some(last) = page.last() {
            cursor.next = last.key + 1;
        }
        Ok(page)
    }

    pub async fn remove_dead_letters(
        &self,
        _cursor: &mut LetterCursor,
        letters: &[&StoredLetter],
    ) -> Result<(), StateError> {
        let (inner, keys): (_, Vec<u64>) = (self.inner.clone(), letters.iter().map(|l| l.key).collect());
        blocking(move || {
            inner.write(|tx| {
                let mut table = tx.open_table(DEAD_LETTERS)?;
                for key in keys {
                    table.remove(key)?;
                }
                Ok(())
            })
        })
        .await
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

    /// The parts stored as a partial, whether the item waits in the outbox, and its last
    /// completion; one read transaction, so a merge in between cannot show it in both
    /// places or in neither.
    pub async fn inspect(&self, id: &str) -> Result<StoredItem, StateError> {
        let (inner, id) = (self.inner.clone(), id.to_owned());
        blocking(move || {
            let tx = inner.db.begin_read()?;
            let items = tx.open_table(ITEMS)?;
            let outbox = tx.open_table(OUTBOX)?;
            let mut item = StoredItem::default();
            if let Some(bytes) = items.get(id.as_str())? {
                let record = Record::decode(bytes.value())?;
                item.partial = (record.parts.iter())
                    .filter(|p| p.vector.is_some())
                    .filter_map(|p| inner.schema.slot_of(&p.type_name))
                    .fold(0, |mask, slot| mask | (1 << slot));
                item.completed = (record.version > 0).then_some(record.version);
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
    fn open(path: &Path, schema: Schema, remember_ms: u64, late_updates: bool) -> Result<Inner, StateError> {
        let failed = |source: redb::Error| StateError::EmbeddedOpen {
            path: path.display().to_string(),
            source: Box::new(source),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| failed(redb::Error::Io(e)))?;
        }
        let db = Database::create(path).map_err(|e| failed(e.into()))?;
        let inner = Inner { db, schema, remember_ms, late_updates };
        // Creates the tables, so that read transactions find them.
        inner.write(|tx| {
            tx.open_table(ITEMS)?;
            tx.open_table(PARTIAL_INDEX)?;
            tx.open_table(REMEMBER_INDEX)?;
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

    fn merge(
        &self,
        tx: &WriteTransaction,
        batch: Vec<Writes>,
        lease_until: u64,
    ) -> Result<Vec<MergeOutcome>, StateError> {
        let mut items = Items::open(tx, self.remember_ms)?;
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(batch.len());
        for (id, parts) in batch {
            let mut record = match items.get(&id) {
                Ok(record) => record.unwrap_or_default(),
                Err(e) => {
                    outcomes.push(MergeOutcome::Failed(e));
                    continue;
                }
            };
            let before = record.clone();
            let mut wrote = false;
            // Newer copies for a remembered completed item update its document.
            let updating = self.late_updates && record.version > 0;
            let mut updates = Vec::new();
            for (slot, stamp, vector, meta) in parts {
                let type_name = &self.schema.part(slot).type_name;
                if record.stamp(type_name) < stamp && updating {
                    record.set(type_name, stamp, None, None);
                    updates.push((type_name.clone(), stamp, vector, meta));
                } else if record.stamp(type_name) < stamp {
                    record.set(type_name, stamp, Some(vector), meta);
                    wrote = true;
                }
            }
            if !updates.is_empty() {
                record.updated = now;
                items.put(&id, &before, &record)?;
                let entry = update_entry(&outbox, &id, updates, now);
                let doc = entry.and_then(|entry| {
                    let doc = self.entry(&id, &entry).into_document(&self.schema, &id)?;
                    Ok((entry, doc))
                });
                match doc {
                    Ok((entry, doc)) => {
                        put_outbox(&mut outbox, &mut outbox_index, &id, &entry, lease_until)?;
                        outcomes.push(MergeOutcome::Completed(doc));
                    }
                    Err(e) => outcomes.push(MergeOutcome::Failed(e)),
                }
                continue;
            }
            let complete =
                self.schema.parts().iter().all(|p| record.part(&p.type_name).is_some_and(|p| p.vector.is_some()));
            if !wrote || !complete {
                if wrote {
                    record.updated = now;
                    items.put(&id, &before, &record)?;
                }
                outcomes.push(MergeOutcome::Persisted);
                continue;
            }
            let mut entry = Record { updated: now, version: 0, orphan: None, update: false, parts: Vec::new() };
            for part in &mut record.parts {
                if self.schema.slot_of(&part.type_name).is_some() {
                    entry.parts.push(part.clone());
                    entry.version = entry.version.max(part.stamp);
                    part.vector = None;
                    part.meta = None;
                }
            }
            record.version = record.version.max(entry.version);
            record.updated = now;
            items.put(&id, &before, &record)?;
            if queued_version(&outbox, &id)? >= entry.version {
                outcomes.push(MergeOutcome::Persisted); // a newer completion already waits
                continue;
            }
            let doc = match self.entry(&id, &entry).into_document(&self.schema, &id) {
                Ok(doc) => doc,
                Err(e) => {
                    outcomes.push(MergeOutcome::Failed(e));
                    continue;
                }
            };
            put_outbox(&mut outbox, &mut outbox_index, &id, &entry, lease_until)?;
            outcomes.push(MergeOutcome::Completed(doc));
        }
        Ok(outcomes)
    }

    fn remember(&self, tx: &WriteTransaction, done: &[Completion]) -> Result<(), StateError> {
        let mut items = Items::open(tx, self.remember_ms)?;
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        let now = now_ms();
        for completion in done {
            let mut record = match items.get(&completion.id) {
                Ok(record) => record.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(id = %completion.id, error = %e, "An unreadable record is replaced by a completion.");
                    Record::default()
                }
            };
            let before = record.clone();
            for (part, &stamp) in self.schema.parts().iter().zip(&completion.stamps) {
                if record.stamp(&part.type_name) <= stamp {
                    record.set(&part.type_name, stamp, None, None);
                }
            }
            record.version = record.version.max(completion.stamps.iter().copied().max().unwrap_or(0));
            if self.late_updates && record.has_pending() {
                // Newer copies that came before this completion was recorded update its
                // document: they move to its outbox entry, due at once.
                let mut updates = Vec::new();
                for part in &mut record.parts {
                    if let Some(vector) = part.vector.take() {
                        updates.push((part.type_name.clone(), part.stamp, vector, part.meta.take()));
                    }
                }
                let entry = update_entry(&outbox, &completion.id, updates, now)?;
                put_outbox(&mut outbox, &mut outbox_index, &completion.id, &entry, now)?;
            }
            if before.has_pending() && record.has_pending() {
                record.updated = before.updated; // the newer copy waiting keeps its age
            } else {
                record.updated = now;
            }
            items.put(&completion.id, &before, &record)?;
        }
        Ok(())
    }

    fn reopen(&self, tx: &WriteTransaction, done: &[(String, u64)]) -> Result<(), StateError> {
        let mut items = Items::open(tx, self.remember_ms)?;
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        let now = now_ms();
        for (id, version) in done {
            let Some(lease) = lease_of(&outbox, id)? else { continue };
            let entry = match outbox.get(id.as_str())? {
                Some(bytes) => Record::decode(bytes.value())?,
                None => continue,
            };
            if entry.version > *version {
                continue; // a newer entry is delivered on its own
            }
            outbox.remove(id.as_str())?;
            outbox_index.remove((lease, id.as_str()))?;
            let before = items.get(id)?.unwrap_or_default();
            // Not remembered any more: only the waiting copies are known.
            let waiting = Record { updated: now, version: 0, orphan: None, update: false, parts: entry.parts };
            items.put(id, &before, &waiting)?;
        }
        Ok(())
    }

    fn confirm(tx: &WriteTransaction, done: &[(String, u64)]) -> Result<(), StateError> {
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        for (id, version) in done {
            let Some(lease) = lease_of(&outbox, id)? else { continue };
            if queued_version(&outbox, id)? <= *version {
                outbox.remove(id.as_str())?;
                outbox_index.remove((lease, id.as_str()))?;
            }
        }
        Ok(())
    }

    fn claim_outbox(&self, tx: &WriteTransaction, lease: Duration, limit: usize) -> Result<Vec<Swept>, StateError> {
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        let now = now_ms();
        let mut claimed = Vec::new();
        for (expiry, id) in due(&outbox_index, now, limit)? {
            let stored = outbox.get(id.as_str())?.map(|bytes| Record::decode(bytes.value()));
            let swept = match stored {
                None => {
                    outbox_index.remove((expiry, id.as_str()))?;
                    continue;
                }
                Some(Ok(entry)) => {
                    put_outbox(&mut outbox, &mut outbox_index, &id, &entry, now + ms(lease))?;
                    match self.entry(&id, &entry).into_document(&self.schema, &id) {
                        Ok(doc) => Swept::Found(doc),
                        Err(e) => Swept::Unreadable { id: id.clone(), version: entry.version, reason: e.to_string() },
                    }
                }
                Some(Err(e)) => {
                    // Unreadable: the caller dead-letters it, then settles it (any version).
                    outbox_index.remove((expiry, id.as_str()))?;
                    outbox_index.insert((now + ms(lease), id.as_str()), ())?;
                    Swept::Unreadable { id: id.clone(), version: u64::MAX, reason: e.to_string() }
                }
            };
            claimed.push(swept);
        }
        Ok(claimed)
    }

    fn renew(tx: &WriteTransaction, ids: &[String], until: u64) -> Result<(), StateError> {
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        for id in ids {
            let stored = outbox.get(id.as_str())?.map(|bytes| Record::decode(bytes.value()));
            if let Some(Ok(entry)) = stored {
                put_outbox(&mut outbox, &mut outbox_index, id, &entry, until)?;
            }
        }
        Ok(())
    }

    fn park(tx: &WriteTransaction, records: Vec<(String, Record)>) -> Result<(), StateError> {
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        let now = now_ms();
        for (id, entry) in records {
            if queued_version(&outbox, &id)? < entry.version {
                put_outbox(&mut outbox, &mut outbox_index, &id, &entry, now)?;
            }
        }
        Ok(())
    }

    fn sweep_orphans(
        &self,
        tx: &WriteTransaction,
        older_than: Duration,
        limit: usize,
        deliver_lease: Option<Duration>,
    ) -> Result<Vec<Swept>, StateError> {
        let mut items = Items::open(tx, self.remember_ms)?;
        let (mut outbox, mut outbox_index) = (tx.open_table(OUTBOX)?, tx.open_table(OUTBOX_INDEX)?);
        let now = now_ms();
        let deadline = now.saturating_sub(ms(older_than));
        let mut swept = Vec::new();
        for (updated, id) in due(&items.partial_index, deadline, limit)? {
            let record = match items.get(&id) {
                Ok(Some(record)) => record,
                Ok(None) => {
                    items.partial_index.remove((updated, id.as_str()))?;
                    continue;
                }
                Err(e) => {
                    // Unreadable: dead-lettered by the caller; the record goes.
                    items.partial_index.remove((updated, id.as_str()))?;
                    items.table.remove(id.as_str())?;
                    swept.push(Swept::Unreadable { id, version: u64::MAX, reason: e.to_string() });
                    continue;
                }
            };
            if deliver_lease.is_some() && outbox.get(id.as_str())?.is_some() {
                continue; // a completion of it waits to be settled: sweep it later
            }
            let kind = if record.version > 0 { OrphanKind::Late } else { OrphanKind::Partial };
            let mut entry = Record { updated: now, version: 0, orphan: Some(kind), update: false, parts: Vec::new() };
            let mut rest = record.clone();
            for part in &mut rest.parts {
                if part.vector.is_some() && self.schema.slot_of(&part.type_name).is_some() {
                    entry.version = entry.version.max(part.stamp);
                    entry.parts.push(part.clone());
                }
                part.vector = None;
                part.meta = None;
            }
            if kind == OrphanKind::Partial {
                rest.parts.clear(); // nothing to remember: the item never completed
            }
            rest.updated = now;
            items.put(&id, &record, &rest)?;
            let found = match self.entry(&id, &entry).into_document(&self.schema, &id) {
                Ok(doc) => Swept::Found(doc),
                Err(e) => Swept::Unreadable { id: id.clone(), version: entry.version, reason: e.to_string() },
            };
            if let Some(lease) = deliver_lease {
                put_outbox(&mut outbox, &mut outbox_index, &id, &entry, now + ms(lease))?;
            }
            swept.push(found);
        }
        // Completed items' records past `remember_completed`.
        for (expiry, id) in due(&items.remember_index, now, limit)? {
            items.remember_index.remove((expiry, id.as_str()))?;
            items.table.remove(id.as_str())?;
        }
        Ok(swept)
    }

    fn dead_letter(tx: &WriteTransaction, letters: &[Vec<u8>], max: u64) -> Result<u64, StateError> {
        let mut table = tx.open_table(DEAD_LETTERS)?;
        let next = table.last()?.map_or(0, |(key, _)| key.value() + 1);
        for (seq, json) in (next..).zip(letters) {
            table.insert(seq, json.as_slice())?;
        }
        let over = table.len()?.saturating_sub(max);
        for _ in 0..over {
            table.pop_first()?;
        }
        Ok(over)
    }

    /// An entry record read back as per-slot parts.
    fn entry(&self, id: &str, record: &Record) -> StoredEntry {
        let mut entry = StoredEntry::new(self.schema.len());
        entry.version = record.version;
        entry.orphan = record.orphan;
        entry.update = record.update;
        for part in &record.parts {
            let Some(slot) = self.schema.slot_of(&part.type_name) else { continue };
            entry.stamps[slot] = part.stamp;
            if let Some(vector) = &part.vector {
                entry.set_vector(id, slot, &part.type_name, self.schema.part(slot).dims, vector);
            }
            if let Some(meta) = &part.meta {
                match serde_json::from_slice(meta) {
                    Ok(meta) => entry.metadata[slot] = Some(meta),
                    Err(e) => entry.fail(format!("{id}: the metadata of {} is not a JSON object: {e}", part.type_name)),
                }
            }
        }
        entry
    }

    /// A document as an outbox entry record (its merged metadata rides on its first part).
    fn outbox_record(&self, doc: &Document) -> Record {
        let mut entry = Record {
            updated: now_ms(),
            version: doc.version(),
            orphan: doc.orphan,
            update: doc.update,
            parts: Vec::new(),
        };
        for (slot, part) in self.schema.parts().iter().enumerate() {
            if doc.vectors[slot].is_empty() {
                continue;
            }
            let meta = (slot == 0)
                .then(|| doc.metadata.as_ref().map(|m| serde_json::to_vec(m).expect("serialises")))
                .flatten();
            entry.set(&part.type_name, doc.stamps[slot], Some(super::redis::f32_le_bytes(&doc.vectors[slot])), meta);
        }
        entry
    }
}

/// The `items` table with the two indexes that follow its records' state.
struct Items<'t> {
    table: Table<'t, &'static str, &'static [u8]>,
    partial_index: Index<'t>,
    remember_index: Index<'t>,
    remember_ms: u64,
}

impl<'t> Items<'t> {
    fn open(tx: &'t WriteTransaction, remember_ms: u64) -> Result<Items<'t>, StateError> {
        Ok(Items {
            table: tx.open_table(ITEMS)?,
            partial_index: tx.open_table(PARTIAL_INDEX)?,
            remember_index: tx.open_table(REMEMBER_INDEX)?,
            remember_ms,
        })
    }

    fn get(&self, id: &str) -> Result<Option<Record>, StateError> {
        self.table.get(id)?.map(|bytes| Record::decode(bytes.value())).transpose()
    }

    /// Replaces `before` (the default record: none) by `after`, keeping the indexes: an
    /// item with a waiting copy is in the partial index by its last update; a completed
    /// one with none waiting is in the remember index by its expiry (its `updated` plus
    /// the remember time); an empty record is deleted.
    fn put(&mut self, id: &str, before: &Record, after: &Record) -> Result<(), StateError> {
        if before.has_pending() {
            self.partial_index.remove((before.updated, id))?;
        } else if before.version > 0 {
            self.remember_index.remove((before.updated + self.remember_ms, id))?;
        }
        if after.parts.is_empty() && after.version == 0 {
            self.table.remove(id)?;
            return Ok(());
        }
        if after.has_pending() {
            self.partial_index.insert((after.updated, id), ())?;
        } else {
            self.remember_index.insert((after.updated + self.remember_ms, id), ())?;
        }
        self.table.insert(id, after.encode().as_slice())?;
        Ok(())
    }
}

/// The version of the outbox entry of `id` (0: none).
fn queued_version(outbox: &impl ReadableTable<&'static str, &'static [u8]>, id: &str) -> Result<u64, StateError> {
    match outbox.get(id)? {
        Some(bytes) => Ok(Record::decode(bytes.value()).map_or(u64::MAX, |r| r.version)),
        None => Ok(0),
    }
}

/// The outbox entry of `id` with newer copies of some of its parts written in: a waiting
/// completion takes them in, else they make an update entry.
fn update_entry(
    outbox: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
    updates: Vec<PartCopy>,
    now: u64,
) -> Result<Record, StateError> {
    let mut entry = match outbox.get(id)? {
        Some(bytes) => Record::decode(bytes.value())?,
        None => Record { updated: now, version: 0, orphan: None, update: true, parts: Vec::new() },
    };
    for (type_name, stamp, vector, meta) in updates {
        entry.set(&type_name, stamp, Some(vector), meta);
        entry.version = entry.version.max(stamp);
    }
    Ok(entry)
}

/// The lease expiry of the outbox entry of `id`, kept in the entry's `updated`.
fn lease_of(outbox: &impl ReadableTable<&'static str, &'static [u8]>, id: &str) -> Result<Option<u64>, StateError> {
    match outbox.get(id)? {
        Some(bytes) => Ok(Some(Record::decode(bytes.value()).map_or(0, |r| r.updated))),
        None => Ok(None),
    }
}

/// Writes an outbox entry under a lease ending at `lease` (kept in its `updated`).
fn put_outbox(
    outbox: &mut Table<'_, &'static str, &'static [u8]>,
    outbox_index: &mut Index<'_>,
    id: &str,
    entry: &Record,
    lease: u64,
) -> Result<(), StateError> {
    if let Some(old) = lease_of(outbox, id)? {
        outbox_index.remove((old, id))?;
    }
    let entry = Record { updated: lease, ..entry.clone() };
    outbox.insert(id, entry.encode().as_slice())?;
    outbox_index.insert((lease, id), ())?;
    Ok(())
}

/// Up to `limit` index entries keyed at or before `deadline`, oldest first.
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
