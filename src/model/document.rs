//! A complete document, and the partial it is assembled from.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::{AckGroup, Metadata, Part, Schema};

/// A document with every configured part present, ready for the sink.
#[derive(Debug, Clone)]
pub struct Document {
    pub id: String,
    /// One vector per schema slot, in slot order. An empty vector marks a missing part: only
    /// an orphan indexed incomplete (`durability.orphans = "index"`) has one, since a
    /// validated part always has at least one value.
    pub vectors: Vec<Vec<f32>>,
    /// Metadata of all parts, merged; a later part's key wins.
    pub metadata: Option<Metadata>,
    pub completed_at: SystemTime,
    /// When the part that completed it was received, for latency.
    pub received_at: Instant,
    /// Its completion token in the state store's outbox, if it completed there: the sink's
    /// confirmation removes it from the outbox. `None` when it completed in memory.
    pub outbox: Option<String>,
    /// Requests waiting for it to be confirmed (`persisted` mode, completed in memory).
    pub acks: Vec<Arc<AckGroup>>,
}

/// The parts of one item held in memory by its shard.
#[derive(Debug)]
pub struct Partial {
    /// One optional vector per schema slot.
    pub vectors: Vec<Option<Vec<f32>>>,
    /// Per-slot metadata, kept per part so that the store can merge it like memory does.
    pub metadata: Vec<Option<Metadata>>,
    /// Arrival of the newest part.
    pub received_at: Instant,
    /// Requests waiting for these parts to be durable.
    pub acks: Vec<Arc<AckGroup>>,
    /// A merge of it failed without a clear answer (a timeout): the store may hold its
    /// parts, so it must complete through the store, never in memory alone.
    pub maybe_stored: bool,
}

impl Partial {
    pub fn new(slots: usize, now: Instant) -> Partial {
        Partial {
            vectors: vec![None; slots],
            metadata: vec![None; slots],
            received_at: now,
            acks: Vec::new(),
            maybe_stored: false,
        }
    }

    /// A partial holding every part of a document, to store it again (shutdown).
    pub fn from_document(doc: Document) -> (String, Partial) {
        let slots = doc.vectors.len();
        let mut metadata = vec![None; slots];
        metadata[0] = doc.metadata;
        let partial = Partial {
            vectors: doc.vectors.into_iter().map(|v| (!v.is_empty()).then_some(v)).collect(),
            metadata,
            received_at: doc.received_at,
            acks: doc.acks,
            maybe_stored: false,
        };
        (doc.id, partial)
    }

    /// Sets (or replaces: the newest copy of a part wins) one part. Returns the change in
    /// vector bytes held.
    pub fn apply(&mut self, part: Part) -> isize {
        let added = (part.vector.len() * 4) as isize;
        let old = self.vectors[part.slot].replace(part.vector);
        self.metadata[part.slot] = part.metadata;
        self.received_at = part.received_at;
        self.acks.extend(part.ack);
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
            metadata: merge_metadata(self.metadata),
            completed_at: SystemTime::now(),
            received_at: self.received_at,
            outbox: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
