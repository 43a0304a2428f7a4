//! Redis backend. Keys, all under the configured prefix:
//!
//! - `{prefix}{<id>}`: an item's partial parts, a hash: one field per part holding the
//!   vector as f32 little-endian bytes, `meta:<part>` holding that part's metadata JSON.
//! - `{prefix}outbox:{<id>}`: a completed item not yet confirmed by the sink, the same hash
//!   plus `_done` = its completion token.
//! - `{prefix}outbox`: sorted set of outbox ids by completion (or last resend) time, in ms.
//! - `{prefix}partials`: sorted set of partial ids by last update, in ms (orphan sweeper).
//! - `{prefix}deadletter`: list of dead letters (JSON).
//! - `{prefix}epoch`: a marker; if it disappears, Redis lost its data.
//!
//! A batch is one pipeline of EVALSHA calls of `merge.lua`, one per item. The pipeline
//! ignores per-command errors so that every item gets its own outcome: retrying a whole
//! pipeline could re-run a merge that already completed its item.
//!
//! The two sorted sets make this backend single-node (or primary/replica) only: a script
//! touching an item key and a shared index would cross slots on a Redis Cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, Script, ServerErrorKind, Value};

use super::{completed_document, DeadLetter, MergeOutcome, Orphan, StateError, StoredItem};
use crate::config::RedisSettings;
use crate::model::document::{merge_metadata, Partial};
use crate::model::{Document, Metadata, Schema};

/// Prefix of the hash field that holds a part's metadata.
const META_PREFIX: &str = "meta:";
/// Hash field of an outbox entry that holds its completion token.
const DONE_FIELD: &str = "_done";
/// Confirmations per script call.
const CONFIRM_CHUNK: usize = 500;

struct Scripts {
    merge: Script,
    confirm: Script,
    expire: Script,
}

/// A handle on the Redis backend; cheap to clone (one multiplexed, reconnecting connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    schema: Schema,
    prefix: String,
    /// Backstop TTL of a partial: twice the configured TTL, so that the sweeper acts first.
    backstop_ttl_ms: u64,
    /// Makes completion tokens unique: this store's random id and a batch counter.
    instance: u64,
    batches: Arc<AtomicU64>,
    /// The epoch marker's value this store wrote; `None` until written.
    epoch: Arc<std::sync::Mutex<Option<String>>>,
    dead_letter_key: String,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl RedisStore {
    /// Connects and loads the scripts.
    pub async fn connect(settings: &RedisSettings, schema: &Schema) -> Result<RedisStore, StateError> {
        let client = redis::Client::open(settings.url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.response_timeout))
            .set_connection_timeout(Some(settings.connection_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let store = RedisStore {
            conn,
            scripts: Arc::new(Scripts {
                merge: Script::new(include_str!("merge.lua")),
                confirm: Script::new(include_str!("confirm.lua")),
                expire: Script::new(include_str!("expire.lua")),
            }),
            schema: schema.clone(),
            prefix: settings.key_prefix.clone(),
            backstop_ttl_ms: settings.partial_ttl.as_millis() as u64 * 2,
            instance: rand::random(),
            batches: Arc::new(AtomicU64::new(0)),
            epoch: Arc::new(std::sync::Mutex::new(None)),
            dead_letter_key: format!("{}{}", settings.key_prefix, settings.dead_letter_key),
        };
        store.load_scripts().await?;
        store.check_epoch().await?;
        Ok(store)
    }

    /// The key of an item's partial hash.
    pub fn item_key(&self, id: &str) -> String {
        format!("{}{{{}}}", self.prefix, id)
    }

    fn outbox_key(&self, id: &str) -> String {
        format!("{}outbox:{{{}}}", self.prefix, id)
    }

    fn outbox_index(&self) -> String {
        format!("{}outbox", self.prefix)
    }

    fn partial_index(&self) -> String {
        format!("{}partials", self.prefix)
    }

    /// The dead-letter list's key.
    pub fn dead_letter_key(&self) -> &str {
        &self.dead_letter_key
    }

    async fn load_scripts(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        for script in [&self.scripts.merge, &self.scripts.confirm, &self.scripts.expire] {
            script.prepare_invoke().load_async(&mut conn).await?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Checks the epoch marker; writes it if missing. Returns `true` when a marker this
    /// store wrote earlier is gone: Redis restarted without its data (or was flushed), and
    /// every partial and outbox entry stored before is lost.
    pub async fn check_epoch(&self) -> Result<bool, StateError> {
        let key = format!("{}epoch", self.prefix);
        let mut conn = self.conn.clone();
        let current: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        let mut known = self.epoch.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lost = known.is_some() && current.is_none();
        if current.is_none() {
            let mine = format!("{:x}-{}", self.instance, now_ms());
            let _: () = redis::cmd("SET").arg(&key).arg(&mine).arg("NX").query_async(&mut conn).await?;
            let now: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            known = now;
        } else {
            known = current;
        }
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) = known;
        Ok(lost)
    }

    pub async fn merge(&self, batch: &[(String, Partial)]) -> Result<Vec<MergeOutcome>, StateError> {
        let mut outcomes = self.merge_once(batch.iter()).await?;
        // A Redis that restarted or was flushed forgets scripts: load them, merge those again.
        let missing: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, MergeOutcome::Failed(StateError::Redis(e)) if is_noscript(e)))
            .map(|(i, _)| i)
            .collect();
        if !missing.is_empty() {
            self.load_scripts().await?;
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
        let token = format!("{:x}-{}", self.instance, self.batches.fetch_add(1, Ordering::Relaxed));
        let now = now_ms();
        let (outbox_index, partial_index) = (self.outbox_index(), self.partial_index());
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut ids = Vec::new();
        let parts = self.schema.parts();
        for (id, partial) in batch {
            let cmd = pipe.cmd("EVALSHA").arg(self.scripts.merge.get_hash()).arg(4);
            cmd.arg(self.item_key(id)).arg(self.outbox_key(id)).arg(&outbox_index).arg(&partial_index);
            cmd.arg(id).arg(now).arg(self.backstop_ttl_ms).arg(&token).arg(parts.len());
            for part in parts {
                cmd.arg(&part.type_name);
            }
            for (slot, vector) in partial.vectors.iter().enumerate() {
                if let Some(vector) = vector {
                    cmd.arg(&parts[slot].type_name).arg(f32_le_bytes(vector));
                    if let Some(meta) = &partial.metadata[slot] {
                        let json = serde_json::to_vec(meta).expect("metadata serialises");
                        cmd.arg(format!("{META_PREFIX}{}", parts[slot].type_name)).arg(json);
                    }
                }
            }
            ids.push(id.as_str());
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let replies = self.query(&pipe, ids.len()).await?;
        Ok(ids
            .into_iter()
            .zip(replies)
            .map(|(id, reply)| match reply {
                Value::Nil => MergeOutcome::Persisted,
                Value::Array(fields) => match self.decode(id, fields) {
                    Ok(doc) => MergeOutcome::Completed(doc),
                    Err(e) => MergeOutcome::Failed(e),
                },
                Value::ServerError(e) => MergeOutcome::Failed(StateError::Redis(e.into())),
                other => MergeOutcome::Failed(StateError::Protocol(format!("merge of {id} returned {other:?}"))),
            })
            .collect())
    }

    async fn query(&self, pipe: &redis::Pipeline, expected: usize) -> Result<Vec<Value>, StateError> {
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        if replies.len() != expected {
            return Err(StateError::Protocol(format!("{} replies for {expected} commands", replies.len())));
        }
        Ok(replies)
    }

    /// Removes from the outbox the completions the sink has taken: `(id, token)` pairs.
    pub async fn confirm(&self, done: &[(String, String)]) -> Result<(), StateError> {
        // One script call per chunk (a bulk response's worth), not one per document.
        let index = self.outbox_index();
        let mut pipe = redis::pipe();
        for chunk in done.chunks(CONFIRM_CHUNK) {
            let cmd = pipe.cmd("EVALSHA").arg(self.scripts.confirm.get_hash()).arg(1 + chunk.len()).arg(&index);
            for (id, _) in chunk {
                cmd.arg(self.outbox_key(id));
            }
            for (id, token) in chunk {
                cmd.arg(id).arg(token);
            }
            cmd.ignore();
        }
        if done.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        match pipe.query_async::<()>(&mut conn).await {
            Err(e) if is_noscript(&e) => {
                self.load_scripts().await?;
                pipe.query_async::<()>(&mut conn).await?;
            }
            other => other?,
        }
        Ok(())
    }

    /// Up to `limit` members of a sorted-set index with a score (ms) at most `deadline`.
    async fn ids_up_to(&self, index: &str, deadline: u64, limit: usize) -> Result<Vec<String>, StateError> {
        let mut conn = self.conn.clone();
        let ids = redis::cmd("ZRANGE")
            .arg(index)
            .arg("-inf")
            .arg(deadline)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        Ok(ids)
    }

    /// Takes up to `limit` outbox entries completed (or last claimed) more than `older_than`
    /// ago, and marks them claimed now, so that other instances leave them alone for a while.
    pub async fn claim_outbox(&self, older_than: Duration, limit: usize) -> Result<Vec<Document>, StateError> {
        let index = self.outbox_index();
        let now = now_ms();
        let deadline = now.saturating_sub(older_than.as_millis() as u64);
        let ids = self.ids_up_to(&index, deadline, limit).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("ZADD").arg(&index).arg("XX").arg(now).arg(id).ignore();
            pipe.cmd("HGETALL").arg(self.outbox_key(id));
        }
        let replies = self.query(&pipe, ids.len()).await?;
        let mut docs = Vec::new();
        let mut gone = Vec::new();
        for (id, reply) in ids.into_iter().zip(replies) {
            match reply {
                Value::Array(fields) if !fields.is_empty() => match self.decode(&id, fields) {
                    Ok(doc) => docs.push(doc),
                    Err(e) => tracing::error!(%id, error = %e, "An outbox entry cannot be read; it stays in Redis."),
                },
                _ => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let mut conn = self.conn.clone();
            let _: () = redis::cmd("ZREM").arg(&index).arg(&gone).query_async(&mut conn).await?;
        }
        Ok(docs)
    }

    /// Takes up to `limit` partial items not updated for `older_than`, removing them.
    pub async fn take_orphans(&self, older_than: Duration, limit: usize) -> Result<Vec<Orphan>, StateError> {
        let index = self.partial_index();
        let deadline = now_ms().saturating_sub(older_than.as_millis() as u64);
        let ids = self.ids_up_to(&index, deadline, limit).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("EVALSHA")
                .arg(self.scripts.expire.get_hash())
                .arg(2)
                .arg(self.item_key(id))
                .arg(&index)
                .arg(id)
                .arg(deadline);
        }
        let replies = match self.query(&pipe, ids.len()).await {
            Err(StateError::Redis(e)) if is_noscript(&e) => {
                self.load_scripts().await?;
                self.query(&pipe, ids.len()).await?
            }
            other => other?,
        };
        let mut orphans = Vec::new();
        for (id, reply) in ids.into_iter().zip(replies) {
            if let Value::Array(fields) = reply {
                let (vectors, metadata, _) = self.fields(&id, fields)?;
                orphans.push(Orphan { id, vectors, metadata: merge_metadata(metadata) });
            }
        }
        Ok(orphans)
    }

    /// Splits an item's hash into per-slot vectors, per-slot metadata and its token.
    #[allow(clippy::type_complexity)]
    fn fields(
        &self,
        id: &str,
        fields: Vec<Value>,
    ) -> Result<(Vec<Option<Vec<f32>>>, Vec<Option<Metadata>>, Option<String>), StateError> {
        let n = self.schema.len();
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; n];
        let mut metadata: Vec<Option<Metadata>> = vec![None; n];
        let mut token = None;
        let mut it = fields.into_iter();
        while let (Some(Value::BulkString(field)), Some(Value::BulkString(value))) = (it.next(), it.next()) {
            let field = String::from_utf8_lossy(&field);
            if field == DONE_FIELD {
                token = Some(String::from_utf8_lossy(&value).into_owned());
            } else if let Some(type_name) = field.strip_prefix(META_PREFIX) {
                if let Some(slot) = self.schema.slot_of(type_name) {
                    metadata[slot] = serde_json::from_slice(&value).ok();
                }
            } else if let Some(slot) = self.schema.slot_of(&field) {
                let dims = self.schema.part(slot).dims;
                if value.len() != dims * 4 {
                    let reason = format!("{id}: {field} holds {} bytes, expected {}", value.len(), dims * 4);
                    return Err(StateError::Protocol(reason));
                }
                vectors[slot] =
                    Some(value.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect());
            }
        }
        Ok((vectors, metadata, token))
    }

    /// Turns a completed item's hash (flat field/value array) into its document.
    fn decode(&self, id: &str, fields: Vec<Value>) -> Result<Document, StateError> {
        let (vectors, metadata, token) = self.fields(id, fields)?;
        completed_document(&self.schema, id, vectors, metadata, token)
    }

    /// The part names of the item's partial hash, and whether its outbox entry (with a
    /// completion token) exists; both read in one MULTI, so a merge that completes the
    /// item in between cannot show it in both places or in neither.
    pub async fn inspect(&self, id: &str) -> Result<StoredItem, StateError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HKEYS").arg(self.item_key(id));
        pipe.cmd("HEXISTS").arg(self.outbox_key(id)).arg(DONE_FIELD);
        let mut conn = self.conn.clone();
        let (fields, in_outbox): (Vec<String>, bool) = pipe.query_async(&mut conn).await?;
        let partial =
            fields.iter().filter_map(|field| self.schema.slot_of(field)).fold(0, |mask, slot| mask | (1 << slot));
        Ok(StoredItem { partial, in_outbox })
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
