//! Moves what an embedjoin from before virtual buckets stored into the bucketed layout
//! ([`super::keys`]), once, when a store connects. That layout ran on a single node only:
//! `{prefix}{<id>}` (an item's waiting parts), `{prefix}outbox:{<id>}` (an outbox entry),
//! the sorted sets `{prefix}partials` and `{prefix}outbox`, the record hashes
//! `{prefix}records:{<n>}`, and the marker `{prefix}epoch`, which is deleted last: while it
//! exists, a store that connects migrates (again; every step is safe to repeat).
//!
//! - A waiting item's parts are merged into the new layout, with their stamps.
//! - An outbox entry is parked in the new outbox, due at once: the maintenance of any
//!   instance delivers it.
//! - A record is copied unless the new layout has one for that id already.

use std::time::{Duration, Instant};

use redis::Value;

use super::RedisStore;
use crate::model::document::Partial;
use crate::state::{StateError, Swept};

/// Items moved per round trip.
const PAGE: usize = 500;

/// Migrates the old layout if it is there; returns how many items and records moved.
pub async fn old_layout(store: &RedisStore, prefix: &str) -> Result<(usize, usize), StateError> {
    let mut conn = store.nodes.conn();
    let marker = format!("{prefix}epoch");
    let old: bool = redis::cmd("EXISTS").arg(&marker).query_async(&mut conn).await?;
    if !old || store.nodes.is_cluster() {
        return Ok((0, 0));
    }
    tracing::warn!(prefix, "Redis holds embedjoin's key layout from before virtual buckets: moving it.");
    let mut items = 0;
    let partials = format!("{prefix}partials");
    loop {
        let ids: Vec<String> = redis::cmd("ZRANGE").arg(&partials).arg(0).arg(PAGE - 1).query_async(&mut conn).await?;
        if ids.is_empty() {
            break;
        }
        let mut batch = Vec::new();
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}{{{id}}}")).collect();
        for (id, fields) in ids.iter().zip(hashes(&mut conn, &keys).await?) {
            let entry = store.entry(id, fields);
            if entry.error.is_some() || entry.vectors.iter().all(Option::is_none) {
                continue; // gone, or unreadable: as the orphan sweep would have found it
            }
            let mut partial = Partial::new(entry.vectors.len(), Instant::now());
            partial.vectors = entry.vectors;
            partial.stamps = entry.stamps;
            partial.metadata = entry.metadata;
            batch.push((id.clone(), partial));
        }
        for outcome in store.merge(&batch, Duration::ZERO).await? {
            if let crate::state::MergeOutcome::Failed(e) = outcome {
                return Err(e);
            }
        }
        items += batch.len();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("DEL").arg(format!("{prefix}{{{id}}}")).ignore();
            pipe.cmd("ZREM").arg(&partials).arg(id).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    let outbox = format!("{prefix}outbox");
    loop {
        let ids: Vec<String> = redis::cmd("ZRANGE").arg(&outbox).arg(0).arg(PAGE - 1).query_async(&mut conn).await?;
        if ids.is_empty() {
            break;
        }
        let mut docs = Vec::new();
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}outbox:{{{id}}}")).collect();
        for (id, fields) in ids.iter().zip(hashes(&mut conn, &keys).await?) {
            if fields.is_empty() {
                continue;
            }
            match store.swept(id.clone(), Value::Array(fields)) {
                Some(Swept::Found(doc)) => docs.push(doc),
                Some(Swept::Unreadable { reason, .. }) => {
                    tracing::error!(
                        id,
                        reason,
                        "An outbox entry of the old key layout cannot be read; it is left under its old key."
                    );
                    continue;
                }
                None => {}
            }
        }
        store.park(&docs).await?;
        items += docs.len();
        let mut pipe = redis::pipe();
        for doc in &docs {
            pipe.cmd("DEL").arg(format!("{prefix}outbox:{{{}}}", doc.id)).ignore();
        }
        pipe.cmd("ZREM").arg(&outbox).arg(&ids).ignore();
        pipe.query_async::<()>(&mut conn).await?;
    }
    let mut records = 0;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}records:{{*}}"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        for key in keys {
            let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await?;
            let mut pipe = redis::pipe();
            for (id, value) in &all {
                let b = store.keys.bucket(id);
                pipe.cmd("HSETNX").arg(store.keys.record(b, id)).arg(id).arg(value).ignore();
            }
            pipe.cmd("DEL").arg(&key).ignore();
            pipe.query_async::<()>(&mut conn).await?;
            records += all.len();
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    redis::cmd("DEL").arg(&marker).query_async::<()>(&mut conn).await?;
    tracing::warn!(items, records, "Moved embedjoin's old key layout into virtual buckets.");
    Ok((items, records))
}

/// Every field and value of each hash, in one round trip.
async fn hashes(conn: &mut super::nodes::Conn, keys: &[String]) -> Result<Vec<Vec<Value>>, StateError> {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("HGETALL").arg(key);
    }
    Ok(pipe.query_async(conn).await?)
}
