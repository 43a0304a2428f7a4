//! Shortest round-trip `f32` formatting for the bulk body: the candidates for
//! `src/sink/encode.rs`, each writing one whole vector as a JSON array (`[x,y,...]`) into a
//! reused buffer, as the encoder does. Vectors of 384 and 512 dims, with values drawn two
//! ways: `uniform` in [-1, 1) (the `embedjoin bench` load) and `unit` (a normalised
//! embedding, ~±0.05 per value, what encoders emit).
//!
//! Candidates: `ryu` (the encoder's formatter before), `zmij` (dtolnay's Schubfach/xjb),
//! `lexical-write-float`. (`dragonbox` on crates.io formats `f64` only: an `f32` widened to
//! `f64` prints ~17 digits, not the shortest `f32` text, so it is not a candidate.)
//!
//! Run: `cargo bench --bench float_format -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lexical_write_float::{FormattedSize, ToLexical};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn vector(rng: &mut StdRng, dims: usize, unit: bool) -> Vec<f32> {
    let v: Vec<f32> = (0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    if !unit {
        return v;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// Writes `v` as a JSON array with `format`, as the bulk encoder does.
#[inline(always)]
fn array(out: &mut Vec<u8>, v: &[f32], mut format: impl FnMut(f32, &mut Vec<u8>)) {
    out.push(b'[');
    for (i, &x) in v.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        format(x, out);
    }
    out.push(b']');
}

fn ryu_array(out: &mut Vec<u8>, v: &[f32]) {
    let mut b = ryu::Buffer::new();
    array(out, v, |x, out| out.extend_from_slice(b.format_finite(x).as_bytes()));
}

fn zmij_array(out: &mut Vec<u8>, v: &[f32]) {
    let mut b = zmij::Buffer::new();
    array(out, v, |x, out| out.extend_from_slice(b.format_finite(x).as_bytes()));
}

fn lexical_array(out: &mut Vec<u8>, v: &[f32]) {
    let mut b = [0u8; f32::FORMATTED_SIZE_DECIMAL];
    array(out, v, |x, out| out.extend_from_slice(x.to_lexical(&mut b)));
}

fn format(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(11);
    for dims in [384, 512] {
        for (values, unit) in [("uniform", false), ("unit", true)] {
            let v = vector(&mut rng, dims, unit);
            for (name, f) in
                [("ryu", ryu_array as fn(&mut Vec<u8>, &[f32])), ("zmij", zmij_array), ("lexical", lexical_array)]
            {
                // A benchmark of a formatter that writes other numbers would be meaningless.
                let mut out = Vec::new();
                f(&mut out, &v);
                let text = std::str::from_utf8(&out[1..out.len() - 1]).expect("ASCII");
                let back: Vec<f32> = text.split(',').map(|x| x.parse().expect("a number")).collect();
                assert!(back.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} round trip");
            }
            let mut group = c.benchmark_group(format!("format_{dims}_{values}"));
            group.throughput(Throughput::Elements(dims as u64));
            let mut out = Vec::with_capacity(dims * 16);
            group.bench_function("ryu", |b| {
                b.iter(|| {
                    out.clear();
                    ryu_array(&mut out, black_box(&v));
                    black_box(out.len())
                })
            });
            group.bench_function("zmij", |b| {
                b.iter(|| {
                    out.clear();
                    zmij_array(&mut out, black_box(&v));
                    black_box(out.len())
                })
            });
            group.bench_function("lexical", |b| {
                b.iter(|| {
                    out.clear();
                    lexical_array(&mut out, black_box(&v));
                    black_box(out.len())
                })
            });
            group.finish();
        }
    }
}

criterion_group!(benches, format);
criterion_main!(benches);
