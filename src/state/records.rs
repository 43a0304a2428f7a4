//! Where Redis keeps the compact record of each completed item: what the state store
//! remembers for `state.remember_completed` so that an older copy of a part changes nothing
//! and a newer one updates the document (`record.lua` reads and writes it).
//!
//! A key per item would cost about 200 bytes in Redis (a key, its object, its expiry), more
//! than the record itself. So records are packed, as fields of a few shared hashes:
//!
//! - **Buckets.** An item's record is the field `<id>` of the hash of its bucket,
//!   `{prefix}records:{<bucket>}:<generation>`, bucket = FNV-1a of the id modulo
//!   `redis.record_buckets`. Small hashes are listpacks: about 40 bytes per record.
//! - **Generations.** Time is cut into generations of `remember_completed`. A record is
//!   written into the current generation's hash (and leaves an older one it was found in);
//!   it is read from the previous, current and next generation (instances' clocks may
//!   differ by less than a generation). A generation's hash expires as a whole once no
//!   reader looks at it: two generations after it began, plus a quarter for clock skew. A
//!   record is so remembered for at least `remember_completed` and at most 2.25 times it.
//! - **Value.** `struct.pack('<B' .. 'I7' x (n + 1))`: the fingerprint of the configured
//!   part types (a record written for other parts is not read), the completion's version,
//!   then each part's stamp in configured order (7 bytes: stamps stay below 2^53).

use crate::model::Schema;

/// The Lua functions of `record.lua`, prepended to the scripts that use them.
pub const LUA: &str = include_str!("record.lua");

/// Bytes of one packed stamp.
const STAMP_BYTES: usize = 7;

pub struct Records {
    prefix: String,
    buckets: u32,
    /// The length of a generation: `remember_completed`, in ms.
    generation_ms: u64,
    fingerprint: u8,
    parts: usize,
}

/// The record keys of one item for one call, and when the current one expires.
pub struct RecordKeys {
    /// Previous, current and next generation.
    pub keys: [String; 3],
    /// Unix ms at which the current generation's hash expires (`PEXPIREAT`).
    pub expire_at: u64,
}

impl Records {
    pub fn new(prefix: &str, buckets: u32, remember_ms: u64, schema: &Schema) -> Records {
        Records {
            prefix: prefix.to_owned(),
            buckets: buckets.max(1),
            generation_ms: remember_ms.max(1),
            fingerprint: fingerprint(schema),
            parts: schema.len(),
        }
    }

    /// The fingerprint of the configured part types, as scripts take it.
    pub fn fingerprint(&self) -> u8 {
        self.fingerprint
    }

    pub fn keys(&self, id: &str, now_ms: u64) -> RecordKeys {
        let bucket = fnv1a(id.as_bytes()) % self.buckets;
        let generation = now_ms / self.generation_ms;
        let key = |g: u64| format!("{}records:{{{bucket}}}:{g}", self.prefix);
        RecordKeys {
            keys: [key(generation.saturating_sub(1)), key(generation), key(generation + 1)],
            expire_at: (generation + 2) * self.generation_ms + self.generation_ms / 4,
        }
    }

    /// A record's version, if the value is one for the configured parts.
    pub fn version(&self, value: &[u8]) -> Option<u64> {
        if value.len() != 1 + STAMP_BYTES * (self.parts + 1) || value[0] != self.fingerprint {
            return None;
        }
        let mut version = [0u8; 8];
        version[..STAMP_BYTES].copy_from_slice(&value[1..1 + STAMP_BYTES]);
        Some(u64::from_le_bytes(version))
    }
}

/// One byte of FNV-1a over the part types in order: records written for other parts are
/// not read as ours.
fn fingerprint(schema: &Schema) -> u8 {
    let names: Vec<&str> = schema.parts().iter().map(|p| p.type_name.as_str()).collect();
    (fnv1a(names.join("\n").as_bytes()) % 251) as u8
}

/// 32-bit FNV-1a: stable across versions and platforms, as a bucket must be.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn buckets_and_generations_are_stable_and_cover_remember_completed() {
        let schema = Schema::new(&Settings::defaults().parts);
        let records = Records::new("ej:", 16384, 1000, &schema);
        assert_eq!(
            fnv1a(b"sku-1"),
            0x5ba1_d62c,
            "FNV-1a 32, as any implementation computes it: stored keys depend on it"
        );
        let k = records.keys("sku-1", 5_500);
        let bucket = 0x5ba1_d62c % 16384;
        assert_eq!(k.keys, [4, 5, 6].map(|g| format!("ej:records:{{{bucket}}}:{g}")));
        // Written at 5.5 s into generation 5, read until generation 7 ends: 7.25 s.
        assert_eq!(k.expire_at, 7_250);
        assert!(k.expire_at >= 5_500 + 1000);
    }

    #[test]
    fn a_record_for_other_parts_is_not_read() {
        let schema = Schema::new(&Settings::defaults().parts);
        let records = Records::new("ej:", 1, 1000, &schema);
        let mut value = vec![records.fingerprint()];
        for n in [42u64, 41, 42] {
            value.extend_from_slice(&n.to_le_bytes()[..STAMP_BYTES]);
        }
        assert_eq!(records.version(&value), Some(42));
        value[0] = value[0].wrapping_add(1);
        assert_eq!(records.version(&value), None);
        assert_eq!(records.version(&value[..8]), None);
    }
}
