//! Redis backend: one hash per item, `{prefix}{<id>}` (the braces make the id the cluster
//! hash tag, so every key of an item lives in one slot), with one field per part holding
//! the vector as f32 little-endian bytes and `meta:<part>` holding that part's metadata.
//!
//! A batch is one pipeline of EVALSHA calls of `merge.lua`, one per item. The pipeline
//! ignores per-command errors so that every item gets its own outcome: retrying a whole
//! pipeline could re-run a merge that already completed (and deleted) its item.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, ServerErrorKind, Value};

use super::{DeadLetter, MergeOutcome, StateError};
use crate::config::RedisSettings;
use crate::model::document::{merge_metadata, Partial};
use crate::model::{Document, Metadata, Schema};

const MERGE_SCRIPT: &str = include_str!("merge.lua");

/// Prefix of the hash field that holds a part's metadata.
const META_PREFIX: &str = "meta:";

/// A handle on the Redis backend; cheap to clone (one multiplexed, reconnecting connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    script: std::sync::Arc<redis::Script>,
    schema: Schema,
    key_prefix: String,
    ttl_ms: u64,
    dead_letter_key: String,
}

impl RedisStore {
    /// Connects and loads the merge script.
    pub async fn connect(
        settings: &RedisSettings,
        schema: &Schema,
    ) -> Result<RedisStore, StateError> {
        let client = redis::Client::open(settings.url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.response_timeout))
            .set_connection_timeout(Some(settings.connection_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let store = RedisStore {
            conn,
            script: std::sync::Arc::new(redis::Script::new(MERGE_SCRIPT)),
            schema: schema.clone(),
            key_prefix: settings.key_prefix.clone(),
            ttl_ms: settings.partial_ttl.as_millis() as u64,
            dead_letter_key: format!("{}{}", settings.key_prefix, settings.dead_letter_key),
        };
        store.load_script().await?;
        Ok(store)
    }

    /// The key of an item's hash.
    pub fn item_key(&self, id: &str) -> String {
        format!("{}{{{}}}", self.key_prefix, id)
    }

    /// The dead-letter list's key.
    pub fn dead_letter_key(&self) -> &str {
        &self.dead_letter_key
    }

    async fn load_script(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        self.script.prepare_invoke().load_async(&mut conn).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    pub async fn merge(
        &self,
        batch: &[(String, Partial)],
    ) -> Result<Vec<MergeOutcome>, StateError> {
        let mut outcomes = self.merge_once(batch.iter()).await?;
        // A Redis that restarted or was flushed forgets scripts: load it and merge those again.
        let missing: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(
                |(_, o)| matches!(o, MergeOutcome::Failed(StateError::Redis(e)) if is_noscript(e)),
            )
            .map(|(i, _)| i)
            .collect();
        if !missing.is_empty() {
            self.load_script().await?;
            let again = self.merge_once(missing.iter().map(|&i| &batch[i])).await?;
            for (i, outcome) in missing.into_iter().zip(again) {
                outcomes[i] = outcome;
            }
        }
        Ok(outcomes)
    }

    async fn merge_once<'a>(
        &self,
        batch: impl Iterator<Item = &'a (String, Partial)>,
    ) -> Result<Vec<MergeOutcome>, StateError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut ids = Vec::new();
        let parts = self.schema.parts();
        for (id, partial) in batch {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(self.item_key(id));
            cmd.arg(self.ttl_ms).arg(parts.len());
            for part in parts {
                cmd.arg(&part.type_name);
            }
            for (slot, vector) in partial.vectors.iter().enumerate() {
                if let Some(vector) = vector {
                    cmd.arg(&parts[slot].type_name).arg(f32_le_bytes(vector));
                    if let Some(meta) = &partial.metadata[slot] {
                        let json = serde_json::to_vec(meta).expect("metadata serialises");
                        cmd.arg(format!("{META_PREFIX}{}", parts[slot].type_name))
                            .arg(json);
                    }
                }
            }
            ids.push(id.as_str());
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        if replies.len() != ids.len() {
            return Err(StateError::Protocol(format!(
                "{} replies for {} merges",
                replies.len(),
                ids.len()
            )));
        }
        Ok(ids
            .into_iter()
            .zip(replies)
            .map(|(id, reply)| self.outcome(id, reply))
            .collect())
    }

    fn outcome(&self, id: &str, reply: Value) -> MergeOutcome {
        match reply {
            Value::Nil => MergeOutcome::Persisted,
            Value::Array(fields) => match self.decode(id, fields) {
                Ok(doc) => MergeOutcome::Completed(doc),
                Err(e) => MergeOutcome::Failed(e),
            },
            Value::ServerError(e) => MergeOutcome::Failed(StateError::Redis(e.into())),
            other => MergeOutcome::Failed(StateError::Protocol(format!(
                "merge of {id} returned {other:?}"
            ))),
        }
    }

    /// Turns a completed item's hash (flat field/value array) into its document.
    fn decode(&self, id: &str, fields: Vec<Value>) -> Result<Document, StateError> {
        let n = self.schema.len();
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; n];
        let mut metadata: Vec<Option<Metadata>> = vec![None; n];
        let mut it = fields.into_iter();
        while let (Some(Value::BulkString(field)), Some(Value::BulkString(value))) =
            (it.next(), it.next())
        {
            let field = String::from_utf8_lossy(&field);
            if let Some(type_name) = field.strip_prefix(META_PREFIX) {
                if let Some(slot) = self.schema.slot_of(type_name) {
                    metadata[slot] = serde_json::from_slice(&value).ok();
                }
            } else if let Some(slot) = self.schema.slot_of(&field) {
                let dims = self.schema.part(slot).dims;
                if value.len() != dims * 4 {
                    let reason = format!(
                        "{id}: {field} holds {} bytes, expected {}",
                        value.len(),
                        dims * 4
                    );
                    return Err(StateError::Protocol(reason));
                }
                vectors[slot] = Some(
                    value
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                );
            }
        }
        let vectors = vectors
            .into_iter()
            .enumerate()
            .map(|(slot, v)| {
                v.ok_or_else(|| {
                    StateError::Protocol(format!(
                        "{id}: completed without {}",
                        self.schema.part(slot).type_name
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Document {
            id: id.to_owned(),
            vectors,
            metadata: merge_metadata(metadata),
            completed_at: std::time::SystemTime::now(),
            received_at: std::time::Instant::now(),
        })
    }

    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StateError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("RPUSH");
        cmd.arg(&self.dead_letter_key);
        for letter in letters {
            cmd.arg(letter.to_json());
        }
        let mut conn = self.conn.clone();
        cmd.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// A vector as little-endian f32 bytes (a plain copy on little-endian machines).
pub fn f32_le_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}
