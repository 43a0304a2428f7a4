//! The data contract: the parts an item is made of ([`Schema`]), the request body clients
//! send ([`ingest`]), a validated part ([`Part`]) and a complete [`Document`].

pub mod ack;
pub mod document;
pub mod ingest;
pub mod stamp;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

use crate::config::PartSettings;

pub use ack::AckGroup;
pub use document::Document;

/// Most parts a document may have (a part set is a `u32` bit mask).
pub const MAX_PARTS: usize = 32;

/// Document fields embedjoin writes itself; metadata and part fields may not use them.
pub const RESERVED_FIELDS: &[&str] = &["id", "completed_at", "incomplete", "missing_parts"];

/// Metadata attached to a part; merged into the top level of the document.
pub type Metadata = Map<String, Value>;

/// The parts that make an item complete, fixed by config. A part is known by its slot,
/// its position in the configured list.
#[derive(Debug, Clone)]
pub struct Schema {
    parts: Vec<PartSettings>,
    slot_by_type: HashMap<String, usize>,
}

impl Schema {
    pub fn new(parts: &[PartSettings]) -> Schema {
        assert!(!parts.is_empty() && parts.len() <= MAX_PARTS, "validated by config");
        let slot_by_type = parts.iter().enumerate().map(|(i, p)| (p.type_name.clone(), i)).collect();
        Schema { parts: parts.to_vec(), slot_by_type }
    }

    /// The slot of a part type, if it is configured.
    pub fn slot_of(&self, type_name: &str) -> Option<usize> {
        self.slot_by_type.get(type_name).copied()
    }

    pub fn part(&self, slot: usize) -> &PartSettings {
        &self.parts[slot]
    }

    pub fn parts(&self) -> &[PartSettings] {
        &self.parts
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The bit mask with every part present.
    pub fn complete_mask(&self) -> u32 {
        if self.parts.len() == 32 {
            u32::MAX
        } else {
            (1u32 << self.parts.len()) - 1
        }
    }

    /// Comma-separated type names, for error messages.
    pub fn type_names(&self) -> String {
        self.parts.iter().map(|p| p.type_name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// One validated part of an item: its vector has the configured dimension and only finite values.
#[derive(Debug, Clone)]
pub struct Part {
    pub id: String,
    /// Position of the part type in the schema.
    pub slot: usize,
    pub vector: Vec<f32>,
    pub metadata: Option<Metadata>,
    /// When ingress accepted it, for part-to-index latency.
    pub received_at: Instant,
    /// Its place among the copies of this part ([`stamp`]): the largest stamp wins.
    pub stamp: u64,
    /// The request waiting for this part to be durable (`persisted` ack mode only).
    pub ack: Option<Arc<AckGroup>>,
}

impl Part {
    pub fn new(id: String, slot: usize, vector: Vec<f32>, metadata: Option<Metadata>) -> Part {
        Part { id, slot, vector, metadata, received_at: Instant::now(), stamp: stamp::next(), ack: None }
    }
}
