//! Where Redis keeps the compact record of each completed item: what the state store
//! remembers for `state.remember_completed` so that an older copy of a part changes nothing
//! and a newer one updates the document (`record.lua` reads and writes it).
//!
//! A key per item would cost about 200 bytes in Redis (a key, its object, its expiry), more
//! than the record itself. So records are packed, as fields of shared hashes:
//!
//! - **Buckets.** An item's record is the field `<id>` of one of its bucket's record
//!   hashes, `{prefix}{<tag>}r:<k>` (see [`super::redis::keys`]): about
//!   `redis.record_buckets` hashes in all. Hashes of up to `hash-max-listpack-entries`
//!   (128) fields are listpacks: about 45 bytes per record.
//! - **Value.** `struct.pack('<B' .. 'I7' x (n + 2))`: the fingerprint of the configured
//!   part types (a record written for other parts is not read), when it was written (unix
//!   ms), the completion's version, then each part's stamp in configured order (7 bytes:
//!   stamps stay below 2^53).
//! - **Expiry.** Redis 7.0 has no expiry per hash field, so a record carries its time: a
//!   record older than `remember_completed` is not read, and the maintenance of every
//!   instance removes such records, a few buckets per round (`forget.lua`), so that each
//!   bucket is visited every eighth of `remember_completed` (at most 1024 a round).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::redis::keys::{fnv1a, Keys};
use crate::model::Schema;

/// The Lua functions of `record.lua`, prepended to the scripts that use them.
pub const LUA: &str = include_str!("record.lua");

/// Most buckets one sweep round visits (a script call each): a short remember_completed
/// leaves records in memory longer, never readable longer.
const MAX_ROUND: u32 = 1024;

/// Bytes of one packed number.
const NUMBER_BYTES: usize = 7;

pub struct Records {
    keys: Arc<Keys>,
    /// Record hashes in all.
    hashes: u32,
    remember_ms: u64,
    fingerprint: u8,
    parts: usize,
    /// The next bucket the sweep visits.
    cursor: AtomicU32,
    /// Buckets per sweep round.
    per_round: u32,
}

impl Records {
    /// Records for `remember`, swept by maintenance rounds `round` apart.
    pub fn new(keys: Arc<Keys>, remember: Duration, round: Duration, schema: &Schema) -> Records {
        let buckets = keys.buckets() * keys.record_hashes();
        let remember_ms = remember.as_millis().clamp(1, u64::MAX as u128) as u64;
        // Every bucket once per eighth of remember_completed.
        let rounds = (remember_ms / 8) as f64 / (round.as_millis().max(1) as f64);
        let per_round =
            (f64::from(buckets) / rounds.max(1.0)).ceil().clamp(1.0, f64::from(buckets.min(MAX_ROUND))) as u32;
        Records {
            keys,
            hashes: buckets,
            remember_ms,
            fingerprint: fingerprint(schema),
            parts: schema.len(),
            cursor: AtomicU32::new(rand::random::<u32>() % buckets),
            per_round,
        }
    }

    /// The fingerprint of the configured part types, as scripts take it.
    pub fn fingerprint(&self) -> u8 {
        self.fingerprint
    }

    pub fn remember_ms(&self) -> u64 {
        self.remember_ms
    }

    /// The record hashes this sweep round visits: `(bucket, key)`.
    pub fn next_round(&self) -> Vec<(u32, String)> {
        let first = self.cursor.fetch_add(self.per_round, Ordering::Relaxed);
        let per_bucket = self.keys.record_hashes();
        (0..self.per_round)
            .map(|i| {
                let n = first.wrapping_add(i) % self.hashes;
                let bucket = n / per_bucket;
                (bucket, self.keys.record_hash(bucket, n % per_bucket))
            })
            .collect()
    }

    /// A record's version, if it is one for the configured parts, written within
    /// `remember_completed` of `now_ms`.
    pub fn version(&self, value: &[u8], now_ms: u64) -> Option<u64> {
        if value.len() != 1 + NUMBER_BYTES * (self.parts + 2) || value[0] != self.fingerprint {
            return None;
        }
        let number = |i: usize| {
            let mut n = [0u8; 8];
            n[..NUMBER_BYTES].copy_from_slice(&value[1 + i * NUMBER_BYTES..1 + (i + 1) * NUMBER_BYTES]);
            u64::from_le_bytes(n)
        };
        (number(0) + self.remember_ms > now_ms).then(|| number(1))
    }
}

/// One byte of FNV-1a over the part types in order: records written for other parts are
/// not read as ours.
fn fingerprint(schema: &Schema) -> u8 {
    let names: Vec<&str> = schema.parts().iter().map(|p| p.type_name.as_str()).collect();
    (fnv1a(names.join("\n").as_bytes()) % 251) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn records(buckets: u32) -> Records {
        let schema = Schema::new(&Settings::defaults().parts);
        let keys = Arc::new(Keys::new("ej:", buckets.min(1024), buckets));
        Records::new(keys, Duration::from_secs(8000), Duration::from_secs(1), &schema)
    }

    #[test]
    fn a_round_visits_each_record_hash_in_turn() {
        let records = records(16384);
        // 16384 hashes, every 1000 s (an eighth of 8000 s), in rounds of 1 s: 17 a round.
        assert_eq!(records.per_round, 17);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            seen.extend(records.next_round());
        }
        assert_eq!(seen.len(), 16384, "every hash within an eighth of remember_completed");
        assert!(seen.iter().all(|(bucket, key)| key.starts_with("ej:{") && *bucket < 1024));
    }

    #[test]
    fn a_record_for_other_parts_or_too_old_is_not_read() {
        let records = records(1);
        let value = |fingerprint: u8, written: u64| {
            let mut value = vec![fingerprint];
            for n in [written, 42, 41, 42] {
                value.extend_from_slice(&n.to_le_bytes()[..NUMBER_BYTES]);
            }
            value
        };
        let fp = records.fingerprint();
        assert_eq!(records.version(&value(fp, 1_000), 1_000 + 7_999_999), Some(42));
        assert_eq!(records.version(&value(fp, 1_000), 1_000 + 8_000_000), None, "older than remember_completed");
        assert_eq!(records.version(&value(fp.wrapping_add(1), 1_000), 2_000), None, "other parts");
        assert_eq!(records.version(&value(fp, 1_000)[..8], 2_000), None);
    }
}
