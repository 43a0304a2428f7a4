//! Redis backend: one node, a primary with replicas, or a Redis Cluster.
//!
//! Every item belongs to a virtual bucket, and each key it has, with its bucket's indexes,
//! is in the bucket's cluster slot ([`keys`]): each script call is single-slot, and
//! [`nodes::Nodes::exec`] sends a flush's calls as one pipeline per master, concurrently.
//!
//! - The item's hash while some of its parts wait (see `merge.lua`): per part type T, `T`
//!   (the vector, f32 little-endian), `s:T` (its stamp) and `m:T` (its metadata). It moves
//!   to the outbox when the item completes.
//! - Its outbox entry: a completed item not yet settled by the sink, the same fields, `_v`
//!   its version, `_orphan` for parts swept as an orphan, `_update` for newer parts that
//!   update the indexed document; and per bucket, the outbox index (ids by lease expiry)
//!   and the partial index (incomplete ids by last update, for the orphan sweep).
//! - The records of completed items, packed ([`super::records`]).
//! - Per bucket, an epoch marker: if the one of a master disappears, it lost its data.
//! - `{prefix}deadletter`: the list of dead letters (JSON), one key.
//!
//! A merge whose reply was lost, re-applied, is harmless (stamps make it a no-op), so any
//! call can be sent again after a redirection or a failover.

pub mod keys;
mod migrate;
pub mod nodes;
mod share;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Script, Value};

use self::keys::Keys;
use self::nodes::{Call, Nodes};
use self::share::Share;
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
    lease: Script,
}

/// Each script's source, and the script.
fn scripts() -> (Scripts, Vec<String>) {
    let with_records = |body: &str| format!("{}\n{body}", super::records::LUA);
    let sources = [
        with_records(include_str!("../merge.lua")),
        with_records(include_str!("../remember.lua")),
        include_str!("../confirm.lua").to_owned(),
        include_str!("../claim.lua").to_owned(),
        include_str!("../park.lua").to_owned(),
        with_records(include_str!("../expire.lua")),
        include_str!("../forget.lua").to_owned(),
        include_str!("../reopen.lua").to_owned(),
        include_str!("../lease.lua").to_owned(),
    ];
    let [merge, remember, confirm, claim, park, expire, forget, reopen, lease] =
        sources.clone().map(|s| Script::new(&s));
    (Scripts { merge, remember, confirm, claim, park, expire, forget, reopen, lease }, sources.to_vec())
}

/// A handle on the Redis backend; cheap to clone (one multiplexed, reconnecting connection
/// per node).
#[derive(Clone)]
pub struct RedisStore {
    nodes: Nodes,
    scripts: Arc<Scripts>,
    keys: Arc<Keys>,
    schema: Schema,
    /// Backstop TTL of a partial: twice the configured TTL, so that the sweeper acts first.
    backstop_ttl_ms: u64,
    /// Where completed items' records are.
    records: Arc<Records>,
    /// Newer copies for a remembered completed item update its document (late_parts).
    late_updates: bool,
    /// Makes the epoch markers this handle writes unique to it.
    instance: u64,
    /// The epoch marker read last, per bucket checked (one per master).
    epoch: Arc<std::sync::Mutex<HashMap<u32, String>>>,
    dead_letter_key: String,
    prefix: String,
    /// The buckets this handle's maintenance visits.
    share: Share,
    pub(super) letter_cap: LetterCap,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// An `EVALSHA` of `script` with `keys`, its arguments to follow.
fn evalsha(script: &Script, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}

impl RedisStore {
    /// Connects (to `redis.cluster_nodes` when set, else `redis.url`) and loads the scripts
    /// on every master; `sweep_round` is how often maintenance sweeps (records are swept
    /// with orphans, a few hashes per round).
    pub async fn connect(
        settings: &RedisSettings,
        state: &StateSettings,
        sweep_round: Duration,
        schema: &Schema,
    ) -> Result<RedisStore, StateError> {
        let (scripts, sources) = scripts();
        let nodes = Nodes::connect(settings, sources).await?;
        let keys = Arc::new(Keys::new(&settings.key_prefix, settings.buckets, settings.record_buckets));
        let instance = rand::random();
        let store = RedisStore {
            nodes,
            scripts: Arc::new(scripts),
            keys: keys.clone(),
            schema: schema.clone(),
            backstop_ttl_ms: ms(settings.partial_ttl) * 2,
            records: Arc::new(Records::new(keys, state.remember_completed, sweep_round, schema)),
            late_updates: state.late_parts == LatePartsAction::Update,
            instance,
            share: Share::new(instance),
            prefix: settings.key_prefix.clone(),
            epoch: Arc::new(std::sync::Mutex::new(HashMap::new())),
            dead_letter_key: format!("{}{}", settings.key_prefix, settings.dead_letter_key),
            // Set by `StateStore::connect` from durability.dead_letter_max.
            letter_cap: LetterCap { max: usize::MAX, dropped: Default::default() },
        };
        if settings.wait_replicas > 0 {
            for (master, replicas) in store.nodes.replicas().await? {
                if replicas < settings.wait_replicas {
                    tracing::error!(
                        master,
                        replicas,
                        wait_replicas = settings.wait_replicas,
                        "A Redis master has fewer replicas than redis.wait_replicas: flushes that write there fail until it has enough."
                    );
                }
            }
        }
        store.check_layout().await?;
        migrate::old_layout(&store, &settings.key_prefix).await?;
        store.check_epoch().await?;
        Ok(store)
    }

    /// Refuses to run on data written with another number of buckets: its items would be
    /// looked for in the wrong buckets. The first store to connect under a prefix writes
    /// its number (`{prefix}layout`).
    async fn check_layout(&self) -> Result<(), StateError> {
        let key = format!("{}layout", self.prefix);
        let mine = format!("buckets={}", self.keys.buckets());
        let mut conn = self.nodes.conn();
        let () = redis::cmd("SET").arg(&key).arg(&mine).arg("NX").query_async(&mut conn).await?;
        let stored: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        if stored != mine {
            return Err(StateError::Layout(format!(
                "the data under redis.key_prefix `{}` was written with {stored}, and redis.buckets is {}: \
                 items would be looked for in the wrong buckets. Set redis.buckets back, or drain and \
                 start under a new key prefix.",
                self.prefix,
                self.keys.buckets()
            )));
        }
        Ok(())
    }

    /// Where this store's keys are.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The connection, and what it knows of the cluster.
    pub fn nodes(&self) -> &Nodes {
        &self.nodes
    }

    /// The dead-letter list's key.
    pub fn dead_letter_key(&self) -> &str {
        &self.dead_letter_key
    }

    pub async fn ping(&self) -> Result<(), StateError> {
        redis::cmd("PING").query_async::<()>(&mut self.nodes.conn()).await?;
        Ok(())
    }

    /// Checks the epoch marker of each master (that of the first bucket it serves); writes
    /// the markers that are missing. Returns `true` when a marker read before is gone or
    /// changed: that master restarted without its data (or was flushed), and every partial
    /// and outbox entry it held is lost. A replica promoted by a failover has the markers.
    pub async fn check_epoch(&self) -> Result<bool, StateError> {
        // Once a round: which master serves which slot (a failover or resharding since).
        let topology = self.nodes.refresh().await?;
        let mut checked: Vec<u32> = Vec::new();
        let mut masters_seen = vec![false; topology.masters.len()];
        for bucket in 0..self.keys.buckets() {
            if let Some(master) = topology.owner[self.keys.slot(bucket) as usize] {
                if !std::mem::replace(&mut masters_seen[master as usize], true) {
                    checked.push(bucket);
                }
            }
        }
        let read = |buckets: &[u32]| {
            let calls: Vec<Call> = buckets
                .iter()
                .map(|&b| {
                    let mut cmd = redis::cmd("GET");
                    cmd.arg(self.keys.epoch(b));
                    Call { slot: self.keys.slot(b), cmd }
                })
                .collect();
            async move { self.nodes.exec(&calls, false).await }
        };
        let mut current = read(&checked).await?;
        if current.iter().any(|v| matches!(v, Value::Nil)) {
            // Every bucket's marker, so that a checked bucket that changes master later
            // has one too; `NX`: markers that survived stay.
            let mine = format!("{:x}-{}", self.instance, now_ms());
            let calls: Vec<Call> = (0..self.keys.buckets())
                .map(|b| {
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(self.keys.epoch(b)).arg(&mine).arg("NX");
                    Call { slot: self.keys.slot(b), cmd }
                })
                .collect();
            self.nodes.exec(&calls, false).await?;
            current = read(&checked).await?;
        }
        let mut known = self.epoch.lock().unwrap_or_else(|e| e.into_inner());
        let mut lost = false;
        for (bucket, value) in checked.into_iter().zip(current) {
            let value = match value {
                Value::BulkString(v) => String::from_utf8_lossy(&v).into_owned(),
                other => return Err(StateError::Protocol(format!("epoch marker: {other:?}"))),
            };
            if known.get(&bucket).is_some_and(|k| *k != value) {
                lost = true;
            }
            known.insert(bucket, value);
        }
        Ok(lost)
    }

    pub async fn merge(&self, batch: &[(String, Partial)], lease: Duration) -> Result<Vec<MergeOutcome>, StateError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let lease_until = now_ms() + ms(lease);
        let calls: Vec<Call> = batch.iter().map(|(id, partial)| self.merge_call(id, partial, lease_until)).collect();
        let replies = self.nodes.exec_each(&calls, true).await;
        if let Some(Err(_)) = replies.first().filter(|_| replies.iter().all(Result::is_err)) {
            // Nothing went through: the store is down, not some items.
            return Err(replies.into_iter().find_map(Result::err).expect("an error"));
        }
        Ok(batch
            .iter()
            .zip(replies)
            .map(|((id, partial), reply)| match reply {
                Err(e) => MergeOutcome::Failed(e),
                Ok(Value::Int(_)) => MergeOutcome::Persisted,
                Ok(Value::Array(fields)) => {
                    match self.entry(id, fields).with_own(partial).into_document(&self.schema, id) {
                        Ok(doc) => MergeOutcome::Completed(doc),
                        Err(e) => MergeOutcome::Failed(e),
                    }
                }
                Ok(Value::ServerError(e)) => MergeOutcome::Failed(StateError::Redis(e.into())),
                Ok(other) => MergeOutcome::Failed(StateError::Protocol(format!("merge of {id} returned {other:?}"))),
            })
            .collect())
    }

    fn merge_call(&self, id: &str, partial: &Partial, lease_until: u64) -> Call {
        let parts = self.schema.parts();
        let now = now_ms();
        let b = self.keys.bucket(id);
        let k = &self.keys;
        let mut cmd = evalsha(
            &self.scripts.merge,
            &[&k.item(b, id), &k.outbox(b, id), &k.outbox_index(b), &k.partial_index(b), &k.record(b, id)],
        );
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
        Call { slot: k.slot(b), cmd }
    }

    /// Records completions decided in memory: one script call per item.
    pub async fn remember(&self, done: &[Completion]) -> Result<(), StateError> {
        let k = &self.keys;
        let calls: Vec<Call> = done
            .iter()
            .map(|completion| {
                let id = completion.id.as_str();
                let b = k.bucket(id);
                let version = completion.stamps.iter().copied().max().unwrap_or(0);
                let mut cmd = evalsha(
                    &self.scripts.remember,
                    &[&k.item(b, id), &k.partial_index(b), &k.outbox(b, id), &k.outbox_index(b), &k.record(b, id)],
                );
                cmd.arg(id).arg(self.records.remember_ms()).arg(version);
                cmd.arg(if self.late_updates { "1" } else { "0" }).arg(now_ms()).arg(self.records.fingerprint());
                for (part, stamp) in self.schema.parts().iter().zip(&completion.stamps) {
                    cmd.arg(&part.type_name).arg(stamp);
                }
                Call { slot: k.slot(b), cmd }
            })
            .collect();
        self.run(&calls, false).await
    }

    /// Runs calls whose replies are not needed; the first error reply fails them all (all
    /// are safe to run again).
    async fn run(&self, calls: &[Call], durable: bool) -> Result<(), StateError> {
        for reply in self.nodes.exec(calls, durable).await? {
            if let Value::ServerError(e) = reply {
                return Err(StateError::Redis(e.into()));
            }
        }
        Ok(())
    }

    /// Ids grouped by bucket, in bucket order.
    fn by_bucket<'a, T>(&self, items: &'a [T], id: impl Fn(&T) -> &str) -> Vec<(u32, Vec<&'a T>)> {
        let mut groups: std::collections::BTreeMap<u32, Vec<&T>> = Default::default();
        for item in items {
            groups.entry(self.keys.bucket(id(item))).or_default().push(item);
        }
        groups.into_iter().collect()
    }

    /// Settles outbox entries: `(id, version)` pairs.
    pub async fn confirm(&self, done: &[(String, u64)]) -> Result<(), StateError> {
        // One script call per chunk, not one per document; on a cluster, per bucket and
        // chunk (a script's keys must share a slot).
        let groups: Vec<Vec<&(String, u64)>> = if self.nodes.is_cluster() {
            self.by_bucket(done, |(id, _)| id).into_iter().map(|(_, entries)| entries).collect()
        } else {
            vec![done.iter().collect()]
        };
        let mut calls = Vec::new();
        for entries in groups {
            for chunk in entries.chunks(CHUNK) {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.scripts.confirm.get_hash()).arg(2 * chunk.len());
                for (id, _) in chunk {
                    let b = self.keys.bucket(id);
                    cmd.arg(self.keys.outbox_index(b)).arg(self.keys.outbox(b, id));
                }
                for (id, version) in chunk {
                    cmd.arg(id).arg(version);
                }
                calls.push(Call { slot: self.keys.slot(self.keys.bucket(&chunk[0].0)), cmd });
            }
        }
        self.run(&calls, false).await
    }

    /// Puts the parts of updates whose document is gone back as waiting copies.
    pub async fn reopen(&self, done: &[(String, u64)]) -> Result<(), StateError> {
        let now = now_ms();
        let k = &self.keys;
        let calls: Vec<Call> = done
            .iter()
            .map(|(id, version)| {
                let b = k.bucket(id);
                let mut cmd = evalsha(
                    &self.scripts.reopen,
                    &[&k.item(b, id), &k.outbox(b, id), &k.outbox_index(b), &k.partial_index(b), &k.record(b, id)],
                );
                cmd.arg(id).arg(version).arg(now).arg(self.backstop_ttl_ms);
                Call { slot: k.slot(b), cmd }
            })
            .collect();
        self.run(&calls, false).await
    }

    /// Takes this instance's share of the maintenance for the next rounds, `round` apart
    /// (see [`share`]); returns the ranges of buckets it holds.
    pub async fn take_share(&self, round: Duration) -> Result<Vec<u32>, StateError> {
        self.share.round(&self.nodes, &self.keys, &self.prefix, &self.scripts.lease, round).await
    }

    /// Gives up this instance's share of the maintenance.
    pub async fn release_share(&self) -> Result<(), StateError> {
        self.share.release(&self.nodes, &self.keys, &self.prefix, &self.scripts.lease).await
    }

    /// Up to `limit` members, over the index (`index(bucket)`) of every bucket of this
    /// instance's share, with a score (ms) at most `deadline`: `(bucket, id)`.
    async fn due(
        &self,
        index: impl Fn(u32) -> String,
        deadline: u64,
        limit: usize,
    ) -> Result<Vec<(u32, String)>, StateError> {
        let buckets = self.share.buckets(&self.keys);
        let calls: Vec<Call> = buckets
            .iter()
            .map(|&b| {
                let mut cmd = redis::cmd("ZRANGE");
                cmd.arg(index(b)).arg("-inf").arg(deadline).arg("BYSCORE").arg("LIMIT").arg(0).arg(limit);
                Call { slot: self.keys.slot(b), cmd }
            })
            .collect();
        let mut due = Vec::new();
        for (b, reply) in buckets.into_iter().zip(self.nodes.exec(&calls, false).await?) {
            let ids: Vec<String> =
                redis::from_redis_value(reply).map_err(|e| StateError::Protocol(format!("ZRANGE: {e}")))?;
            due.extend(ids.into_iter().map(|id| (b, id)));
            if due.len() >= limit {
                due.truncate(limit);
                break;
            }
        }
        Ok(due)
    }

    /// Claims up to `limit` outbox entries whose lease lapsed, each by one atomic call.
    pub async fn claim_outbox(&self, lease: Duration, limit: usize) -> Result<Vec<Swept>, StateError> {
        let now = now_ms();
        let due = self.due(|b| self.keys.outbox_index(b), now, limit).await?;
        let calls: Vec<Call> = due
            .iter()
            .map(|(b, id)| {
                let mut cmd = evalsha(&self.scripts.claim, &[&self.keys.outbox_index(*b), &self.keys.outbox(*b, id)]);
                cmd.arg(id).arg(now).arg(now + ms(lease));
                Call { slot: self.keys.slot(*b), cmd }
            })
            .collect();
        let replies = self.nodes.exec(&calls, false).await?;
        Ok(due.into_iter().zip(replies).filter_map(|((_, id), reply)| self.swept(id, reply)).collect())
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
        let mut calls = Vec::new();
        for (b, ids) in self.by_bucket(ids, |id| id) {
            for chunk in ids.chunks(CHUNK) {
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(self.keys.outbox_index(b)).arg("XX");
                for id in chunk {
                    cmd.arg(until).arg(*id);
                }
                calls.push(Call { slot: self.keys.slot(b), cmd });
            }
        }
        self.run(&calls, false).await
    }

    /// Parks documents completed in memory in the outbox, due at once.
    pub async fn park(&self, docs: &[Document]) -> Result<(), StateError> {
        let now = now_ms();
        let calls: Vec<Call> = docs
            .iter()
            .map(|doc| {
                let b = self.keys.bucket(&doc.id);
                let mut cmd = evalsha(&self.scripts.park, &[&self.keys.outbox_index(b), &self.keys.outbox(b, &doc.id)]);
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
                if doc.update {
                    cmd.arg(UPDATE_FIELD).arg("1");
                }
                if let Some(kind) = doc.orphan {
                    cmd.arg(ORPHAN_FIELD).arg(if kind == OrphanKind::Late { "late" } else { "partial" });
                }
                Call { slot: self.keys.slot(b), cmd }
            })
            .collect();
        self.run(&calls, true).await
    }

    /// Sweeps up to `limit` orphans not updated for `older_than`.
    pub async fn sweep_orphans(
        &self,
        older_than: Duration,
        limit: usize,
        deliver_lease: Option<Duration>,
    ) -> Result<Vec<Swept>, StateError> {
        let now = now_ms();
        let deadline = now.saturating_sub(ms(older_than));
        self.forget_records(now).await?;
        let due = self.due(|b| self.keys.partial_index(b), deadline, limit).await?;
        let lease = deliver_lease.map_or(String::new(), |l| (now + ms(l)).to_string());
        let k = &self.keys;
        let calls: Vec<Call> = due
            .iter()
            .map(|(b, id)| {
                let b = *b;
                let mut cmd = evalsha(
                    &self.scripts.expire,
                    &[&k.item(b, id), &k.partial_index(b), &k.outbox(b, id), &k.outbox_index(b), &k.record(b, id)],
                );
                cmd.arg(id).arg(deadline).arg(self.records.fingerprint()).arg(&lease).arg(self.schema.len());
                for part in self.schema.parts() {
                    cmd.arg(&part.type_name);
                }
                cmd.arg(now).arg(self.records.remember_ms());
                Call { slot: k.slot(b), cmd }
            })
            .collect();
        let replies = self.nodes.exec(&calls, false).await?;
        Ok(due.into_iter().zip(replies).filter_map(|((_, id), reply)| self.swept(id, reply)).collect())
    }

    /// Removes the records older than `remember_completed` from this round's hashes.
    async fn forget_records(&self, now: u64) -> Result<(), StateError> {
        let calls: Vec<Call> = self
            .records
            .next_round()
            .into_iter()
            .map(|(b, key)| {
                let mut cmd = evalsha(&self.scripts.forget, &[&key]);
                cmd.arg(now).arg(self.records.remember_ms());
                Call { slot: self.keys.slot(b), cmd }
            })
            .collect();
        self.run(&calls, false).await
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
        let b = self.keys.bucket(id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HKEYS").arg(self.keys.item(b, id));
        pipe.cmd("HEXISTS").arg(self.keys.outbox(b, id)).arg(VERSION_FIELD);
        pipe.cmd("HGET").arg(self.keys.record(b, id)).arg(id);
        let (fields, in_outbox, record): (Vec<String>, bool, Option<Vec<u8>>) =
            pipe.query_async(&mut self.nodes.conn()).await?;
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
        let mut conn = self.nodes.conn();
        let (length,): (i64,) = pipe.query_async(&mut conn).await?;
        Ok(length.saturating_sub(max).max(0) as u64)
    }

    pub async fn read_dead_letters(
        &self,
        cursor: &mut LetterCursor,
        limit: usize,
    ) -> Result<Vec<StoredLetter>, StateError> {
        let (start, stop) = (cursor.next, cursor.next + limit.max(1) as u64 - 1);
        let mut conn = self.nodes.conn();
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
        let mut conn = self.nodes.conn();
        let removed: Vec<u64> = pipe.query_async(&mut conn).await?;
        // They were read before the cursor: the letters after it moved up by as many.
        cursor.next = cursor.next.saturating_sub(removed.iter().sum());
        Ok(())
    }
}

/// A vector as little-endian f32 bytes (a plain copy on little-endian machines).
pub fn f32_le_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = vec![0; v.len() * 4];
    for (bytes, x) in out.chunks_exact_mut(4).zip(v) {
        bytes.copy_from_slice(&x.to_le_bytes());
    }
    out
}
