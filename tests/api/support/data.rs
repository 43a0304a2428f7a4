//! Generated items whose vectors are known, so tests can check every stored value.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

pub const TEXT: &str = "EMBEDDINGS_TEXT";
pub const IMAGE: &str = "EMBEDDINGS_IMAGE";

/// The vector of (id, part): derived from both, so any mix-up shows.
pub fn vector(id: &str, part: &str, dims: usize, version: u32) -> Vec<f32> {
    let seed = id.bytes().chain(part.bytes()).fold(version as u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut rng = StdRng::seed_from_u64(seed);
    (0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

pub fn item(id: &str, part: &str, dims: usize) -> Value {
    json!({"id": id, "embedding_type": part, "embedding": vector(id, part, dims, 0)})
}

pub fn batch(items: Vec<Value>) -> Value {
    json!({ "embeddings": items })
}

/// Reads a stored vector back as f32s.
pub fn stored_vector(source: &Value, field: &str) -> Vec<f32> {
    source[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} missing in {source}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}
