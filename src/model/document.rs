//! A complete document, and the partial it is assembled from.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::{AckGroup, Metadata, Part, Schema};

/// Where a completed document waits until the sink takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Completed in a shard's memory: this value is its only copy (shutdown parks it).
    Memory,
    /// Completed in the state store (or parked, or an orphan): its outbox entry stays until
    /// the sink settles this version, and any instance resends it if its lease lapses.
    Outbox,
}

/// Why an orphan's parts never completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanKind {
    /// The item never had every part.
    Partial,
    /// The item completed before; these newer parts came after and found no partner.
    /// They are never indexed over the complete document.
    Late,
}

/// A document with every configured part present, ready for the sink.
#[derive(Debug, Clone)]
pub struct Document {
    pub id: String,
    /// One vector per schema slot, in slot order. An empty vector marks a missing part: only
    /// an orphan indexed incomplete (`durability.orphans = "index"`) has one, since a
    /// validated part always has at least one value.
    pub vectors: Vec<Vec<f32>>,
    /// The stamp of each slot's part ([`super::stamp`]); 0 for a missing part.
    pub stamps: Vec<u64>,
    /// Metadata of all parts, merged; a later slot's key wins.
    pub metadata: Option<Metadata>,
    pub completed_at: SystemTime,
    /// When the part that completed it was received, for latency.
    pub received_at: Instant,
    pub origin: Origin,
    /// Set for parts swept as an orphan: they waited longer than the partial TTL.
    pub orphan: Option<OrphanKind>,
    /// Set for newer copies of some parts of an item already completed
    /// (`state.late_parts = "update"`): only those parts are written, over the indexed
    /// document, each only if it is newer than the one there. The other vectors are empty.
    pub update: bool,
    /// Requests waiting for it to be settled (`persisted` mode, completed in memory).
    pub acks: Vec<Arc<AckGroup>>,
}

impl Document {
    /// Its external version in the index: the largest stamp of its parts, so every later
    /// completion of the id carries a larger one and the index never goes back.
    pub fn version(&self) -> u64 {
        self.stamps.iter().copied().max().unwrap_or(0)
    }

    /// Whether a part is missing (an orphan).
    pub fn is_incomplete(&self) -> bool {
        self.vectors.iter().any(Vec::is_empty)
    }
}

/// The parts of one item held in memory by its shard.
#[derive(Debug)]
pub struct Partial {
    /// One optional vector per schema slot.
    pub vectors: Vec<Option<Vec<f32>>>,
    /// Per-slot metadata: a part's metadata belongs to that copy of the part.
    pub metadata: Vec<Option<Metadata>>,
    /// Per-slot stamp of the copy held (0: none).
    pub stamps: Vec<u64>,
    /// Arrival of the newest part.
    pub received_at: Instant,
    /// Requests waiting for these parts to be durable.
    pub acks: Vec<Arc<AckGroup>>,
}

impl Partial {
    pub fn new(slots: usize, now: Instant) -> Partial {
        Partial {
            vectors: vec![None; slots],
            metadata: vec![None; slots],
            stamps: vec![0; slots],
            received_at: now,
            acks: Vec::new(),
        }
    }

    /// Sets one part, unless the copy held is newer (a larger stamp): the newest copy of a
    /// part wins, with its metadata (a copy without metadata has none). Returns the change
    /// in vector bytes held.
    pub fn apply(&mut self, part: Part) -> isize {
        self.acks.extend(part.ack);
        if part.stamp <= self.stamps[part.slot] {
            return 0; // an older copy, overtaken on its way here
        }
        let added = (part.vector.len() * 4) as isize;
        let old = self.vectors[part.slot].replace(part.vector);
        self.metadata[part.slot] = part.metadata;
        self.stamps[part.slot] = part.stamp;
        self.received_at = part.received_at;
        added - old.map_or(0, |v| (v.len() * 4) as isize)
    }

    pub fn mask(&self) -> u32 {
        self.vectors.iter().enumerate().filter(|(_, v)| v.is_some()).fold(0, |m, (i, _)| m | (1 << i))
    }

    pub fn is_complete(&self, schema: &Schema) -> bool {
        self.mask() == schema.complete_mask()
    }

    /// Bytes of vector data held, for memory accounting.
    pub fn vector_bytes(&self) -> usize {
        self.vectors.iter().flatten().map(|v| v.len() * 4).sum()
    }

    /// Turns a complete partial into its document. Panics if a part is missing.
    pub fn into_document(self, id: String) -> Document {
        Document {
            id,
            vectors: self.vectors.into_iter().map(|v| v.expect("complete")).collect(),
            stamps: self.stamps,
            metadata: merge_metadata(self.metadata),
            completed_at: SystemTime::now(),
            received_at: self.received_at,
            origin: Origin::Memory,
            orphan: None,
            update: false,
            acks: self.acks,
        }
    }
}

/// Merges per-part metadata in slot order; later slots win on a shared key.
pub fn merge_metadata(parts: impl IntoIterator<Item = Option<Metadata>>) -> Option<Metadata> {
    let mut merged: Option<Metadata> = None;
    for meta in parts.into_iter().flatten() {
        match merged.as_mut() {
            None => merged = Some(meta),
            Some(m) => m.extend(meta),
        }
    }
    merged
}

/// RFC 3339 UTC timestamp with millisecond precision, as Elasticsearch's `date` type reads it.
pub fn rfc3339(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn part(slot: usize, stamp: u64, value: f32) -> Part {
        let mut p = Part::new("x".into(), slot, vec![value; 2], None);
        p.stamp = stamp;
        p
    }

    #[test]
    fn an_older_copy_never_replaces_a_newer_one() {
        let mut partial = Partial::new(2, Instant::now());
        partial.apply(part(0, 20, 2.0));
        assert_eq!(partial.apply(part(0, 10, 1.0)), 0);
        assert_eq!(partial.vectors[0], Some(vec![2.0; 2]));
        partial.apply(part(1, 5, 3.0));
        let doc = partial.into_document("x".into());
        assert_eq!(doc.stamps, vec![20, 5]);
        assert_eq!(doc.version(), 20);
    }

    #[test]
    fn metadata_merges_in_slot_order() {
        let a = json!({"title": "a", "lang": "en"}).as_object().cloned();
        let b = json!({"title": "b"}).as_object().cloned();
        let merged = merge_metadata([a, None, b]).unwrap();
        assert_eq!(merged["title"], "b");
        assert_eq!(merged["lang"], "en");
        assert!(merge_metadata([None, None]).is_none());
    }
}
