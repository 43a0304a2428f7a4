//! Where partial documents are persisted and reconciled across instances. Storage only:
//! what a completed document's journey to the sink involves lives in `delivery`.
//!
//! Contract of a backend (both pass `tests/api/state_contract.rs`):
//! - Per item and part type the store knows the stamp of the newest copy seen
//!   ([`crate::model::stamp`]); a copy no newer is ignored, so an old copy never replaces a
//!   newer one, and re-applying a merge whose reply was lost changes nothing.
//! - [`StateStore::merge`] applies a batch of partials, each item atomically: if the item
//!   now has every part, the whole item is returned once (to exactly one caller, in any
//!   instance), moved to the outbox under a lease held by that caller, and its parts'
//!   stamps stay as a compact record (no vectors) for `state.remember_completed`.
//! - [`StateStore::remember`] records completions decided in a shard's memory: stored
//!   copies no newer than the completed ones go; nothing of a completed item stays behind
//!   as a partial.
//! - The outbox keeps a completed item until [`StateStore::confirm`] settles its version
//!   (or a newer one). [`StateStore::claim_outbox`] hands out entries whose lease lapsed;
//!   [`StateStore::renew`] extends the leases of entries being delivered.
//! - [`StateStore::sweep_orphans`] takes parts that waited longer than the partial TTL,
//!   and moves them to the outbox when they are to be delivered.
//!
//! - Dead letters are kept oldest first, at most `durability.dead_letter_max`: appending
//!   to a full store drops the oldest, and [`StateStore::dead_letter`] counts and logs each
//!   drop at ERROR (never silent). They are read back page by page with a
//!   [`LetterCursor`] and removed one by one ([`StateStore::remove_dead_letters`]) once
//!   replayed.
//!
//! Backends: [`redis`] (shared by instances) and [`embedded`] (on disk in the process, no
//! server).

pub mod embedded;
pub mod records;
pub mod redis;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

use crate::config::{Settings, StateBackend};
use crate::model::document::{Origin, OrphanKind, Partial};
use crate::model::{Document, Metadata, Schema};

/// A state-store failure. Every one but `Layout` (found at connect) is retryable: a failed
/// merge leaves the item as it was or with its new parts written, and merging again is
/// idempotent.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected reply from the store: {0}")]
    Protocol(String),
    /// The stored data does not match the configured layout (never retried: a setting is
    /// wrong).
    #[error("{0}")]
    Layout(String),
    /// One master failed the calls sent to it (the others may have succeeded).
    #[error("redis master {node}: {error}")]
    Node { node: String, error: String },
    /// `redis.wait_replicas` replicas did not confirm a durable write in time.
    #[error(
        "redis: {acked} of the {wanted} replicas required (redis.wait_replicas) confirmed the write within {timeout:?}"
    )]
    Replicas { wanted: usize, acked: usize, timeout: Duration },
    /// Boxed: redb's error is large, and every store call returns this type.
    #[error("embedded store: {0}")]
    Embedded(Box<::redb::Error>),
    /// The embedded store's file cannot be opened (or another process holds it).
    #[error("embedded store {path}: {source}")]
    EmbeddedOpen { path: String, source: Box<::redb::Error> },
}

impl From<::redb::Error> for StateError {
    fn from(e: ::redb::Error) -> StateError {
        StateError::Embedded(Box::new(e))
    }
}

/// What happened to one partial in a merge.
#[derive(Debug)]
pub enum MergeOutcome {
    /// Applied (or nothing in it was newer than what the store knows); the item is not
    /// complete, or its completion went to another caller or is already in the outbox.
    Persisted,
    /// The item is complete: in the outbox, leased to this caller.
    Completed(Document),
    /// Not applied; merge it again later.
    Failed(StateError),
}

/// What the store holds of one item, for `GET /documents/{id}` (never its vectors).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredItem {
    /// The parts stored as a partial, as a bit mask of schema slots.
    pub partial: u32,
    /// The item completed in the store and waits in its outbox until the sink settles it.
    pub in_outbox: bool,
    /// The version of the item's last completion, while the store remembers it.
    pub completed: Option<u64>,
}

/// An item read back from a store: per-slot parts, its version and what kind of entry it is.
#[derive(Debug, Default)]
pub(crate) struct StoredEntry {
    pub vectors: Vec<Option<Vec<f32>>>,
    pub stamps: Vec<u64>,
    pub metadata: Vec<Option<Metadata>>,
    pub version: u64,
    pub orphan: Option<OrphanKind>,
    /// An update of a completed item's indexed document (only some parts present).
    pub update: bool,
    /// The first field that could not be read, if any: the entry is then unreadable.
    pub error: Option<String>,
}

impl StoredEntry {
    pub fn new(slots: usize) -> StoredEntry {
        StoredEntry {
            vectors: vec![None; slots],
            stamps: vec![0; slots],
            metadata: vec![None; slots],
            ..StoredEntry::default()
        }
    }

    /// Notes a field that cannot be read (the first one wins); returns a placeholder.
    pub fn fail<T: Default>(&mut self, reason: String) -> T {
        self.error.get_or_insert(reason);
        T::default()
    }

    /// Sets a slot's vector from f32 little-endian bytes, which must be `dims` floats.
    pub fn set_vector(&mut self, id: &str, slot: usize, type_name: &str, dims: usize, bytes: &[u8]) {
        if bytes.len() != dims * 4 {
            return self.fail(format!(
                "{id}: {type_name} holds {} bytes, expected {} ({dims} dims)",
                bytes.len(),
                dims * 4
            ));
        }
        self.vectors[slot] =
            Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect());
    }

    /// Fills in the parts the caller sent and the store wrote, which a Redis merge does not
    /// send back: a slot with the caller's stamp and no vector.
    pub fn with_own(mut self, partial: &Partial) -> StoredEntry {
        for slot in 0..self.vectors.len() {
            let own = partial.vectors[slot].is_some() && partial.stamps[slot] == self.stamps[slot];
            if self.vectors[slot].is_none() && own {
                self.vectors[slot] = partial.vectors[slot].clone();
                self.metadata[slot] = partial.metadata[slot].clone();
            }
        }
        self
    }

    /// The outbox document of this entry: a completed item needs every part; an orphan
    /// keeps the parts it has. Metadata merges in slot order.
    pub fn into_document(self, schema: &Schema, id: &str) -> Result<Document, StateError> {
        if let Some(reason) = self.error {
            return Err(StateError::Protocol(reason));
        }
        if self.orphan.is_none() && !self.update {
            if let Some(slot) = self.vectors.iter().position(Option::is_none) {
                return Err(StateError::Protocol(format!("{id}: completed without {}", schema.part(slot).type_name)));
            }
        }
        Ok(Document {
            id: id.to_owned(),
            vectors: self.vectors.into_iter().map(Option::unwrap_or_default).collect(),
            stamps: self.stamps,
            metadata: crate::model::document::merge_metadata(self.metadata),
            completed_at: SystemTime::now(),
            received_at: std::time::Instant::now(),
            origin: Origin::Outbox,
            orphan: self.orphan,
            update: self.update,
            acks: Vec::new(),
        })
    }
}

/// A completion decided in a shard's memory, for the store to agree with.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: String,
    /// Per-slot stamps of the completed parts.
    pub stamps: Vec<u64>,
}

/// An outbox entry handed out, or what an orphan sweep found for one item.
#[derive(Debug)]
pub enum Swept {
    /// A document to deliver (an orphan has [`Document::orphan`] set); when it came from
    /// the outbox, it is leased to the caller.
    Found(Document),
    /// An entry that cannot be read back (e.g. the configured dims changed): to dead-letter,
    /// then settle by `version`.
    Unreadable { id: String, version: u64, reason: String },
}

/// A document the sink refused for good, kept with the reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    /// Item status from the sink, when there was one.
    pub status: Option<u16>,
    pub error_type: String,
    pub reason: String,
    pub attempts: u32,
    /// The document's source, as it was sent (`null` when it could not be read back).
    pub document: Bytes,
    pub at: SystemTime,
    /// The document's external version, so that a replay cannot overwrite a newer write
    /// (`None` in letters written before versions were kept).
    pub version: Option<u64>,
}

/// The fields of a letter's JSON before `document`.
#[derive(Deserialize)]
struct LetterHead {
    id: String,
    status: Option<u16>,
    error_type: String,
    reason: String,
    attempts: u32,
    at: String,
    #[serde(default)]
    version: Option<u64>,
}

impl DeadLetter {
    /// One JSON object, with the document embedded as it was sent, last.
    pub fn to_json(&self) -> Vec<u8> {
        let head = serde_json::json!({
            "id": self.id,
            "status": self.status,
            "error_type": self.error_type,
            "reason": self.reason,
            "attempts": self.attempts,
            "at": crate::model::document::rfc3339(self.at),
            "version": self.version,
        });
        let mut out = serde_json::to_vec(&head).expect("a JSON value serialises");
        out.pop(); // the closing brace
        out.extend_from_slice(DOCUMENT_KEY);
        out.extend_from_slice(&self.document);
        out.push(b'}');
        out
    }

    /// Reads back what [`DeadLetter::to_json`] wrote, keeping the document's bytes as they
    /// were sent (re-encoding its floats could change them).
    pub fn from_json(json: &[u8]) -> Result<DeadLetter, String> {
        // The head's strings cannot hold `,"` unescaped, and its keys are fixed: the first
        // `,"document":` is where the document starts.
        let at = json
            .windows(DOCUMENT_KEY.len())
            .position(|w| w == DOCUMENT_KEY)
            .ok_or("no `document` in the dead letter")?;
        let document = json[at + DOCUMENT_KEY.len()..].strip_suffix(b"}").ok_or("the dead letter is not an object")?;
        let mut head = json[..at].to_vec();
        head.push(b'}');
        let head: LetterHead = serde_json::from_slice(&head).map_err(|e| format!("unreadable dead letter: {e}"))?;
        let when = humantime::parse_rfc3339(&head.at).map_err(|e| format!("unreadable `at` {:?}: {e}", head.at))?;
        Ok(DeadLetter {
            id: head.id,
            status: head.status,
            error_type: head.error_type,
            reason: head.reason,
            attempts: head.attempts,
            document: Bytes::copy_from_slice(document),
            at: when,
            version: head.version,
        })
    }
}

const DOCUMENT_KEY: &[u8] = b",\"document\":";

/// A dead letter as stored, with where it sits so that it can be removed.
#[derive(Debug, Clone)]
pub struct StoredLetter {
    /// [`DeadLetter::to_json`] as stored.
    pub json: Vec<u8>,
    /// The embedded store's sequence number; unused by Redis (a list has no keys).
    key: u64,
}

/// Where a walk through the dead letters is, oldest first.
#[derive(Debug, Default)]
pub struct LetterCursor {
    /// Redis: the list index of the next letter; embedded: the next sequence number.
    next: u64,
}

/// How many dead letters a backend keeps, and the count of those it dropped.
#[derive(Debug, Clone)]
pub(crate) struct LetterCap {
    pub max: usize,
    pub dropped: Counter,
}

/// The configured state backend.
#[derive(Clone)]
pub enum StateStore {
    /// Boxed: a handle on either kind of Redis connection is large.
    Redis(Box<redis::RedisStore>),
    Embedded(embedded::EmbeddedStore),
}

/// Calls the same method on whichever backend this is.
macro_rules! each {
    ($self:ident.$method:ident($($arg:expr),*)) => {
        match $self {
            StateStore::Redis(s) => s.$method($($arg),*).await,
            StateStore::Embedded(s) => s.$method($($arg),*).await,
        }
    };
}

impl StateStore {
    pub async fn connect(settings: &Settings, schema: &Schema) -> Result<StateStore, StateError> {
        match settings.state.backend {
            StateBackend::Redis => {
                let mut store = redis::RedisStore::connect(
                    &settings.redis,
                    &settings.state,
                    settings.durability.maintenance_interval,
                    schema,
                )
                .await?;
                store.letter_cap.max = settings.durability.dead_letter_max;
                Ok(StateStore::Redis(Box::new(store)))
            }
            StateBackend::Embedded => {
                let mut store = embedded::EmbeddedStore::open(&settings.embedded, &settings.state, schema).await?;
                store.letter_cap.max = settings.durability.dead_letter_max;
                Ok(StateStore::Embedded(store))
            }
        }
    }

    /// Merges each partial atomically; one outcome per input, in order. Completed items
    /// are leased to this caller for `lease`.
    pub async fn merge(&self, batch: &[(String, Partial)], lease: Duration) -> Result<Vec<MergeOutcome>, StateError> {
        each!(self.merge(batch, lease))
    }

    /// Records completions decided in memory (see the module's contract).
    pub async fn remember(&self, done: &[Completion]) -> Result<(), StateError> {
        each!(self.remember(done))
    }

    /// Settles outbox entries: `(id, version)` pairs; an entry goes if its version is at
    /// most the settled one.
    pub async fn confirm(&self, done: &[(String, u64)]) -> Result<(), StateError> {
        each!(self.confirm(done))
    }

    /// Updates whose document is gone from the index: `(id, version)` pairs. The parts of
    /// each outbox entry of at most that version go back into the item as waiting copies,
    /// and the item is no longer remembered as completed: it joins again as a new item.
    pub async fn reopen(&self, done: &[(String, u64)]) -> Result<(), StateError> {
        if done.is_empty() {
            return Ok(());
        }
        each!(self.reopen(done))
    }

    /// Outbox entries whose lease lapsed, leased to the caller for `lease`.
    pub async fn claim_outbox(&self, lease: Duration, limit: usize) -> Result<Vec<Swept>, StateError> {
        each!(self.claim_outbox(lease, limit))
    }

    /// Sets the leases of outbox entries the caller delivers to end `lease` from now
    /// (renewal; `Duration::ZERO` releases them for a resend by anyone).
    pub async fn renew(&self, ids: &[String], lease: Duration) -> Result<(), StateError> {
        each!(self.renew(ids, lease))
    }

    /// Puts documents completed in memory into the outbox, due at once (shutdown).
    pub async fn park(&self, docs: &[Document]) -> Result<(), StateError> {
        each!(self.park(docs))
    }

    /// Parts not updated for `older_than` whose item is incomplete. With `deliver_lease`
    /// they move to the outbox under that lease; without, they are removed. Also removes
    /// completed items' records older than `state.remember_completed` (Redis: a few of its
    /// record buckets per call, see [`records`]).
    pub async fn sweep_orphans(
        &self,
        older_than: Duration,
        limit: usize,
        deliver_lease: Option<Duration>,
    ) -> Result<Vec<Swept>, StateError> {
        each!(self.sweep_orphans(older_than, limit, deliver_lease))
    }

    /// Takes this instance's share of the maintenance (outbox resends, the orphan sweep)
    /// for the next rounds, `round` apart: instances sharing a Redis split its buckets. A
    /// store that never takes one visits every bucket. Returns the number of ranges held
    /// (the embedded store has one owner: 1).
    pub async fn take_share(&self, round: Duration) -> Result<usize, StateError> {
        match self {
            StateStore::Redis(s) => Ok(s.take_share(round).await?.len()),
            StateStore::Embedded(_) => Ok(1),
        }
    }

    /// Gives up this instance's share of the maintenance (at shutdown), for the others
    /// to take at once.
    pub async fn release_share(&self) -> Result<(), StateError> {
        match self {
            StateStore::Redis(s) => s.release_share().await,
            StateStore::Embedded(_) => Ok(()),
        }
    }

    /// `true` when the store has lost everything it held since the last check.
    pub async fn check_epoch(&self) -> Result<bool, StateError> {
        each!(self.check_epoch())
    }

    /// Appends documents the sink refused for good; when that takes the store past
    /// `durability.dead_letter_max`, the oldest letters are dropped, counted and logged.
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StateError> {
        let dropped = each!(self.dead_letter(letters))?;
        if dropped > 0 {
            let cap = self.letter_cap();
            cap.dropped.inc_by(dropped);
            tracing::error!(
                dropped,
                dead_letter_max = cap.max,
                "The dead-letter store is full: its oldest letters were dropped and are lost. \
                 Replay or remove letters (`embedjoin dead-letters`), or raise durability.dead_letter_max."
            );
        }
        Ok(())
    }

    /// Counts dropped dead letters in `counter` (the service's metric) from now on; call it
    /// before cloning the store.
    pub fn count_dropped_letters_in(&mut self, counter: Counter) {
        match self {
            StateStore::Redis(s) => s.letter_cap.dropped = counter,
            StateStore::Embedded(s) => s.letter_cap.dropped = counter,
        }
    }

    fn letter_cap(&self) -> &LetterCap {
        match self {
            StateStore::Redis(s) => &s.letter_cap,
            StateStore::Embedded(s) => &s.letter_cap,
        }
    }

    /// The next `limit` dead letters after `cursor`, oldest first (none at the end).
    pub async fn read_dead_letters(
        &self,
        cursor: &mut LetterCursor,
        limit: usize,
    ) -> Result<Vec<StoredLetter>, StateError> {
        each!(self.read_dead_letters(cursor, limit))
    }

    /// Removes letters read with `cursor` (those already gone are skipped); the cursor
    /// stays on the next unread letter.
    pub async fn remove_dead_letters(
        &self,
        cursor: &mut LetterCursor,
        letters: &[&StoredLetter],
    ) -> Result<(), StateError> {
        each!(self.remove_dead_letters(cursor, letters))
    }

    /// What the store holds of `id`: its stored parts, whether it waits in the outbox, and
    /// whether it is remembered as completed.
    pub async fn inspect(&self, id: &str) -> Result<StoredItem, StateError> {
        each!(self.inspect(id))
    }

    /// Whether the backend answers.
    pub async fn ping(&self) -> Result<(), StateError> {
        each!(self.ping())
    }
}
