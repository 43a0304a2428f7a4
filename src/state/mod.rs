//! Where partial documents are persisted and reconciled across instances.
//!
//! Contract of a backend:
//! - [`StateStore::merge`] applies a batch of partials, each one atomically: the new parts
//!   are written, and if the item now has every part, the whole item is returned once (to
//!   exactly one caller, in any instance) and moved to the outbox with a completion token.
//!   Items are independent; a failed item does not fail the others, and is safe to merge
//!   again.
//! - The outbox keeps a completed item until [`StateStore::confirm`] says the sink took it
//!   (indexed or dead-lettered); [`StateStore::claim_outbox`] hands out entries that were not
//!   confirmed in time, for a resend (after a crash, or a lost confirmation).
//! - [`StateStore::take_orphans`] removes and returns partials not updated for a while.
//!
//! Backends: [`redis`] (shared by instances) and [`embedded`] (on disk in the process, no
//! server); both pass the same contract tests (`tests/api/state_contract.rs`).

pub mod embedded;
pub mod maintenance;
pub mod redis;

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::config::{Settings, StateBackend};
use crate::model::document::Partial;
use crate::model::{Document, Metadata, Schema};

/// A state-store failure. Every one is retryable: a failed merge leaves the item as it was
/// or with its new parts written, and merging again is idempotent.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected reply from the store: {0}")]
    Protocol(String),
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
    /// Written; the item still misses parts.
    Persisted,
    /// The item is complete; it has been removed from the store.
    Completed(Document),
    /// Not applied; merge it again later.
    Failed(StateError),
}

/// What the store holds of one item, for `GET /documents/{id}` (never its vectors).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredItem {
    /// The parts stored as a partial, as a bit mask of schema slots.
    pub partial: u32,
    /// The item completed in the store and waits in its outbox until the sink confirms it.
    pub in_outbox: bool,
}

/// Assembles a completed item read back from a store (per-slot vectors and metadata, and
/// its outbox token): every slot must hold its vector; metadata merges in slot order.
pub(crate) fn completed_document(
    schema: &Schema,
    id: &str,
    vectors: Vec<Option<Vec<f32>>>,
    metadata: Vec<Option<Metadata>>,
    outbox: Option<String>,
) -> Result<Document, StateError> {
    let vectors = vectors
        .into_iter()
        .enumerate()
        .map(|(slot, v)| {
            v.ok_or_else(|| StateError::Protocol(format!("{id}: completed without {}", schema.part(slot).type_name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Document {
        id: id.to_owned(),
        vectors,
        metadata: crate::model::document::merge_metadata(metadata),
        completed_at: SystemTime::now(),
        received_at: std::time::Instant::now(),
        outbox,
        acks: Vec::new(),
    })
}

/// A partial item that expired before it completed.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub id: String,
    /// One optional vector per schema slot.
    pub vectors: Vec<Option<Vec<f32>>>,
    pub metadata: Option<Metadata>,
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
    /// The document's source, as it was sent.
    pub document: Bytes,
    pub at: SystemTime,
}

impl DeadLetter {
    /// One JSON object, with the document embedded as it was sent.
    pub fn to_json(&self) -> Vec<u8> {
        let head = serde_json::json!({
            "id": self.id,
            "status": self.status,
            "error_type": self.error_type,
            "reason": self.reason,
            "attempts": self.attempts,
            "at": crate::model::document::rfc3339(self.at),
        });
        let mut out = serde_json::to_vec(&head).expect("a JSON value serialises");
        out.pop(); // the closing brace
        out.extend_from_slice(b",\"document\":");
        out.extend_from_slice(&self.document);
        out.push(b'}');
        out
    }
}

/// The configured state backend.
#[derive(Clone)]
pub enum StateStore {
    Redis(redis::RedisStore),
    Embedded(embedded::EmbeddedStore),
}

impl StateStore {
    pub async fn connect(settings: &Settings, schema: &Schema) -> Result<StateStore, StateError> {
        match settings.state.backend {
            StateBackend::Redis => Ok(StateStore::Redis(redis::RedisStore::connect(&settings.redis, schema).await?)),
            StateBackend::Embedded => {
                Ok(StateStore::Embedded(embedded::EmbeddedStore::open(&settings.embedded, schema).await?))
            }
        }
    }

    /// Merges each partial atomically; one outcome per input, in order.
    pub async fn merge(&self, batch: &[(String, Partial)]) -> Result<Vec<MergeOutcome>, StateError> {
        match self {
            StateStore::Redis(s) => s.merge(batch).await,
            StateStore::Embedded(s) => s.merge(batch).await,
        }
    }

    /// Removes confirmed completions from the outbox: `(id, completion token)` pairs.
    pub async fn confirm(&self, done: &[(String, String)]) -> Result<(), StateError> {
        match self {
            StateStore::Redis(s) => s.confirm(done).await,
            StateStore::Embedded(s) => s.confirm(done).await,
        }
    }

    /// Outbox entries not confirmed within `older_than`, claimed for a resend.
    pub async fn claim_outbox(&self, older_than: Duration, limit: usize) -> Result<Vec<Document>, StateError> {
        match self {
            StateStore::Redis(s) => s.claim_outbox(older_than, limit).await,
            StateStore::Embedded(s) => s.claim_outbox(older_than, limit).await,
        }
    }

    /// Partials not updated for `older_than`, removed from the store.
    pub async fn take_orphans(&self, older_than: Duration, limit: usize) -> Result<Vec<Orphan>, StateError> {
        match self {
            StateStore::Redis(s) => s.take_orphans(older_than, limit).await,
            StateStore::Embedded(s) => s.take_orphans(older_than, limit).await,
        }
    }

    /// `true` when the store has lost everything it held since the last check.
    pub async fn check_epoch(&self) -> Result<bool, StateError> {
        match self {
            StateStore::Redis(s) => s.check_epoch().await,
            StateStore::Embedded(s) => s.check_epoch().await,
        }
    }

    /// Appends documents the sink refused for good.
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StateError> {
        match self {
            StateStore::Redis(s) => s.dead_letter(letters).await,
            StateStore::Embedded(s) => s.dead_letter(letters).await,
        }
    }

    /// What the store holds of `id`: its stored parts and whether it waits in the outbox.
    pub async fn inspect(&self, id: &str) -> Result<StoredItem, StateError> {
        match self {
            StateStore::Redis(s) => s.inspect(id).await,
            StateStore::Embedded(s) => s.inspect(id).await,
        }
    }

    /// Whether the backend answers.
    pub async fn ping(&self) -> Result<(), StateError> {
        match self {
            StateStore::Redis(s) => s.ping().await,
            StateStore::Embedded(s) => s.ping().await,
        }
    }
}
