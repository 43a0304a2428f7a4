//! Routes parts to shards by a hash of the item id, so that every part of an item reaches
//! the one actor that owns it.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use tokio::time::{Duration, Instant};

use super::actor::{ShardClosed, ShardHandle, ShardMsg};
use crate::model::Part;

/// Why a request's parts were not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the shards' mailboxes stayed full")]
    Busy,
    #[error("the service is shutting down")]
    Closed,
}

#[derive(Clone)]
pub struct Router {
    shards: Arc<[ShardHandle]>,
}

impl Router {
    pub fn new(shards: Vec<ShardHandle>) -> Router {
        assert!(!shards.is_empty());
        Router { shards: shards.into() }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that owns `id`. Deterministic within a process (and across processes of
    /// the same build), which is all sharding needs: Redis reconciles across instances.
    pub fn shard_of(&self, id: &str) -> usize {
        (BuildHasherDefault::<DefaultHasher>::default().hash_one(id) % self.shards.len() as u64) as usize
    }

    /// Hands the parts to their shards, waiting as long as it takes for room in their
    /// mailboxes (benchmarks, tools). Ingress uses [`Router::try_submit`].
    pub async fn submit(&self, parts: Vec<Part>) -> Result<(), ShardClosed> {
        match self.submit_until(parts, None).await {
            Err(SubmitError::Closed) => Err(ShardClosed),
            _ => Ok(()),
        }
    }

    /// Hands the parts to their shards if every mailbox they need has room within `wait`;
    /// otherwise takes none of them (`Busy`), so the caller can answer 503.
    pub async fn try_submit(&self, parts: Vec<Part>, wait: Duration) -> Result<(), SubmitError> {
        self.submit_until(parts, Some(Instant::now() + wait)).await
    }

    async fn submit_until(&self, parts: Vec<Part>, deadline: Option<Instant>) -> Result<(), SubmitError> {
        let mut buckets: Vec<Vec<Part>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        if self.shards.len() == 1 {
            buckets[0] = parts;
        } else {
            for part in parts {
                buckets[self.shard_of(&part.id)].push(part);
            }
        }
        // Reserve a slot in every mailbox first, in shard order (so that concurrent requests
        // cannot deadlock), then send: a request is taken whole or not at all.
        let mut permits = Vec::new();
        for (shard, bucket) in self.shards.iter().zip(buckets.iter_mut()) {
            if bucket.is_empty() {
                continue;
            }
            let permit = match deadline {
                None => shard.reserve().await,
                Some(at) => tokio::time::timeout_at(at, shard.reserve()).await.map_err(|_| SubmitError::Busy)?,
            };
            permits.push((permit.map_err(|_| SubmitError::Closed)?, std::mem::take(bucket)));
        }
        for (permit, bucket) in permits {
            permit.send(ShardMsg::Parts(bucket));
        }
        Ok(())
    }

    /// The slots of `id` its shard holds in memory, as a bit mask (`None`: none). It
    /// answers after the parts already queued for that shard are applied.
    pub async fn inspect(&self, id: &str) -> Result<Option<u32>, ShardClosed> {
        self.shards[self.shard_of(id)].inspect(id.to_owned()).await
    }

    /// Asks every shard to persist its dirty partials now, and waits for it.
    pub async fn flush(&self) -> Result<(), ShardClosed> {
        for shard in self.shards.iter() {
            shard.flush().await?;
        }
        Ok(())
    }
}
