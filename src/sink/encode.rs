//! Encodes documents as `_bulk` NDJSON, each straight into the request buffer. The action
//! decides how a write meets what the index holds ([`Action`]); every source line carries
//! `_parts`, the stamp of each part it holds, which the guarded update compares.
//!
//! - `index` with the document's version as an external version (`external_gte`: the same
//!   completion again is applied, an older one is refused with a 409, so the index never
//!   goes back). Used with `state.late_parts = "new_item"`.
//! - `create`, then, if the id exists, the guarded `update` ([`MERGE_SCRIPT`]): each part
//!   is written only if it is newer than the one indexed. Used with `late_parts = "update"`,
//!   where a document may change one part at a time.

use std::io::Write;
use std::ops::Range;

use bytes::BytesMut;

use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use base64::Engine;

pub use crate::config::VectorEncoding;
use crate::model::document::rfc3339;
use crate::model::{Document, Schema};

/// How one document is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `index` with `version_type=external_gte`: the newer completion replaces the document.
    Index,
    /// `create`: only if the id is not indexed yet (a 409 then turns it into a `Merge`).
    Create,
    /// `update` with [`MERGE_SCRIPT`]: each of its parts only if newer than the indexed one;
    /// `noop` when none is. A 404 (`document_missing_exception`) means no document yet.
    Merge,
    /// `Merge` that creates the document when there is none (`scripted_upsert`): one action
    /// that gives the same result whatever the index holds, for files loaded later.
    Upsert,
}

/// The guarded partial update (painless, the same in Elasticsearch and OpenSearch). Its
/// params: `d`, the document's source as [`encode_op`] writes it, and `fields`, part type
/// to vector field. Per part in `d._parts` newer than the indexed `_parts` entry (or with
/// none), the vector field and the stamp are written; a part it completes leaves
/// `missing_parts` (and `incomplete` goes with the last one). When some part was written,
/// the document's other fields (metadata, `completed_at`) are written too, and when every
/// configured part was, `d` replaces the document as it is (as a newer completion does).
/// When none was, the update is a `noop`: it changes nothing, whatever order updates
/// arrive in. A new document (`Upsert` of an id not indexed) is `d`, markers included.
pub const MERGE_SCRIPT: &str = "def src = ctx._source; def d = params.d; def fields = params.fields; \
boolean fresh = src.isEmpty(); def have = src._parts; if (have == null) { have = new HashMap(); } int applied = 0; \
for (def t : d._parts.keySet()) { def s = d._parts.get(t); def h = have.get(t); \
if (h == null || h < s) { def f = fields.get(t); src.put(f, d.get(f)); have.put(t, s); applied++; \
if (src.missing_parts instanceof List) { src.missing_parts.removeIf(x -> x == t); } } } \
if (fresh || applied == fields.size()) { src.clear(); src.putAll(d); } \
else if (applied > 0) { src._parts = have; \
if (src.missing_parts instanceof List && src.missing_parts.isEmpty()) { src.remove('missing_parts'); src.remove('incomplete'); } \
for (def k : d.keySet()) { \
if (!fields.containsValue(k) && k != '_parts' && k != 'incomplete' && k != 'missing_parts') { src.put(k, d.get(k)); } } \
} else { ctx.op = 'noop'; }";

/// Appends one operation (action line and body line, each ending in `\n`). Returns the
/// byte range of the document's source inside `buf` (inside the script's params for a
/// `Merge`).
pub fn encode_op(
    buf: &mut BytesMut,
    doc: &Document,
    schema: &Schema,
    vectors: VectorEncoding,
    action: Action,
) -> Range<usize> {
    let mut w = Writer(buf);
    action_line(&mut w, &doc.id, doc.version(), action);
    if matches!(action, Action::Merge | Action::Upsert) {
        merge_head(&mut w, schema, action);
    }
    let start = w.0.len();
    w.raw(b"{\"id\":");
    w.json_str(&doc.id);
    for (slot, vector) in doc.vectors.iter().enumerate() {
        if vector.is_empty() {
            continue; // a missing part of an incomplete document, or one an update leaves
        }
        w.raw(b",\"");
        w.raw(schema.part(slot).field.as_bytes()); // validated: a plain name, no escaping needed
        match vectors {
            VectorEncoding::Array => {
                w.raw(b"\":");
                float_array(w.0, vector);
            }
            VectorEncoding::Base64 => {
                w.raw(b"\":\"");
                let big_endian: Vec<u8> = vector.iter().flat_map(|x| x.to_be_bytes()).collect();
                let start = w.0.len();
                w.0.resize(start + base64::encoded_len(big_endian.len(), true).expect("small"), 0);
                let written = BASE64_STANDARD.encode_slice(&big_endian, &mut w.0[start..]).expect("sized above");
                w.0.truncate(start + written);
                w.raw(b"\"");
            }
        }
    }
    w.raw(b",\"_parts\":{");
    let present = doc.vectors.iter().enumerate().filter(|(_, v)| !v.is_empty());
    for (i, (slot, _)) in present.enumerate() {
        if i > 0 {
            w.raw(b",");
        }
        w.json_str(&schema.part(slot).type_name);
        w.raw(b":");
        w.raw(itoa::Buffer::new().format(doc.stamps[slot]).as_bytes());
    }
    w.raw(b"}");
    if !doc.update && doc.vectors.iter().any(Vec::is_empty) {
        w.raw(b",\"incomplete\":true,\"missing_parts\":[");
        let missing = doc.vectors.iter().enumerate().filter(|(_, v)| v.is_empty());
        for (i, (slot, _)) in missing.enumerate() {
            if i > 0 {
                w.raw(b",");
            }
            w.json_str(&schema.part(slot).type_name);
        }
        w.raw(b"]");
    }
    w.raw(b",\"completed_at\":\"");
    w.raw(rfc3339(doc.completed_at).as_bytes());
    w.raw(b"\"");
    if let Some(meta) = &doc.metadata {
        for (key, value) in meta {
            w.raw(b",");
            w.json_str(key);
            w.raw(b":");
            serde_json::to_writer(&mut w, value).expect("writing to memory cannot fail");
        }
    }
    w.raw(b"}");
    let end = w.0.len();
    if matches!(action, Action::Merge | Action::Upsert) {
        w.raw(b"}}}");
    }
    w.raw(b"\n");
    start..end
}

/// The same document as another action, around its already encoded source (no vector is
/// formatted again): a `create` refused because the id exists becomes a `Merge`, a `Merge`
/// that found no document becomes a `create`.
pub fn reencode(
    id: &str,
    version: u64,
    source: &[u8],
    schema: &Schema,
    action: Action,
) -> (bytes::Bytes, Range<usize>) {
    let mut buf = BytesMut::with_capacity(source.len() + MERGE_SCRIPT.len() + 256);
    let mut w = Writer(&mut buf);
    action_line(&mut w, id, version, action);
    if matches!(action, Action::Merge | Action::Upsert) {
        merge_head(&mut w, schema, action);
    }
    let start = w.0.len();
    w.raw(source);
    let end = w.0.len();
    if matches!(action, Action::Merge | Action::Upsert) {
        w.raw(b"}}}");
    }
    w.raw(b"\n");
    (buf.freeze(), start..end)
}

fn action_line(w: &mut Writer, id: &str, version: u64, action: Action) {
    match action {
        Action::Index => {
            w.raw(b"{\"index\":{\"_id\":");
            w.json_str(id);
            w.raw(b",\"version\":");
            w.raw(itoa::Buffer::new().format(version).as_bytes());
            w.raw(b",\"version_type\":\"external_gte\"}}\n");
        }
        Action::Create => {
            w.raw(b"{\"create\":{\"_id\":");
            w.json_str(id);
            w.raw(b"}}\n");
        }
        Action::Merge | Action::Upsert => {
            w.raw(b"{\"update\":{\"_id\":");
            w.json_str(id);
            w.raw(b",\"retry_on_conflict\":5}}\n");
        }
    }
}

/// The update body up to where the document goes: `{"script":{...,"params":{...,"d":`.
fn merge_head(w: &mut Writer, schema: &Schema, action: Action) {
    if action == Action::Upsert {
        w.raw(b"{\"scripted_upsert\":true,\"upsert\":{},\"script\":{\"lang\":\"painless\",\"source\":");
    } else {
        w.raw(b"{\"script\":{\"lang\":\"painless\",\"source\":");
    }
    w.json_str(MERGE_SCRIPT);
    w.raw(b",\"params\":{\"fields\":{");
    for (i, part) in schema.parts().iter().enumerate() {
        if i > 0 {
            w.raw(b",");
        }
        w.json_str(&part.type_name);
        w.raw(b":");
        w.json_str(&part.field);
    }
    w.raw(b"},\"d\":");
}

/// Writes `vector` as a JSON array of shortest round-trip decimals (ryu), straight into
/// `buf`: no intermediate string and no copy call per value (7% fewer instructions in split
/// order; BENCHMARKS.md, "Floats written in place, and the allocator").
/// The values are finite (validated at ingress).
fn float_array(buf: &mut BytesMut, vector: &[f32]) {
    // ryu writes at most 16 bytes for an f32; one more for the separator.
    const MAX_VALUE: usize = 16 + 1;
    buf.reserve(2 + MAX_VALUE * vector.len());
    let start = buf.len();
    let out = buf.spare_capacity_mut().as_mut_ptr().cast::<u8>();
    let mut n = 0;
    // SAFETY: `reserve` made room for `2 + MAX_VALUE * len` bytes past `start`, and this
    // writes at most that many: `[`, then per value a `,` and at most 16 bytes from
    // `ryu::raw::format32` (its documented bound), then `]`. `set_len` covers only the
    // bytes written, all initialised here.
    unsafe {
        *out = b'[';
        n += 1;
        for (i, x) in vector.iter().enumerate() {
            if i > 0 {
                *out.add(n) = b',';
                n += 1;
            }
            n += ryu::raw::format32(*x, out.add(n));
        }
        *out.add(n) = b']';
        n += 1;
        buf.set_len(start + n);
    }
}

struct Writer<'a>(&'a mut BytesMut);

impl Writer<'_> {
    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn json_str(&mut self, s: &str) {
        serde_json::to_writer(&mut *self, s).expect("writing to memory cannot fail");
    }
}

impl Write for Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PartSettings;
    use std::time::{Instant, SystemTime};

    fn doc(id: &str, vectors: Vec<Vec<f32>>, metadata: Option<crate::model::Metadata>) -> Document {
        let n = vectors.len();
        Document {
            id: id.into(),
            vectors,
            metadata,
            stamps: vec![7; n],
            completed_at: SystemTime::UNIX_EPOCH,
            received_at: Instant::now(),
            origin: crate::model::document::Origin::Memory,
            orphan: None,
            update: false,
            acks: Vec::new(),
        }
    }

    #[test]
    fn a_document_with_missing_parts_is_marked_incomplete() {
        let schema = Schema::new(&[
            PartSettings { type_name: "T".into(), field: "t".into(), dims: 1 },
            PartSettings { type_name: "I".into(), field: "i".into(), dims: 1 },
        ]);
        let doc = doc("o", vec![vec![0.5], vec![]], None);
        let mut buf = BytesMut::new();
        let source = encode_op(&mut buf, &doc, &schema, VectorEncoding::Array, Action::Index);
        let src: serde_json::Value = serde_json::from_slice(&buf[source]).unwrap();
        assert_eq!(src["t"][0], 0.5);
        assert!(src.get("i").is_none());
        assert_eq!(src["incomplete"], true);
        assert_eq!(src["missing_parts"], serde_json::json!(["I"]));
    }

    /// The bulk body's floats read back, correctly rounded, as the very `f32`s indexed:
    /// random bit patterns of every magnitude, and the edges (signed zeros, subnormals,
    /// the largest finite values, powers of two and ten).
    #[test]
    fn array_vectors_round_trip_to_the_same_f32_bits() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x007f_ffff),
            f32::MAX,
            f32::MIN,
            f32::EPSILON,
            1.0,
            0.1,
            1e-7,
            16777216.0,
            16777217.0,
            3.4e38,
            1e-45,
        ];
        values.extend((0..20_000).map(|_| f32::from_bits(rng.random::<u32>())).filter(|x| x.is_finite()));
        values.extend((0..20_000).map(|_| rng.random_range(-1.0f32..1.0)));
        let schema = Schema::new(&[PartSettings { type_name: "T".into(), field: "v".into(), dims: values.len() }]);
        let mut buf = BytesMut::new();
        let source =
            encode_op(&mut buf, &doc("r", vec![values.clone()], None), &schema, VectorEncoding::Array, Action::Index);
        let text = std::str::from_utf8(&buf[source]).unwrap();
        let array = &text[text.find("\"v\":[").unwrap() + 5..];
        let array = &array[..array.find(']').unwrap()];
        let mut floats = ryu::Buffer::new();
        let shortest: Vec<String> = values.iter().map(|x| floats.format_finite(*x).to_owned()).collect();
        assert_eq!(array, shortest.join(","), "ryu's own text, written in place");
        let back: Vec<f32> = array.split(',').map(|x| x.parse().unwrap()).collect();
        assert_eq!(back.len(), values.len());
        for (x, y) in values.iter().zip(&back) {
            assert_eq!(x.to_bits(), y.to_bits(), "{x:e} came back as {y:e}");
        }
    }

    #[test]
    fn base64_vectors_are_big_endian_f32() {
        let schema = Schema::new(&[PartSettings { type_name: "T".into(), field: "v".into(), dims: 2 }]);
        let doc = doc("b", vec![vec![1.0, -0.5]], None);
        let mut buf = BytesMut::new();
        let source = encode_op(&mut buf, &doc, &schema, VectorEncoding::Base64, Action::Index);
        let src: serde_json::Value = serde_json::from_slice(&buf[source]).unwrap();
        let bytes = BASE64_STANDARD.decode(src["v"].as_str().unwrap()).unwrap();
        assert_eq!(bytes, [0x3f, 0x80, 0, 0, 0xbf, 0, 0, 0]);
    }

    #[test]
    fn encodes_action_and_source_lines_that_round_trip() {
        let schema = Schema::new(&[
            PartSettings { type_name: "T".into(), field: "text_embedding".into(), dims: 2 },
            PartSettings { type_name: "I".into(), field: "image_embedding".into(), dims: 1 },
        ]);
        let doc = doc(
            "sku-\"1\"",
            vec![vec![0.1, -3.5e-7], vec![16777216.0]],
            serde_json::json!({"lang": "en", "n": [1, 2]}).as_object().cloned(),
        );
        let mut buf = BytesMut::new();
        let source = encode_op(&mut buf, &doc, &schema, VectorEncoding::Array, Action::Index);
        let text = std::str::from_utf8(&buf).unwrap();
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert_eq!(lines.len(), 2);
        assert!(text.ends_with('\n'));
        let action: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(action["index"]["_id"], "sku-\"1\"");
        assert_eq!(action["index"]["version"], 7);
        assert_eq!(action["index"]["version_type"], "external_gte");
        assert_eq!(&buf[source.clone()], lines[1].as_bytes());
        let src: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(src["text_embedding"][1].as_f64().unwrap() as f32, -3.5e-7f32);
        assert_eq!(src["text_embedding"][0].as_f64().unwrap() as f32, 0.1f32);
        assert_eq!(src["image_embedding"][0], 16777216.0);
        assert_eq!(src["completed_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(src["lang"], "en");
        assert_eq!(src["id"], "sku-\"1\"");
    }
}
