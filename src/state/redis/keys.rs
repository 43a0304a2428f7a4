//! Where each item lives in Redis: its virtual bucket, and the names of every key.
//!
//! An item belongs to bucket `FNV-1a(id) mod redis.buckets`. Every key of a bucket carries
//! the bucket's hash tag, `{<tag>}`, so that all of them sit in one cluster slot and each
//! script call (which touches the item's keys, its bucket's indexes and its record) is
//! single-slot:
//!
//! - `{prefix}{<tag>}i:<id>`: the item's parts while some wait (see `merge.lua`).
//! - `{prefix}{<tag>}o:<id>`: the item's outbox entry, a completion not yet settled.
//! - `{prefix}{<tag>}outbox`: the bucket's outbox ids by lease expiry, in ms.
//! - `{prefix}{<tag>}partials`: the bucket's incomplete ids by last update, in ms.
//! - `{prefix}{<tag>}r:<k>`: records of completed items (see [`crate::state::records`]).
//! - `{prefix}{<tag>}epoch`: a marker; if it disappears, the node serving it lost its data.
//! - `{prefix}{<tag>}lease`: in the first bucket of a range, the instance whose maintenance
//!   visits the range (see [`super::share`]).
//!
//! Outside the buckets: `{prefix}deadletter` (the dead letters), `{prefix}layout` (the
//! number of buckets the data was written with) and `{prefix}instances` (the instances
//! sharing the maintenance, see [`super::share`]).
//!
//! The hash tag comes before the id, so an id holding `{` or `}` cannot change the slot.
//!
//! Tags are chosen so that bucket `b` of `n` is served by slot `b * 16384 / n`: buckets
//! are spread evenly over the slot space, and a cluster whose masters own equal slot
//! ranges (what `redis-cli --cluster create` makes) serves equal shares of them. The tag of
//! a slot is the smallest decimal number whose CRC16 falls in it: stable forever, as keys
//! already stored depend on it.

/// Redis Cluster's number of hash slots.
pub const SLOTS: u32 = 16384;

/// 32-bit FNV-1a: stable across versions and platforms, as a bucket must be.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// CRC16-XMODEM, Redis Cluster's key hash.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0u16;
    for b in bytes {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The key names of one store.
#[derive(Debug)]
pub struct Keys {
    prefix: String,
    /// Per bucket, its hash tag with the braces.
    tags: Vec<String>,
    /// Record hashes per bucket.
    record_hashes: u32,
}

impl Keys {
    /// Keys under `prefix` for `buckets` buckets (1..=16384) and about `record_buckets`
    /// record hashes in all.
    pub fn new(prefix: &str, buckets: u32, record_buckets: u32) -> Keys {
        let buckets = buckets.clamp(1, SLOTS);
        let wanted: Vec<u16> = (0..buckets).map(|b| slot_of_bucket(b, buckets)).collect();
        let mut tag_of_slot = vec![None::<u32>; SLOTS as usize];
        let mut missing: std::collections::HashSet<u16> = wanted.iter().copied().collect();
        let mut k = 0u32;
        while !missing.is_empty() {
            let slot = crc16(k.to_string().as_bytes()) % SLOTS as u16;
            if missing.remove(&slot) {
                tag_of_slot[slot as usize] = Some(k);
            }
            k += 1;
        }
        let tags = wanted.iter().map(|&s| format!("{{{}}}", tag_of_slot[s as usize].expect("found"))).collect();
        Keys { prefix: prefix.to_owned(), tags, record_hashes: record_buckets.div_ceil(buckets).max(1) }
    }

    pub fn buckets(&self) -> u32 {
        self.tags.len() as u32
    }

    /// The bucket of `id`.
    pub fn bucket(&self, id: &str) -> u32 {
        fnv1a(id.as_bytes()) % self.buckets()
    }

    /// The cluster slot that serves bucket `b`.
    pub fn slot(&self, bucket: u32) -> u16 {
        slot_of_bucket(bucket, self.buckets())
    }

    fn key(&self, bucket: u32, rest: std::fmt::Arguments) -> String {
        format!("{}{}{}", self.prefix, self.tags[bucket as usize], rest)
    }

    pub fn item(&self, bucket: u32, id: &str) -> String {
        self.key(bucket, format_args!("i:{id}"))
    }

    pub fn outbox(&self, bucket: u32, id: &str) -> String {
        self.key(bucket, format_args!("o:{id}"))
    }

    pub fn outbox_index(&self, bucket: u32) -> String {
        self.key(bucket, format_args!("outbox"))
    }

    pub fn partial_index(&self, bucket: u32) -> String {
        self.key(bucket, format_args!("partials"))
    }

    /// The maintenance lease of the range of buckets that starts at `bucket` (see
    /// [`super::share`]).
    pub fn lease(&self, bucket: u32) -> String {
        self.key(bucket, format_args!("lease"))
    }

    pub fn epoch(&self, bucket: u32) -> String {
        self.key(bucket, format_args!("epoch"))
    }

    /// The record hash of `id` (in its bucket).
    pub fn record(&self, bucket: u32, id: &str) -> String {
        let within = (fnv1a(id.as_bytes()) / self.buckets()) % self.record_hashes;
        self.record_hash(bucket, within)
    }

    /// Every record hash, bucket by bucket: `(bucket, key)`.
    pub fn record_hash(&self, bucket: u32, within: u32) -> String {
        self.key(bucket, format_args!("r:{within}"))
    }

    /// Record hashes per bucket.
    pub fn record_hashes(&self) -> u32 {
        self.record_hashes
    }
}

fn slot_of_bucket(bucket: u32, buckets: u32) -> u16 {
    (u64::from(bucket) * u64::from(SLOTS) / u64::from(buckets)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn every_key_of_an_item_is_in_its_buckets_slot_whatever_the_id() {
        let keys = Keys::new("ej:", 1024, 16384);
        for id in ["sku-1", "{x}", "a}b{c", "}", "ü{}"] {
            let b = keys.bucket(id);
            let slot = Slot::new(keys.slot(b)).unwrap();
            for key in [
                keys.item(b, id),
                keys.outbox(b, id),
                keys.outbox_index(b),
                keys.partial_index(b),
                keys.record(b, id),
                keys.epoch(b),
            ] {
                assert_eq!(Slot::for_key(&key), slot, "{key} is in bucket {b}'s slot");
            }
        }
    }

    #[test]
    fn buckets_and_tags_are_stable_and_spread_evenly() {
        assert_eq!(fnv1a(b"sku-1"), 0x5ba1_d62c, "FNV-1a 32: stored keys depend on it");
        assert_eq!(crc16(b"123456789"), 0x31c3, "CRC16-XMODEM's check value");
        let keys = Keys::new("ej:", 1024, 16384);
        // Pinned: a stored key must keep its name from one version to the next.
        assert_eq!(keys.item(0, "a"), "ej:{3560}i:a");
        assert_eq!(keys.outbox_index(1023), format!("ej:{}outbox", keys.tags[1023]));
        assert_eq!(keys.slot(1), 16);
        // Three masters with equal slot ranges, as `redis-cli --cluster create` assigns
        // them, serve 341 or 342 buckets each.
        let per_master = |lo: u16, hi: u16| (0..1024).filter(|&b| (lo..=hi).contains(&keys.slot(b))).count();
        assert_eq!([per_master(0, 5460), per_master(5461, 10922), per_master(10923, 16383)], [342, 341, 341]);
        assert_eq!(keys.record_hashes(), 16);
        assert_eq!(Keys::new("ej:", 16384, 16384).record_hashes(), 1);
    }
}
