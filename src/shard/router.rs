//! Routes parts to shards by a hash of the item id, so that every part of an item reaches
//! the one actor that owns it.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use super::actor::{ShardClosed, ShardHandle};
use crate::model::Part;

#[derive(Clone)]
pub struct Router {
    shards: Arc<[ShardHandle]>,
}

impl Router {
    pub fn new(shards: Vec<ShardHandle>) -> Router {
        assert!(!shards.is_empty());
        Router {
            shards: shards.into(),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that owns `id`. Deterministic within a process (and across processes of
    /// the same build), which is all sharding needs: Redis reconciles across instances.
    pub fn shard_of(&self, id: &str) -> usize {
        (BuildHasherDefault::<DefaultHasher>::default().hash_one(id) % self.shards.len() as u64)
            as usize
    }

    /// Hands the parts to their shards, waiting while a shard's mailbox is full.
    pub async fn submit(&self, parts: Vec<Part>) -> Result<(), ShardClosed> {
        if self.shards.len() == 1 {
            return self.shards[0].send(parts).await;
        }
        let mut buckets: Vec<Vec<Part>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        for part in parts {
            buckets[self.shard_of(&part.id)].push(part);
        }
        for (shard, bucket) in self.shards.iter().zip(buckets) {
            if !bucket.is_empty() {
                shard.send(bucket).await?;
            }
        }
        Ok(())
    }

    /// Asks every shard to persist its dirty partials now, and waits for it.
    pub async fn flush(&self) -> Result<(), ShardClosed> {
        for shard in self.shards.iter() {
            shard.flush().await?;
        }
        Ok(())
    }
}
