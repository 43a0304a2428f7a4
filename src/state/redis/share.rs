//! How several instances split the maintenance (outbox resends, the orphan sweep) bucket by
//! bucket without doing it twice.
//!
//! The buckets form [`RANGES`] ranges. Each instance announces itself every round (a sorted
//! set of instances by last round, `{prefix}instances`), counts the live ones, and holds at
//! most its fair share of ranges, `ceil(ranges / instances)`, each by a lease that lapses
//! after [`LEASE_ROUNDS`] rounds without renewal (`lease.lua`). It renews the leases it
//! holds, releases those beyond its share, and takes free ones up to its share. An instance
//! that dies stops renewing: its ranges are free a few rounds later, and the others take
//! them. An instance's maintenance visits only the buckets of the ranges it holds.
//!
//! Every step is also safe when two instances briefly both visit a bucket (a claim or a
//! sweep of one entry is atomic), so the leases save work; they are not needed for
//! correctness.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::seq::SliceRandom;
use redis::{Script, Value};

use super::keys::Keys;
use super::nodes::{Call, Nodes};
use crate::state::StateError;

/// Ranges of buckets leased for maintenance.
pub const RANGES: u32 = 16;
/// Rounds a lease (and an instance's announcement) lasts without renewal.
pub const LEASE_ROUNDS: u32 = 3;

/// The ranges this store handle holds, shared by its clones.
#[derive(Clone)]
pub struct Share {
    instance: String,
    /// `None` until the first round: a handle that never takes a share (a tool, a test)
    /// visits every bucket.
    held: Arc<RwLock<Option<Vec<u32>>>>,
}

impl Share {
    pub fn new(instance: u64) -> Share {
        Share { instance: format!("{instance:016x}"), held: Arc::default() }
    }

    /// The buckets to visit: those of the ranges held, or all before the first round.
    pub fn buckets(&self, keys: &Keys) -> Vec<u32> {
        let ranges = ranges(keys);
        match &*self.held.read().unwrap_or_else(|e| e.into_inner()) {
            None => (0..keys.buckets()).collect(),
            Some(held) => (0..keys.buckets()).filter(|b| held.contains(&range_of(*b, keys, ranges))).collect(),
        }
    }

    /// One round: announce this instance, renew or release held ranges, take free ones
    /// up to the fair share. Returns the ranges held now.
    pub async fn round(
        &self,
        nodes: &Nodes,
        keys: &Keys,
        prefix: &str,
        script: &Script,
        round: Duration,
    ) -> Result<Vec<u32>, StateError> {
        let lease_ms = (round * LEASE_ROUNDS).as_millis().max(1) as u64;
        let now = crate::state::redis::now_ms();
        let members = format!("{prefix}instances");
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(&members).arg(now).arg(&self.instance).ignore();
        pipe.cmd("ZREMRANGEBYSCORE").arg(&members).arg("-inf").arg(now.saturating_sub(lease_ms)).ignore();
        pipe.cmd("ZCARD").arg(&members);
        let (live,): (u32,) = pipe.query_async(&mut nodes.conn()).await?;
        let ranges = ranges(keys);
        let fair = ranges.div_ceil(live.max(1)) as usize;
        // Who holds each range now.
        let reads: Vec<Call> = (0..ranges)
            .map(|r| {
                let bucket = first_bucket(r, keys, ranges);
                let mut cmd = redis::cmd("GET");
                cmd.arg(keys.lease(bucket));
                Call { slot: keys.slot(bucket), cmd }
            })
            .collect();
        let holders = nodes.exec(&reads, false).await?;
        let mine = |holder: &Value| matches!(holder, Value::BulkString(h) if *h == self.instance.as_bytes());
        let held: Vec<u32> = (0..ranges).filter(|&r| mine(&holders[r as usize])).collect();
        let mut free: Vec<u32> = (0..ranges).filter(|&r| matches!(holders[r as usize], Value::Nil)).collect();
        free.shuffle(&mut rand::rng());
        let mut asked: Vec<(u32, &str)> =
            held.iter().enumerate().map(|(i, &r)| (r, if i < fair { "renew" } else { "release" })).collect();
        asked.extend(free.into_iter().take(fair.saturating_sub(held.len())).map(|r| (r, "take")));
        let calls: Vec<Call> = asked
            .iter()
            .map(|(r, op)| {
                let bucket = first_bucket(*r, keys, ranges);
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(script.get_hash()).arg(1).arg(keys.lease(bucket)).arg(&self.instance).arg(lease_ms).arg(*op);
                Call { slot: keys.slot(bucket), cmd }
            })
            .collect();
        let replies = nodes.exec(&calls, false).await?;
        let now_held: Vec<u32> = asked
            .iter()
            .zip(replies)
            .filter(|(_, reply)| matches!(reply, Value::Int(1)))
            .map(|((r, _), _)| *r)
            .collect();
        if now_held.len() != held.len() {
            tracing::info!(
                ranges = now_held.len(),
                of = ranges,
                instances = live,
                "This instance's share of the maintenance changed."
            );
        }
        *self.held.write().unwrap_or_else(|e| e.into_inner()) = Some(now_held.clone());
        Ok(now_held)
    }
}

impl Share {
    /// Releases the ranges held and withdraws this instance's announcement.
    pub async fn release(&self, nodes: &Nodes, keys: &Keys, prefix: &str, script: &Script) -> Result<(), StateError> {
        let held = self.held.write().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        let ranges = ranges(keys);
        let calls: Vec<Call> = held
            .iter()
            .map(|&r| {
                let bucket = first_bucket(r, keys, ranges);
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(script.get_hash()).arg(1).arg(keys.lease(bucket)).arg(&self.instance).arg(1).arg("release");
                Call { slot: keys.slot(bucket), cmd }
            })
            .collect();
        nodes.exec(&calls, false).await?;
        redis::cmd("ZREM")
            .arg(format!("{prefix}instances"))
            .arg(&self.instance)
            .query_async::<()>(&mut nodes.conn())
            .await?;
        Ok(())
    }
}

fn ranges(keys: &Keys) -> u32 {
    RANGES.min(keys.buckets())
}

fn range_of(bucket: u32, keys: &Keys, ranges: u32) -> u32 {
    (u64::from(bucket) * u64::from(ranges) / u64::from(keys.buckets())) as u32
}

fn first_bucket(range: u32, keys: &Keys, ranges: u32) -> u32 {
    (u64::from(range) * u64::from(keys.buckets())).div_ceil(u64::from(ranges)) as u32
}
