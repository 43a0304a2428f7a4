//! The ingest request: `{"embeddings":[{"id","embedding_type","embedding","metadata"?}, ...]}`.
//!
//! Parsing is strict about JSON and lenient about items: malformed JSON fails the whole
//! request, but an item whose fields have the wrong type (a string in a vector, a numeric
//! id, ...) is parsed into a [`RawItem`] that remembers what was wrong, so that validation
//! can reject that item alone and keep the rest of the batch.
//!
//! Two readers give the same [`RawItem`]s: [`decode`], a hand-written scanner that
//! [`parse_batch`] uses because it is about twice as fast, and the serde visitors below
//! ([`parse_batch_serde`]), the reference that tests and benches compare it with.
//!
//! Validation refuses what Elasticsearch would refuse later, so that a document that
//! completes is one the sink takes: a vector it cannot index for the configured similarity
//! (`zero_vector`, `not_unit_length`), metadata keys it reserves or that would land on a
//! vector field (`bad_metadata`), objects nested deeper than its mapping depth limit
//! (`metadata_too_deep`), and metadata over `http.max_metadata_bytes`
//! (`metadata_too_large`). JSON and MessagePack bodies meet the same checks: both become
//! [`RawItem`]s first.

use std::fmt;
use std::time::Instant;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{Metadata, Part, Schema, RESERVED_FIELDS};
use crate::config::{Settings, Similarity};

// A child of this module (though it sits beside it) so that it can build `RawItem`s.
#[path = "decode/mod.rs"]
pub mod decode;

pub use decode::DecodeError;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct IngestRequest {
    pub embeddings: Vec<RawItem>,
}

/// Why an item was rejected; the code is a bounded label, the message says what to fix.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    /// Position of the item in the request.
    pub index: usize,
    /// The item's id, when it had a usable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A stable, machine-readable reason (also the metrics label).
    pub code: &'static str,
    /// What was wrong, for a person.
    pub reason: String,
}

/// An item as parsed, before validation. Each field is `Err` with a description when the
/// JSON value had the wrong type.
#[derive(Debug, Default)]
pub struct RawItem {
    id: Option<Result<String, String>>,
    embedding_type: Option<Result<String, String>>,
    embedding: Option<Result<Vec<f32>, String>>,
    metadata: Option<Result<Metadata, String>>,
}

/// Limits applied while validating items.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_id_bytes: usize,
    /// The index's similarity: `cosine` refuses zero vectors, `dot_product` non-unit ones.
    pub similarity: Similarity,
    /// Largest metadata of one item, as serialized JSON.
    pub max_metadata_bytes: usize,
}

impl Limits {
    pub fn from_settings(settings: &Settings) -> Limits {
        Limits {
            max_id_bytes: settings.http.max_id_bytes,
            similarity: settings.elasticsearch.similarity,
            max_metadata_bytes: settings.http.max_metadata_bytes,
        }
    }
}

/// Elasticsearch's `index.mapping.depth.limit` (default 20): objects nested deeper fail the
/// document. The document root (where metadata is merged) counts as 1; arrays do not count.
pub const METADATA_MAX_OBJECT_DEPTH: usize = 20;

/// Elasticsearch's tolerance on the squared magnitude of a `dot_product` vector (8.x before
/// 8.15 used 1e-4, later versions 1e-3: the stricter one holds for every version).
const UNIT_LENGTH_TOLERANCE: f32 = 1e-4;

impl RawItem {
    /// Checks the item against the schema and turns it into a [`Part`].
    pub fn validate(self, index: usize, schema: &Schema, limits: Limits, now: Instant) -> Result<Part, Rejection> {
        let reject = |id: Option<&str>, code: &'static str, reason: String| Rejection {
            index,
            id: id.map(str::to_owned),
            code,
            reason,
        };
        let id = match self.id {
            None => return Err(reject(None, "missing_id", "`id` is required".into())),
            Some(Err(what)) => return Err(reject(None, "bad_id", format!("`id` must be a string, got {what}"))),
            Some(Ok(id)) => id,
        };
        if id.is_empty() {
            return Err(reject(None, "bad_id", "`id` must not be empty".into()));
        }
        if id.len() > limits.max_id_bytes {
            let reason = format!("`id` is {} bytes; at most {} are allowed", id.len(), limits.max_id_bytes);
            return Err(reject(None, "id_too_long", reason));
        }
        if id.chars().any(char::is_control) {
            return Err(reject(Some(&id), "bad_id", "`id` must not contain control characters".into()));
        }
        let type_name = match self.embedding_type {
            None => return Err(reject(Some(&id), "missing_type", "`embedding_type` is required".into())),
            Some(Err(what)) => {
                let reason = format!("`embedding_type` must be a string, got {what}");
                return Err(reject(Some(&id), "unknown_type", reason));
            }
            Some(Ok(t)) => t,
        };
        let Some(slot) = schema.slot_of(&type_name) else {
            let reason = format!("unknown `embedding_type` {type_name:?}; expected one of: {}", schema.type_names());
            return Err(reject(Some(&id), "unknown_type", reason));
        };
        let vector = match self.embedding {
            None => return Err(reject(Some(&id), "missing_embedding", "`embedding` is required".into())),
            Some(Err(what)) => return Err(reject(Some(&id), "not_a_number", what)),
            Some(Ok(v)) => v,
        };
        let dims = schema.part(slot).dims;
        if vector.len() != dims {
            let reason = format!("{type_name} expects {dims} values, got {}", vector.len());
            return Err(reject(Some(&id), "wrong_dims", reason));
        }
        if let Some(at) = vector.iter().position(|x| !x.is_finite()) {
            let reason = format!("`embedding[{at}]` is not a finite 32-bit float");
            return Err(reject(Some(&id), "non_finite", reason));
        }
        if let Err((code, reason)) = check_magnitude(&vector, limits.similarity) {
            return Err(reject(Some(&id), code, reason));
        }
        let metadata = match self.metadata {
            None => None,
            Some(Err(what)) => {
                let reason = format!("`metadata` must be an object, got {what}");
                return Err(reject(Some(&id), "bad_metadata", reason));
            }
            Some(Ok(m)) => {
                if let Err((code, reason)) = check_metadata(&m, schema, limits) {
                    return Err(reject(Some(&id), code, reason));
                }
                Some(m)
            }
        };
        Ok(Part { id, slot, vector, metadata, received_at: now, stamp: super::stamp::next(), ack: None })
    }
}

/// What Elasticsearch checks of a float vector's squared magnitude, computed as it does (in
/// f32, in order), so that values that underflow in f32 count as zero.
fn check_magnitude(vector: &[f32], similarity: Similarity) -> Result<(), (&'static str, String)> {
    let squared = vector.iter().fold(0f32, |sum, x| sum + x * x);
    if !squared.is_finite() {
        let reason = "the vector's squared magnitude overflows a 32-bit float".to_owned();
        return Err(("non_finite", reason));
    }
    match similarity {
        Similarity::Cosine if squared == 0.0 => {
            let reason = "the `cosine` similarity cannot index a vector of zero magnitude (every value is 0, \
                          or too small to square in a 32-bit float)";
            Err(("zero_vector", reason.to_owned()))
        }
        Similarity::DotProduct if (squared - 1.0).abs() > UNIT_LENGTH_TOLERANCE => {
            let reason = format!(
                "the `dot_product` similarity needs unit-length vectors; this one's squared length is {squared} \
                 (allowed: 1 ± {UNIT_LENGTH_TOLERANCE})"
            );
            Err(("not_unit_length", reason))
        }
        _ => Ok(()),
    }
}

/// Metadata Elasticsearch would refuse, or that would overwrite a field embedjoin writes.
fn check_metadata(m: &Metadata, schema: &Schema, limits: Limits) -> Result<(), (&'static str, String)> {
    let bad = |reason: String| Err(("bad_metadata", reason));
    let ours = |name: &str| RESERVED_FIELDS.contains(&name) || schema.parts().iter().any(|p| p.field == name);
    for key in m.keys() {
        if key.starts_with('_') {
            return bad(format!(
                "`metadata` key {key:?} starts with `_`, which Elasticsearch reserves for its metadata fields"
            ));
        }
        // `a.b` is the field `b` inside the object `a`: `text_embedding.x` would land in the vector.
        let first = key.split('.').next().unwrap_or_default();
        if ours(first) {
            return bad(format!("`metadata` key {key:?} names the field {first:?}, which embedjoin writes itself"));
        }
    }
    if let Some(reason) = bad_key(m) {
        return bad(reason);
    }
    if object_depth(m, METADATA_MAX_OBJECT_DEPTH) > METADATA_MAX_OBJECT_DEPTH {
        let reason = format!(
            "`metadata` nests objects more than {METADATA_MAX_OBJECT_DEPTH} levels deep (Elasticsearch's mapping depth limit)"
        );
        return Err(("metadata_too_deep", reason));
    }
    let mut size = SizeLimit { written: 0, limit: limits.max_metadata_bytes };
    if serde_json::to_writer(&mut size, m).is_err() {
        let reason = format!("`metadata` is over {} bytes as JSON", limits.max_metadata_bytes);
        return Err(("metadata_too_large", reason));
    }
    Ok(())
}

/// The first key, at any depth, that Elasticsearch refuses as a field name: empty, blank,
/// or with an empty segment around a dot.
fn bad_key(m: &Metadata) -> Option<String> {
    use serde_json::Value;
    let (mut maps, mut values): (Vec<&Metadata>, Vec<&Value>) = (vec![m], Vec::new());
    while let Some(map) = maps.pop() {
        for (key, value) in map {
            if key.trim().is_empty() {
                return Some(format!("`metadata` key {key:?} is empty or blank; Elasticsearch needs a field name"));
            }
            if key.split('.').any(str::is_empty) {
                return Some(format!(
                    "`metadata` key {key:?} has an empty part around a `.`; Elasticsearch cannot resolve the object path"
                ));
            }
            values.push(value);
        }
        while let Some(value) = values.pop() {
            match value {
                Value::Object(inner) => maps.push(inner),
                Value::Array(items) => values.extend(items),
                _ => {}
            }
        }
    }
    None
}

/// Depth of the deepest object in `m`, `m` counting as 1 and arrays as nothing; stops
/// counting past `limit` (so a hostile nesting costs no more than `limit` levels).
fn object_depth(m: &Metadata, limit: usize) -> usize {
    fn value_depth(v: &serde_json::Value, budget: usize) -> usize {
        match v {
            serde_json::Value::Object(m) => object_depth(m, budget),
            serde_json::Value::Array(items) => items.iter().map(|x| value_depth(x, budget)).max().unwrap_or(0),
            _ => 0,
        }
    }
    if limit == 0 {
        return 1;
    }
    1 + m.values().map(|v| value_depth(v, limit - 1)).max().unwrap_or(0)
}

/// A writer that only counts, and fails once past its limit (which ends serializing early).
struct SizeLimit {
    written: usize,
    limit: usize,
}

impl std::io::Write for SizeLimit {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len();
        if self.written > self.limit {
            return Err(std::io::Error::other("over the limit"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'de> Deserialize<'de> for RawItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = RawItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an embedding object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawItem, A::Error> {
                let mut item = RawItem::default();
                while let Some(key) = map.next_key::<KeyName>()? {
                    match key {
                        KeyName::Id => item.id = Some(map.next_value::<Lenient<LString>>()?.0.map(|s| s.0)),
                        KeyName::Type => {
                            item.embedding_type = Some(map.next_value::<Lenient<LString>>()?.0.map(|s| s.0))
                        }
                        KeyName::Embedding => item.embedding = Some(map.next_value::<LenientVector>()?.0),
                        KeyName::Metadata => {
                            let meta = map.next_value::<Lenient<LObject>>()?.0;
                            // `"metadata": null` means no metadata.
                            item.metadata = match meta {
                                Err(ref what) if what == "null" => None,
                                other => Some(other.map(|o| o.0)),
                            };
                        }
                        KeyName::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(item)
            }
        }
        deserializer.deserialize_map(ItemVisitor)
    }
}

/// The keys of an item; unknown keys are ignored, like the seed service did.
enum KeyName {
    Id,
    Type,
    Embedding,
    Metadata,
    Other,
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = KeyName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyName, E> {
                Ok(match v {
                    "id" => KeyName::Id,
                    "embedding_type" => KeyName::Type,
                    "embedding" => KeyName::Embedding,
                    "metadata" => KeyName::Metadata,
                    _ => KeyName::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

/// Which JSON type a lenient field wants.
trait Wanted: Sized {
    fn from_str(s: String) -> Option<Self> {
        let _ = s;
        None
    }
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        drop_map(map)?;
        Ok(None)
    }
}

struct LString(String);
impl Wanted for LString {
    fn from_str(s: String) -> Option<Self> {
        Some(LString(s))
    }
}

struct LObject(Metadata);
impl Wanted for LObject {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        let value = Metadata::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Some(LObject(value)))
    }
}

fn drop_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drop_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A field that accepts any JSON value and records a description when it has the wrong type.
struct Lenient<T>(Result<T, String>);

impl<'de, T: Wanted> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Wanted> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                self.visit_string(v.to_owned())
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_str(v).ok_or_else(|| "a string".to_owned())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(Err("a boolean".to_owned())))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(Err("a number".to_owned())))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient(Err("a number".to_owned())))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(Err("a number".to_owned())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient(Err("null".to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drop_seq(seq)?;
                Ok(Lenient(Err("an array".to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(Lenient(T::from_map(map)?.ok_or_else(|| "an object".to_owned())))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A vector decoded straight into `f32`s; any element that is not a number is recorded.
struct LenientVector(Result<Vec<f32>, String>);

impl<'de> Deserialize<'de> for LenientVector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LenientVector;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of numbers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LenientVector, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(512).min(4096));
                let mut bad: Option<(usize, &'static str)> = None;
                while let Some(x) = seq.next_element::<Number>()? {
                    match x {
                        Number::Ok(v) => out.push(v as f32),
                        Number::Not(what) => {
                            bad.get_or_insert((out.len(), what));
                            out.push(0.0);
                        }
                    }
                }
                Ok(LenientVector(match bad {
                    None => Ok(out),
                    Some((at, what)) => Err(format!("`embedding[{at}]` is {what}, not a number")),
                }))
            }
            /// Binary formats (MessagePack `bin`): little-endian f32s, decoded by a copy.
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<LenientVector, E> {
                if !v.len().is_multiple_of(4) {
                    let reason = format!(
                        "`embedding` bytes must be little-endian f32s; {} bytes is not a multiple of 4",
                        v.len()
                    );
                    return Ok(LenientVector(Err(reason)));
                }
                Ok(LenientVector(Ok(v.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LenientVector, A::Error> {
                drop_map(map)?;
                Ok(LenientVector(Err("`embedding` must be an array of numbers, got an object".into())))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LenientVector, E> {
                Ok(LenientVector(Err("`embedding` must be an array of numbers, got a string".into())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LenientVector, E> {
                Ok(LenientVector(Err("`embedding` must be an array of numbers, got a boolean".into())))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<LenientVector, E> {
                Ok(LenientVector(Err("`embedding` must be an array of numbers, got a number".into())))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<LenientVector, E> {
                Ok(LenientVector(Err("`embedding` must be an array of numbers, got a number".into())))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<LenientVector, E> {
                Ok(LenientVector(Err("`embedding` must be an array of numbers, got a number".into())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<LenientVector, E> {
                Ok(LenientVector(Err("`embedding` must be an array of numbers, got null".into())))
            }
        }
        d.deserialize_any(V)
    }
}

/// One vector element: a number, or a description of what it was instead.
enum Number {
    Ok(f64),
    Not(&'static str),
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number::Ok(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number::Ok(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(Number::Ok(v as f64))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Number, E> {
                Ok(Number::Not("a string"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Number, E> {
                Ok(Number::Not("a boolean"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Number, E> {
                Ok(Number::Not("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Number, A::Error> {
                drop_seq(seq)?;
                Ok(Number::Not("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Number, A::Error> {
                drop_map(map)?;
                Ok(Number::Not("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses and validates a request body: `Err` only when the JSON itself is unusable.
pub fn parse_batch(body: &[u8], schema: &Schema, limits: Limits) -> Result<(Vec<Part>, Vec<Rejection>), DecodeError> {
    let items = decode::decode_items(body, schema)?;
    Ok(validate_all(items, schema, limits))
}

/// Parses a MessagePack body of the same shape as the JSON one, where an `embedding` may
/// also be a `bin` of little-endian f32s (numpy's `astype('<f4').tobytes()`): decoding it
/// costs a copy.
pub fn parse_batch_msgpack(
    body: &[u8],
    schema: &Schema,
    limits: Limits,
) -> Result<(Vec<Part>, Vec<Rejection>), rmp_serde::decode::Error> {
    let request: IngestRequest = rmp_serde::from_slice(body)?;
    Ok(validate_all(request.embeddings, schema, limits))
}

/// [`parse_batch`] through serde_json and the visitors above: the reference the fast
/// decoder is tested and benchmarked against.
pub fn parse_batch_serde(
    body: &[u8],
    schema: &Schema,
    limits: Limits,
) -> Result<(Vec<Part>, Vec<Rejection>), serde_json::Error> {
    let request: IngestRequest = serde_json::from_slice(body)?;
    Ok(validate_all(request.embeddings, schema, limits))
}

fn validate_all(items: Vec<RawItem>, schema: &Schema, limits: Limits) -> (Vec<Part>, Vec<Rejection>) {
    let now = Instant::now();
    let mut parts = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    for (index, raw) in items.into_iter().enumerate() {
        match raw.validate(index, schema, limits, now) {
            Ok(part) => parts.push(part),
            Err(rejection) => rejected.push(rejection),
        }
    }
    (parts, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PartSettings;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::new(&[
            PartSettings { type_name: "T".into(), field: "t".into(), dims: 3 },
            PartSettings { type_name: "I".into(), field: "i".into(), dims: 2 },
        ])
    }

    const LIMITS: Limits = Limits { max_id_bytes: 8, similarity: Similarity::L2Norm, max_metadata_bytes: 64 };

    fn parse(v: serde_json::Value) -> (Vec<Part>, Vec<Rejection>) {
        parse_batch(v.to_string().as_bytes(), &schema(), LIMITS).unwrap()
    }

    #[test]
    fn valid_items_become_parts() {
        let (parts, rejected) = parse(json!({"embeddings": [
            {"id": "a", "embedding_type": "T", "embedding": [1, 2.5, -3e-2], "extra": {"x": [1]}},
            {"id": "a", "embedding_type": "I", "embedding": [0.1, 0.2], "metadata": {"lang": "en"}},
        ]}));
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(parts[0].vector, vec![1.0, 2.5, -0.03]);
        assert_eq!(parts[1].slot, 1);
        assert_eq!(parts[1].metadata.as_ref().unwrap()["lang"], "en");
    }

    #[test]
    fn each_bad_item_is_rejected_by_index_and_the_rest_kept() {
        let (parts, rejected) = parse(json!({"embeddings": [
            {"id": "ok", "embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": "x", "embedding_type": "AUDIO", "embedding": [1, 2, 3]},
            {"id": "x", "embedding_type": "T", "embedding": [1, 2]},
            {"id": "x", "embedding_type": "T", "embedding": [1, "2", 3]},
            {"id": "", "embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": "123456789", "embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": 7, "embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": "x", "embedding_type": "T", "embedding": [1, 2, 1e39]},
            {"id": "x", "embedding_type": "T", "embedding": [1, 2, 3], "metadata": {"id": "no"}},
            {"embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": "x", "embedding_type": "T", "embedding": "1,2,3"},
        ]}));
        assert_eq!(parts.len(), 1);
        let codes: Vec<_> = rejected.iter().map(|r| (r.index, r.code)).collect();
        assert_eq!(
            codes,
            vec![
                (1, "unknown_type"),
                (2, "wrong_dims"),
                (3, "not_a_number"),
                (4, "bad_id"),
                (5, "id_too_long"),
                (6, "bad_id"),
                (7, "non_finite"),
                (8, "bad_metadata"),
                (9, "missing_id"),
                (10, "not_a_number"),
            ]
        );
        assert!(rejected[2].reason.contains("embedding[1]"), "{}", rejected[2].reason);
    }

    fn codes_with(limits: Limits, items: Vec<serde_json::Value>) -> Vec<(usize, &'static str)> {
        let body = json!({ "embeddings": items }).to_string();
        let (parts, rejected) = parse_batch(body.as_bytes(), &schema(), limits).unwrap();
        let msgpack = rmp_serde::to_vec_named(&json!({ "embeddings": items })).unwrap();
        let (mparts, mrejected) = parse_batch_msgpack(&msgpack, &schema(), limits).unwrap();
        assert_eq!(rejected, mrejected, "JSON and MessagePack meet the same checks");
        assert_eq!(parts.len(), mparts.len());
        rejected.iter().map(|r| (r.index, r.code)).collect()
    }

    #[test]
    fn vectors_the_similarity_cannot_index_are_rejected() {
        let cosine = Limits { similarity: Similarity::Cosine, ..LIMITS };
        let item = |v: serde_json::Value| json!({"id": "a", "embedding_type": "I", "embedding": v});
        let codes = codes_with(
            cosine,
            vec![
                item(json!([0.0, -0.0])),
                item(json!([1e-50, 0])),     // rounds to 0 in f32
                item(json!([1e-30, 1e-30])), // squares underflow in f32, as in Elasticsearch
                item(json!([3e19, 3e19])),   // squares overflow
                item(json!([1e-10, 0])),
                item(json!([0.6, 0.8])),
            ],
        );
        assert_eq!(codes, vec![(0, "zero_vector"), (1, "zero_vector"), (2, "zero_vector"), (3, "non_finite")]);

        let dot = Limits { similarity: Similarity::DotProduct, ..LIMITS };
        let codes = codes_with(
            dot,
            vec![item(json!([0.6, 0.8])), item(json!([0.6, 0.81])), item(json!([0, 0])), item(json!([0.600001, 0.8]))],
        );
        assert_eq!(codes, vec![(1, "not_unit_length"), (2, "not_unit_length")]);
        assert!(codes_with(LIMITS, vec![item(json!([0, 0])), item(json!([5, 5]))]).is_empty(), "l2_norm takes any");
    }

    #[test]
    fn metadata_elasticsearch_would_refuse_is_rejected() {
        let item = |m: serde_json::Value| json!({"id": "a", "embedding_type": "I", "embedding": [1, 2], "metadata": m});
        let deep = |levels: usize| {
            let mut m = json!(1);
            for _ in 0..levels {
                m = json!({ "k": [m] });
            }
            m
        };
        let items = vec![
            item(json!({"_id": "x"})),
            item(json!({"_source": {}})),
            item(json!({"_anything": 1})),
            item(json!({"": 1})),
            item(json!({"a": {" ": 1}})),
            item(json!({"t.x": 1})),
            item(json!({"i": 1})),
            item(json!({"a..b": 1})),
            item(json!({"a.": 1})),
            item(json!({"id.x": 1})),
            item(deep(21)),
            item(json!({"big": "x".repeat(1000)})),
            item(json!({"ok.dotted": {"_inner": [1, {"deep": null}]}, "t_x": "", "under_score": 1})),
            item(deep(20)),
        ];
        assert_eq!(
            codes_with(Limits { max_metadata_bytes: 1000, ..LIMITS }, items),
            vec![
                (0, "bad_metadata"),
                (1, "bad_metadata"),
                (2, "bad_metadata"),
                (3, "bad_metadata"),
                (4, "bad_metadata"),
                (5, "bad_metadata"),
                (6, "bad_metadata"),
                (7, "bad_metadata"),
                (8, "bad_metadata"),
                (9, "bad_metadata"),
                (10, "metadata_too_deep"),
                (11, "metadata_too_large"),
            ]
        );
        let (_, rejected) = parse(json!({"embeddings": [item(json!({"t.x": 1}))]}));
        assert!(
            rejected[0].reason.contains("\"t.x\"") && rejected[0].reason.contains("\"t\""),
            "{}",
            rejected[0].reason
        );
    }

    #[test]
    fn msgpack_bodies_take_vectors_as_little_endian_bytes_or_arrays() {
        #[derive(serde::Serialize)]
        struct Item<'a> {
            id: &'a str,
            embedding_type: &'a str,
            #[serde(with = "serde_bytes_le")]
            embedding: Vec<f32>,
        }
        mod serde_bytes_le {
            pub fn serialize<S: serde::Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                s.serialize_bytes(&bytes)
            }
        }
        let body = rmp_serde::to_vec_named(&serde_json::json!({"embeddings": [
            {"id": "a", "embedding_type": "I", "embedding": [0.5, -1.0]},
        ]}))
        .unwrap();
        let (parts, rejected) = parse_batch_msgpack(&body, &schema(), LIMITS).unwrap();
        assert!(rejected.is_empty());
        assert_eq!(parts[0].vector, vec![0.5, -1.0]);

        #[derive(serde::Serialize)]
        struct Body<'a> {
            embeddings: Vec<Item<'a>>,
        }
        let items = vec![
            Item { id: "a", embedding_type: "T", embedding: vec![0.1, f32::MIN_POSITIVE, -3.5] },
            Item { id: "b", embedding_type: "T", embedding: vec![1.0] },
        ];
        let body = rmp_serde::to_vec_named(&Body { embeddings: items }).unwrap();
        let (parts, rejected) = parse_batch_msgpack(&body, &schema(), LIMITS).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].vector, vec![0.1, f32::MIN_POSITIVE, -3.5], "bit-exact");
        assert_eq!((rejected[0].index, rejected[0].code), (1, "wrong_dims"));
        let mut odd = rmp_serde::to_vec_named(&Body { embeddings: vec![] }).unwrap();
        odd.truncate(odd.len() - 1);
        assert!(parse_batch_msgpack(&odd, &schema(), LIMITS).is_err(), "truncated body");
    }

    #[test]
    fn malformed_json_fails_the_request() {
        let limits = LIMITS;
        assert!(parse_batch(b"{\"embeddings\": [", &schema(), limits).is_err());
        assert!(parse_batch(b"{\"items\": []}", &schema(), limits).is_err());
        assert!(parse_batch(b"[1,2]", &schema(), limits).is_err());
    }
}
