//! Redis backend. Keys, all under the configured prefix:
//!
//! - `{prefix}{<id>}`: the item's hash while some of its parts wait (see `merge.lua`): per
//!   part type T, `T` (the vector, f32 little-endian), `s:T` (its stamp) and `m:T` (its
//!   metadata). It moves to the outbox when the item completes.
//! - `{prefix}records:{<bucket>}`: the records of completed items, packed (see
//!   [`super::records`]), for `state.remember_completed`.
//! - `{prefix}outbox:{<id>}`: a completed item not yet settled by the sink: the same
//!   fields, `_v` its version, `_orphan` for parts swept as an orphan, `_update` for newer
//!   parts that update the indexed document.
//! - `{prefix}outbox`: sorted set of outbox ids by lease expiry, in ms.
//! - `{prefix}partials`: sorted set of incomplete ids by last update, in ms (orphan sweep).
//! - `{prefix}deadletter`: list of dead letters (JSON).
//! - `{prefix}epoch`: a marker; if it disappears, Redis lost its data.
//!
//! A batch is one pipeline of EVALSHA calls, one per item. The pipeline ignores
//! per-command errors so that every item gets its own outcome; re-running a merge whose
//! reply was lost is harmless (stamps make it a no-op).
//!
//! The two sorted sets make this backend single-node (or primary/replica) only: a script
//! touching an item key and a shared index would cross slots on a Redis Cluster.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, Script, ServerErrorKind, Value};

use super::records::Records;
use super::{
    Completion, DeadLetter, LetterCap, LetterCursor, MergeOutcome, StateError, StoredEntry, StoredItem, StoredLetter,
    Swept,
};
use crate::config::{LatePartsAction, RedisSettings, StateSettings};
use crate::model::document::{OrphanKind, Partial};
use crate::model::{Document, Schema};

/// Prefix of the hash field that holds a part's stamp.
const STAMP_PREFIX: &str = "s:";
/// Prefix of the hash field that holds a part's metadata.
const META_PREFIX: &str = "m:";
/// Field of the item's last completion version, and of an outbox entry's version.
const VERSION_FIELD: &str = "_v";
/// Field that marks an outbox entry made of an orphan's parts.
const ORPHAN_FIELD: &str = "_orphan";
/// Marks an outbox entry that updates some parts of an indexed document.
const UPDATE_FIELD: &str = "_update";
/// Items per script call that takes many (confirm).
const CHUNK: usize = 500;

struct Scripts {
    merge: Script,
    remember: Script,
    confirm: Script,
    claim: Script,
    park: Script,
    expire: Script,
    forget: Script,
    reopen: Script,
}

impl Scripts {
    fn all(&self) -> [&Script; 8] {
        [&self.merge, &self.remember, &self.confirm, &self.claim, &self.park, &self.expire, &self.forget, &self.reopen]
    }
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
    /// Where completed items' records are.
    records: Arc<Records>,
    /// Newer copies for a remembered completed item update its document (late_parts).
    late_updates: bool,
    /// Makes the epoch marker unique to this store handle.
    instance: u64,
    /// The epoch marker's value this store wrote; `None` until written.
    epoch: Arc<std::sync::Mutex<Option<String>>>,
    dead_letter_key: String,
    pub(super) letter_cap: LetterCap,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl RedisStore {
    /// Connects and loads the scripts.
    /// Connects; `sweep_round` is how often maintenance sweeps (records are swept with
    /// orphans, a few buckets per round).
    pub async fn connect(
        settings: &RedisSettings,
        state: &StateSettings,
        sweep_round: Duration,
        schema: &Schema,
    ) -> Result<RedisStore, StateError> {
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
                merge: with_records(include_str!("merge.lua")),
                remember: with_records(include_str!("remember.lua")),
                confirm: Script::new(include_str!("confirm.lua")),
                claim: Script::new(include_str!("claim.lua")),
                park: Script::new(include_str!("park.lua")),
                expire: with_records(include_str!("expire.lua")),
                forget: Script::new(include_str!("forget.lua")),
                reopen: Script::new(include_str!("reopen.lua")),
            }),
            schema: schema.clone(),
            prefix: settings.key_prefix.clone(),
            backstop_ttl_ms: ms(settings.partial_ttl) * 2,
            records: Arc::new(Records::new(
                &settings.key_prefix,
                settings.record_buckets,
                state.remember_completed,
                sweep_round,
                schema,
            )),
            late_updates: state.late_parts == LatePartsAction::Update,
            instance: rand::random(),
            epoch: Arc::new(std::sync::Mutex::new(None)),
            dead_letter_key: format!("{}{}", settings.key_prefix, settings.dead_letter_key),
            // Set by `StateStore::connect` from durability.dead_letter_max.
            letter_cap: LetterCap { max: usize::MAX, dropped: Default::default() },
        };
        store.load_scripts().await?;
        store.check_epoch().await?;
        Ok(store)
    }

    /// The key of an item's hash.
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
        for script in self.scripts.all() {
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

    pub async fn merge(&self, batch: &[(String, Partial)], lease: Duration) -> Result<Vec<MergeOutcome>, StateError> {
        let lease_until = now_ms() + ms(lease);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (id, partial) in batch {
            self.merge_call(&mut pipe, id, partial, lease_until);
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut replies = self.query(&pipe, batch.len()).await?;
        // A Redis that restarted or was flushed forgets scripts: load them, merge those again.
        let missing: Vec<usize> = (0..replies.len()).filter(|&i| is_noscript_reply(&replies[i])).collect();
        if !missing.is_empty() {
            self.load_scripts().await?;
            let mut again = redis::pipe();
            again.ignore_errors();
            for &i in &missing {
                self.merge_call(&mut again, &batch[i].0, &batch[i].1, lease_until);
            }
            for (i, reply) in missing.into_iter().zip(self.query(&again, again.len()).await?) {
                replies[i] = reply;
            }
        }
        Ok(batch
            .iter()
            .zip(replies)
            .map(|((id, partial), reply)| match reply {
                Value::Int(_) => MergeOutcome::Persisted,
                Value::Array(fields) => {
                    match self.entry(id, fields).with_own(partial).into_document(&self.schema, id) {
                        Ok(doc) => MergeOutcome::Completed(doc),
                        Err(e) => MergeOutcome::Failed(e),
                    }
                }
                Value::ServerError(e) => MergeOutcome::Failed(StateError::Redis(e.into())),
                other => MergeOutcome::Failed(StateError::Protocol(format!("merge of {id} returned {other:?}"))),
            })
            .collect())
    }

    fn merge_call(&self, pipe: &mut redis::Pipeline, id: &str, partial: &Partial, lease_until: u64) {
        let parts = self.schema.parts();
        let now = now_ms();
        let cmd = pipe.cmd("EVALSHA").arg(self.scripts.merge.get_hash()).arg(5);
        cmd.arg(self.item_key(id)).arg(self.outbox_key(id)).arg(self.outbox_index()).arg(self.partial_index());
        cmd.arg(self.records.key(id));
        cmd.arg(id).arg(now).arg(self.backstop_ttl_ms).arg(self.records.remember_ms()).arg(lease_until);
        cmd.arg(if self.late_updates { "1" } else { "0" }).arg(self.records.fingerprint());
        cmd.arg(parts.len());
        for part in parts {
            cmd.arg(&part.type_name);
        }
        for (slot, vector) in partial.vectors.iter().enumerate() {
            if let Some(vector) = vector {
                cmd.arg(&parts[slot].type_name).arg(partial.stamps[slot]).arg(f32_le_bytes(vector));
                match &partial.metadata[slot] {
                    Some(meta) => cmd.arg(serde_json::to_vec(meta).expect("metadata serialises")),
                    None => cmd.arg(""),
                };
            }
        }
    }

    /// Records completions decided in memory: one script call per item.
    pub async fn remember(&self, done: &[Completion]) -> Result<(), StateError> {
        if done.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for completion in done {
            let version = completion.stamps.iter().copied().max().unwrap_or(0);
            let now = now_ms();
            let cmd = pipe.cmd("EVALSHA").arg(self.scripts.remember.get_hash()).arg(5);
            cmd.arg(self.item_key(&completion.id)).arg(self.partial_index());
            cmd.arg(self.outbox_key(&completion.id)).arg(self.outbox_index());
            cmd.arg(self.records.key(&completion.id));
            cmd.arg(&completion.id).arg(self.records.remember_ms()).arg(version);
            cmd.arg(if self.late_updates { "1" } else { "0" }).arg(now).arg(self.records.fingerprint());
            for (part, stamp) in self.schema.parts().iter().zip(&completion.stamps) {
                cmd.arg(&part.type_name).arg(stamp);
            }
            cmd.ignore();
        }
        self.run(&pipe).await
    }

    /// Runs a pipeline whose replies are not needed, loading the scripts once if Redis
    /// forgot them.
    async fn run(&self, pipe: &redis::Pipeline) -> Result<(), StateError> {
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

    async fn query(&self, pipe: &redis::Pipeline, expected: usize) -> Result<Vec<Value>, StateError> {
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        if replies.len() != expected {
            return Err(StateError::Protocol(format!("{} replies for {expected} commands", replies.len())));
        }
        Ok(replies)
    }

    /// Settles outbox entries: `(id, version)` pairs.
    pub async fn confirm(&self, done: &[(String, u64)]) -> Result<(), StateError> {
        if done.is_empty() {
            return Ok(());
        }
        // One script call per chunk (a bulk response's worth), not one per document.
        let index = self.outbox_index();
        let mut pipe = redis::pipe();
        for chunk in done.chunks(CHUNK) {
            let cmd = pipe.cmd("EVALSHA").arg(self.scripts.confirm.get_hash()).arg(1 + chunk.len()).arg(&index);
            for (id, _) in chunk {
                cmd.arg(self.outbox_key(id));
            }
            for (id, version) in chunk {
                cmd.arg(id).arg(version);
            }
            cmd.ignore();
        }
        self.run(&pipe).await
    }

    /// Puts the parts of updates whose document is gone back as waiting copies.
    pub async fn reopen(&self, done: &[(String, u64)]) -> Result<(), StateError> {
        let now = now_ms();
        let mut pipe = redis::pipe();
        for (id, version) in done {
            let cmd = pipe.cmd("EVALSHA").arg(self.scripts.reopen.get_hash()).arg(5);
            cmd.arg(self.item_key(id)).arg(self.outbox_key(id)).arg(self.outbox_index()).arg(self.partial_index());
            cmd.arg(self.records.key(id));
            cmd.arg(id).arg(version).arg(now).arg(self.backstop_ttl_ms).ignore();
        }
        self.run(&pipe).await
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

    /// Claims up to `limit` outbox entries whose lease lapsed, each by one atomic call.
    pub async fn claim_outbox(&self, lease: Duration, limit: usize) -> Result<Vec<Swept>, StateError> {
        let index = self.outbox_index();
        let now = now_ms();
        let ids = self.ids_up_to(&index, now, limit).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("EVALSHA")
                .arg(self.scripts.claim.get_hash())
                .arg(2)
                .arg(&index)
                .arg(self.outbox_key(id))
                .arg(id)
                .arg(now)
                .arg(now + ms(lease));
        }
        let replies = self.query_scripts(&pipe, ids.len()).await?;
        Ok(ids.into_iter().zip(replies).filter_map(|(id, reply)| self.swept(id, reply)).collect())
    }

    /// Runs a pipeline of script calls whose replies are needed, loading the scripts once
    /// if Redis forgot them.
    async fn query_scripts(&self, pipe: &redis::Pipeline, expected: usize) -> Result<Vec<Value>, StateError> {
        match self.query(pipe, expected).await {
            Err(StateError::Redis(e)) if is_noscript(&e) => {
                self.load_scripts().await?;
                self.query(pipe, expected).await
            }
            other => other,
        }
    }

    /// An outbox entry (or swept orphan) read back; `None` for a `false` reply.
    fn swept(&self, id: String, reply: Value) -> Option<Swept> {
        let Value::Array(fields) = reply else { return None };
        let entry = self.entry(&id, fields);
        let version = entry.version;
        Some(match entry.into_document(&self.schema, &id) {
            Ok(doc) => Swept::Found(doc),
            Err(e) => Swept::Unreadable { id, version, reason: e.to_string() },
        })
    }

    /// Sets the leases of the given outbox entries to end `lease` from now (0 releases
    /// them); never adds an entry.
    pub async fn renew(&self, ids: &[String], lease: Duration) -> Result<(), StateError> {
        let until = now_ms() + ms(lease);
        let mut pipe = redis::pipe();
        for chunk in ids.chunks(CHUNK) {
            let cmd = pipe.cmd("ZADD").arg(self.outbox_index()).arg("XX");
            for id in chunk {
                cmd.arg(until).arg(id);
            }
            cmd.ignore();
        }
        if ids.is_empty() {
            return Ok(());
        }
        self.run(&pipe).await
    }

    /// Parks documents completed in memory in the outbox, due at once.
    pub async fn park(&self, docs: &[Document]) -> Result<(), StateError> {
        if docs.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for doc in docs {
            let cmd = pipe.cmd("EVALSHA").arg(self.scripts.park.get_hash()).arg(2);
            cmd.arg(self.outbox_index()).arg(self.outbox_key(&doc.id));
            cmd.arg(&doc.id).arg(now).arg(doc.version());
            for (slot, part) in self.schema.parts().iter().enumerate() {
                if doc.vectors[slot].is_empty() {
                    continue;
                }
                cmd.arg(&part.type_name).arg(f32_le_bytes(&doc.vectors[slot]));
                cmd.arg(format!("{STAMP_PREFIX}{}", part.type_name)).arg(doc.stamps[slot]);
            }
            // The document's merged metadata rides on its first part: merging it again in
            // slot order gives the same result.
            if let Some(meta) = &doc.metadata {
                cmd.arg(format!("{META_PREFIX}{}", self.schema.part(0).type_name));
                cmd.arg(serde_json::to_vec(meta).expect("metadata serialises"));
            }
            cmd.arg(VERSION_FIELD).arg(doc.version());
            cmd.ignore();
        }
        self.run(&pipe).await
    }

    /// Sweeps up to `limit` orphans not updated for `older_than`.
    pub async fn sweep_orphans(
        &self,
        older_than: Duration,
        limit: usize,
        deliver_lease: Option<Duration>,
    ) -> Result<Vec<Swept>, StateError> {
        let index = self.partial_index();
        let now = now_ms();
        let deadline = now.saturating_sub(ms(older_than));
        self.forget_records(now).await?;
        let ids = self.ids_up_to(&index, deadline, limit).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lease = deliver_lease.map_or(String::new(), |l| (now + ms(l)).to_string());
        let mut pipe = redis::pipe();
        for id in &ids {
            let cmd = pipe.cmd("EVALSHA").arg(self.scripts.expire.get_hash()).arg(5);
            cmd.arg(self.item_key(id)).arg(&index).arg(self.outbox_key(id)).arg(self.outbox_index());
            cmd.arg(self.records.key(id));
            cmd.arg(id).arg(deadline).arg(self.records.fingerprint()).arg(&lease).arg(self.schema.len());
            for part in self.schema.parts() {
                cmd.arg(&part.type_name);
            }
            cmd.arg(now).arg(self.records.remember_ms());
        }
        let replies = self.query_scripts(&pipe, ids.len()).await?;
        Ok(ids.into_iter().zip(replies).filter_map(|(id, reply)| self.swept(id, reply)).collect())
    }

    /// Removes the records older than `remember_completed` from this round's buckets.
    async fn forget_records(&self, now: u64) -> Result<(), StateError> {
        let mut pipe = redis::pipe();
        for key in self.records.next_round() {
            pipe.cmd("EVALSHA").arg(self.scripts.forget.get_hash()).arg(1).arg(key);
            pipe.arg(now).arg(self.records.remember_ms()).ignore();
        }
        self.run(&pipe).await
    }

    /// Splits a stored entry (flat field/value array) into per-slot parts; a field that
    /// cannot be read is noted in the entry, the others are still read.
    fn entry(&self, id: &str, fields: Vec<Value>) -> StoredEntry {
        let mut entry = StoredEntry::new(self.schema.len());
        let mut it = fields.into_iter();
        while let (Some(Value::BulkString(field)), Some(Value::BulkString(value))) = (it.next(), it.next()) {
            let field = String::from_utf8_lossy(&field);
            let number = || std::str::from_utf8(&value).ok().and_then(|v| v.parse::<u64>().ok());
            if field == VERSION_FIELD {
                entry.version = number().unwrap_or_else(|| entry.fail(format!("{id}: its version is not a number")));
            } else if field == UPDATE_FIELD {
                entry.update = true;
            } else if field == ORPHAN_FIELD {
                entry.orphan = Some(if value.as_slice() == b"late" { OrphanKind::Late } else { OrphanKind::Partial });
            } else if let Some(type_name) = field.strip_prefix(STAMP_PREFIX) {
                if let Some(slot) = self.schema.slot_of(type_name) {
                    entry.stamps[slot] = number()
                        .unwrap_or_else(|| entry.fail(format!("{id}: the stamp of {type_name} is not a number")));
                }
            } else if let Some(type_name) = field.strip_prefix(META_PREFIX) {
                if let Some(slot) = self.schema.slot_of(type_name) {
                    match serde_json::from_slice(&value) {
                        Ok(meta) => entry.metadata[slot] = Some(meta),
                        Err(e) => entry.fail(format!("{id}: the metadata of {type_name} is not a JSON object: {e}")),
                    }
                }
            } else if let Some(slot) = self.schema.slot_of(&field) {
                entry.set_vector(id, slot, &field, self.schema.part(slot).dims, &value);
            }
        }
        entry
    }

    /// The part names of the item's partial hash, whether its outbox entry exists, and the
    /// version of its last completion; read in one MULTI, so a merge that completes the
    /// item in between cannot show it in both places or in neither.
    pub async fn inspect(&self, id: &str) -> Result<StoredItem, StateError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HKEYS").arg(self.item_key(id));
        pipe.cmd("HEXISTS").arg(self.outbox_key(id)).arg(VERSION_FIELD);
        pipe.cmd("HGET").arg(self.records.key(id)).arg(id);
        let mut conn = self.conn.clone();
        let (fields, in_outbox, record): (Vec<String>, bool, Option<Vec<u8>>) = pipe.query_async(&mut conn).await?;
        let completed = record.and_then(|value| self.records.version(&value, now_ms()));
        let partial =
            fields.iter().filter_map(|field| self.schema.slot_of(field)).fold(0, |mask, slot| mask | (1 << slot));
        Ok(StoredItem { partial, in_outbox, completed })
    }

    /// Appends letters and trims the list to the cap in one transaction; returns how many
    /// of the oldest were dropped.
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<u64, StateError> {
        if letters.is_empty() {
            return Ok(0);
        }
        let max = self.letter_cap.max.min(i64::MAX as usize) as i64;
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("RPUSH").arg(&self.dead_letter_key);
        for letter in letters {
            pipe.arg(letter.to_json());
        }
        pipe.cmd("LTRIM").arg(&self.dead_letter_key).arg(-max).arg(-1).ignore();
        let mut conn = self.conn.clone();
        let (length,): (i64,) = pipe.query_async(&mut conn).await?;
        Ok(length.saturating_sub(max).max(0) as u64)
    }

    pub async fn read_dead_letters(
        &self,
        cursor: &mut LetterCursor,
        limit: usize,
    ) -> Result<Vec<StoredLetter>, StateError> {
        let (start, stop) = (cursor.next, cursor.next + limit.max(1) as u64 - 1);
        let mut conn = self.conn.clone();
        let page: Vec<Vec<u8>> =
            redis::cmd("LRANGE").arg(&self.dead_letter_key).arg(start).arg(stop).query_async(&mut conn).await?;
        cursor.next += page.len() as u64;
        Ok(page.into_iter().map(|json| StoredLetter { json, key: 0 }).collect())
    }

    /// `LREM` of each letter's exact JSON: a list has no keys, and letters appended or
    /// trimmed meanwhile are not touched.
    pub async fn remove_dead_letters(
        &self,
        cursor: &mut LetterCursor,
        letters: &[&StoredLetter],
    ) -> Result<(), StateError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for letter in letters {
            pipe.cmd("LREM").arg(&self.dead_letter_key).arg(1).arg(&letter.json);
        }
        let mut conn = self.conn.clone();
        let removed: Vec<u64> = pipe.query_async(&mut conn).await?;
        // They were read before the cursor: the letters after it moved up by as many.
        cursor.next = cursor.next.saturating_sub(removed.iter().sum());
        Ok(())
    }
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

fn is_noscript_reply(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
}

/// A vector as little-endian f32 bytes (a plain copy on little-endian machines).
/// A script that reads or writes records: `record.lua`'s functions, then its own body.
fn with_records(body: &str) -> Script {
    Script::new(&format!("{}\n{body}", super::records::LUA))
}

pub fn f32_le_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}
