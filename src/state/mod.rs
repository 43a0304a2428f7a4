//! Where partial documents are persisted and reconciled across instances.
//!
//! Contract of a backend: [`StateStore::merge`] applies a batch of partials, each one
//! atomically: the new parts are written, and if the item now has every part, the whole
//! item is returned once (to exactly one caller, in any instance) and removed. Items are
//! independent; a failed item does not fail the others, and is safe to merge again.

pub mod redis;

use std::time::SystemTime;

use bytes::Bytes;

use crate::config::{Settings, StateBackend};
use crate::model::document::Partial;
use crate::model::{Document, Schema};

/// A state-store failure. Every one is retryable: a failed merge leaves the item as it was
/// or with its new parts written, and merging again is idempotent.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected reply from the store: {0}")]
    Protocol(String),
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
}

impl StateStore {
    pub async fn connect(settings: &Settings, schema: &Schema) -> Result<StateStore, StateError> {
        match settings.state.backend {
            StateBackend::Redis => Ok(StateStore::Redis(
                redis::RedisStore::connect(&settings.redis, schema).await?,
            )),
        }
    }

    /// Merges each partial atomically; one outcome per input, in order.
    pub async fn merge(
        &self,
        batch: &[(String, Partial)],
    ) -> Result<Vec<MergeOutcome>, StateError> {
        match self {
            StateStore::Redis(s) => s.merge(batch).await,
        }
    }

    /// Appends documents the sink refused for good.
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StateError> {
        match self {
            StateStore::Redis(s) => s.dead_letter(letters).await,
        }
    }

    /// Whether the backend answers.
    pub async fn ping(&self) -> Result<(), StateError> {
        match self {
            StateStore::Redis(s) => s.ping().await,
        }
    }
}
