//! `GET /documents/{id}`: which parts of an item this service knows of, and where they
//! are, for an operator wondering why a document has not appeared. Never returns vectors.
//!
//! The owning shard is asked first, through its mailbox, so the answer includes every part
//! this instance accepted before the request; the store is read after it, so a partial
//! flushed in between is seen in the store rather than missed. A part held both in memory
//! and in the store is reported as `memory`: that copy is the newer, and it replaces the
//! stored one at the next flush.
//!
//! A completed item is remembered by the store (the stamps of its parts, no vectors) for
//! `state.remember_completed`: `completed_version` says which version was last completed.
//! What is not seen: a document that completed in memory and whose completion the store has
//! not recorded yet (at its shard's next flush), and anything the store no longer
//! remembers. An id with nothing known answers 404.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::model::Schema;

/// Longest the state store may take to answer (as `/ready` allows).
const STORE_WAIT: Duration = Duration::from_secs(2);

/// Where a part is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// In its shard's memory, not yet flushed to the state store.
    Memory,
    /// In the state store: a partial, or the outbox entry of a completed document.
    Store,
}

/// The answer: `{"id", "parts": {type: location}, "missing": [type], "complete",
/// "awaiting_sink"}`.
#[derive(Debug, Serialize)]
pub struct ItemStatus<'a> {
    pub id: String,
    /// The parts present, by type name, in schema order.
    #[serde(serialize_with = "ordered_map")]
    pub parts: Vec<(&'a str, Location)>,
    /// The configured parts not present anywhere.
    pub missing: Vec<&'a str>,
    /// Every configured part is present: the item is a complete document, or becomes one at
    /// its shard's next flush.
    pub complete: bool,
    /// The item completed in the state store and its document waits in the outbox until the
    /// sink confirms it.
    pub awaiting_sink: bool,
    /// The version of the item's last completion, while the store remembers it.
    pub completed_version: Option<u64>,
}

fn ordered_map<S: Serializer>(parts: &[(&str, Location)], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(parts.len()))?;
    for (name, location) in parts {
        map.serialize_entry(name, location)?;
    }
    map.end()
}

pub async fn get(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    // An id ingress would refuse cannot be known; do not send it to the shards or the store.
    let max = state.limits.max_id_bytes;
    if id.is_empty() || id.len() > max || id.chars().any(char::is_control) {
        return Err(unknown(&id));
    }
    let in_memory = tokio::time::timeout(state.durability.enqueue_timeout, state.router.inspect(&id))
        .await
        .map_err(|_| ApiError::Overloaded("shard mailboxes are full"))?
        .map_err(|_| ApiError::ShuttingDown)?
        .unwrap_or(0);
    let stored = tokio::time::timeout(STORE_WAIT, state.store.inspect(&id))
        .await
        .map_err(|_| ApiError::StateUnavailable(format!("no answer within {STORE_WAIT:?}")))?
        .map_err(|e| ApiError::StateUnavailable(e.to_string()))?;
    if in_memory == 0 && stored.partial == 0 && !stored.in_outbox && stored.completed.is_none() {
        return Err(unknown(&id));
    }
    let outbox = if stored.in_outbox { state.schema.complete_mask() } else { 0 };
    let mut status = describe(&state.schema, id, in_memory, stored.partial | outbox, stored.in_outbox);
    status.completed_version = stored.completed;
    Ok(HttpResponse::Ok().json(status))
}

/// The answer for slot masks held in memory and in the store.
fn describe(schema: &Schema, id: String, memory: u32, store: u32, in_outbox: bool) -> ItemStatus<'_> {
    let (mut parts, mut missing) = (Vec::new(), Vec::new());
    for (slot, part) in schema.parts().iter().enumerate() {
        let bit = 1 << slot;
        let name = part.type_name.as_str();
        if memory & bit != 0 {
            parts.push((name, Location::Memory));
        } else if store & bit != 0 {
            parts.push((name, Location::Store));
        } else {
            missing.push(name);
        }
    }
    ItemStatus { id, parts, complete: missing.is_empty(), missing, awaiting_sink: in_outbox, completed_version: None }
}

fn unknown(id: &str) -> ApiError {
    // The id is echoed as JSON (escaped), truncated so that the error stays small.
    let shown: String = id.chars().take(64).collect();
    ApiError::NotFound(format!("nothing is known of item {shown:?}: no part held in memory or in the state store, and no completion remembered (look in the index)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn memory_wins_and_missing_parts_are_listed() {
        let schema = Schema::new(&Settings::defaults().parts);
        let s = describe(&schema, "sku-1".into(), 0b01, 0b01, false);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "sku-1", "parts": {"EMBEDDINGS_TEXT": "memory"},
                "missing": ["EMBEDDINGS_IMAGE"], "complete": false, "awaiting_sink": false,
                "completed_version": null})
        );
        let s = describe(&schema, "sku-1".into(), 0b01, 0b10, false);
        assert!(s.complete && !s.awaiting_sink);
        let s = describe(&schema, "sku-1".into(), 0, 0b11, true);
        assert!(s.complete && s.awaiting_sink && s.missing.is_empty());
    }
}
