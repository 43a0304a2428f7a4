//! Decoding an ingest body: serde_json (the reference path) against the hand-written
//! scanner that `parse_batch` uses. Bodies are what clients send: 100 items alternating
//! 384 and 512 dims, floats printed the way Python prints them, in two styles:
//! `repr17`, an `f32` widened to `f64` and printed shortest for `f64` (~17 significant
//! digits, what `json.dumps(vec.tolist())` gives for a float32 numpy array), and
//! `shortest_f32`, the shortest text that reads back as the same `f32` (~9 digits).
//!
//! Run: `cargo bench --bench decode -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use embedjoin::config::{PartSettings, Similarity};
use embedjoin::model::ingest::{parse_batch, parse_batch_serde, Limits};
use embedjoin::model::Schema;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ITEMS: usize = 100;
const LIMITS: Limits = Limits { max_id_bytes: 512, similarity: Similarity::Cosine, max_metadata_bytes: 65536 };

fn schema() -> Schema {
    Schema::new(&[
        PartSettings { type_name: "EMBEDDINGS_TEXT".into(), field: "text_embedding".into(), dims: 384 },
        PartSettings { type_name: "EMBEDDINGS_IMAGE".into(), field: "image_embedding".into(), dims: 512 },
    ])
}

/// Python's `repr` of a float: shortest round trip, exponent form outside [1e-4, 1e16).
fn python_repr(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e16) {
        let text = format!("{x:e}");
        let (mantissa, exponent) = text.split_once('e').expect("`{:e}` has an exponent");
        let (sign, digits) = exponent.strip_prefix('-').map_or(("+", exponent), |d| ("-", d));
        format!("{mantissa}e{sign}{digits:0>2}")
    } else {
        format!("{x:?}")
    }
}

fn repr17(x: f32) -> String {
    python_repr(f64::from(x))
}

fn shortest_f32(x: f32) -> String {
    ryu::Buffer::new().format(x).to_owned()
}

/// A body as `json.dumps` writes it (", " and ": " separators).
fn body(format: fn(f32) -> String) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(384);
    let items: Vec<String> = (0..ITEMS)
        .map(|i| {
            let (type_name, dims) = if i % 2 == 0 { ("EMBEDDINGS_TEXT", 384) } else { ("EMBEDDINGS_IMAGE", 512) };
            // Unit-norm-ish embeddings: elements around +-1/sqrt(dims), a few near zero.
            let vector: Vec<String> = (0..dims).map(|_| format(rng.random_range(-0.15f32..0.15))).collect();
            format!(r#"{{"id": "sku-{i:06}", "embedding_type": "{type_name}", "embedding": [{}]}}"#, vector.join(", "))
        })
        .collect();
    format!(r#"{{"embeddings": [{}]}}"#, items.join(", ")).into_bytes()
}

fn decode(c: &mut Criterion) {
    let schema = schema();
    for (style, format) in [("repr17", repr17 as fn(f32) -> String), ("shortest_f32", shortest_f32)] {
        let body = body(format);
        check_paths_agree(&body, &schema);
        println!("{style}: {ITEMS} embeddings in {} bytes", body.len());
        for (unit, throughput) in
            [("embeddings", Throughput::Elements(ITEMS as u64)), ("bytes", Throughput::Bytes(body.len() as u64))]
        {
            let mut group = c.benchmark_group(format!("decode_{style}_{unit}"));
            group.throughput(throughput);
            group.bench_function("serde_json", |b| b.iter(|| parse_batch_serde(black_box(&body), &schema, LIMITS)));
            group.bench_function("fast", |b| b.iter(|| parse_batch(black_box(&body), &schema, LIMITS)));
            group.finish();
        }
    }
}

/// A benchmark of a decoder that gets a different answer would be meaningless.
fn check_paths_agree(body: &[u8], schema: &Schema) {
    let (fast, fast_rejected) = parse_batch(body, schema, LIMITS).expect("fast path decodes the body");
    let (slow, slow_rejected) = parse_batch_serde(body, schema, LIMITS).expect("serde path decodes the body");
    assert!(fast_rejected.is_empty() && slow_rejected.is_empty());
    assert_eq!(fast.len(), ITEMS);
    for (a, b) in fast.iter().zip(&slow) {
        assert_eq!((&a.id, a.slot), (&b.id, b.slot));
        assert!(a.vector.iter().map(|x| x.to_bits()).eq(b.vector.iter().map(|x| x.to_bits())));
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
