//! Encodes documents as `_bulk` NDJSON: an `index` action line with `_id` = the item id
//! (so a resend overwrites instead of duplicating) and the document's version as an
//! external version (`external_gte`: the same completion again is applied, an older one
//! is refused with a 409, so the index never goes back), then the document source line.
//! Each document is encoded once, straight into the request buffer.

use std::io::Write;
use std::ops::Range;

use bytes::BytesMut;

use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use base64::Engine;

pub use crate::config::VectorEncoding;
use crate::model::document::rfc3339;
use crate::model::{Document, Schema};

/// Appends one `index` operation (action line and source line, each ending in `\n`).
/// Returns the byte range of the source line (without its newline) inside `buf`.
pub fn encode_index_op(buf: &mut BytesMut, doc: &Document, schema: &Schema, vectors: VectorEncoding) -> Range<usize> {
    let mut w = Writer(buf);
    w.raw(b"{\"index\":{\"_id\":");
    w.json_str(&doc.id);
    w.raw(b",\"version\":");
    w.raw(itoa::Buffer::new().format(doc.version()).as_bytes());
    w.raw(b",\"version_type\":\"external_gte\"}}\n");
    let start = w.0.len();
    w.raw(b"{\"id\":");
    w.json_str(&doc.id);
    let mut floats = ryu::Buffer::new();
    for (slot, vector) in doc.vectors.iter().enumerate() {
        if vector.is_empty() {
            continue; // a missing part of an incomplete document
        }
        w.raw(b",\"");
        w.raw(schema.part(slot).field.as_bytes()); // validated: a plain name, no escaping needed
        match vectors {
            VectorEncoding::Array => {
                w.raw(b"\":[");
                for (i, x) in vector.iter().enumerate() {
                    if i > 0 {
                        w.raw(b",");
                    }
                    w.raw(floats.format_finite(*x).as_bytes());
                }
                w.raw(b"]");
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
    if doc.vectors.iter().any(Vec::is_empty) {
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
    w.raw(b"\n");
    start..end
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
        let source = encode_index_op(&mut buf, &doc, &schema, VectorEncoding::Array);
        let src: serde_json::Value = serde_json::from_slice(&buf[source]).unwrap();
        assert_eq!(src["t"][0], 0.5);
        assert!(src.get("i").is_none());
        assert_eq!(src["incomplete"], true);
        assert_eq!(src["missing_parts"], serde_json::json!(["I"]));
    }

    #[test]
    fn base64_vectors_are_big_endian_f32() {
        let schema = Schema::new(&[PartSettings { type_name: "T".into(), field: "v".into(), dims: 2 }]);
        let doc = doc("b", vec![vec![1.0, -0.5]], None);
        let mut buf = BytesMut::new();
        let source = encode_index_op(&mut buf, &doc, &schema, VectorEncoding::Base64);
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
        let source = encode_index_op(&mut buf, &doc, &schema, VectorEncoding::Array);
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
