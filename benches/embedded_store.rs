//! The embedded state store's merge: one batch of 500 partials, half of them completing,
//! in one fsynced write transaction, against a plain in-memory map doing the same work
//! (encode the vectors, keep the parts, hand back the completed documents), which shows
//! what the disk costs.
//!
//! A batch holds 250 first parts (384 f32) of new items and 250 second parts (512 f32) of
//! the items the batch before started, which complete them. Completions are confirmed
//! after each measured merge, untimed, as the sink would, so the outbox stays small.
//!
//! Run: `cargo bench --bench embedded_store -- --warm-up-time 2 --measurement-time 15`
//!
//! Why redb. Both candidates ran this same merge (read the item, write it back or move it
//! to the outbox, keep the time indexes, one transaction per batch, fsync at commit: redb
//! `Durability::Immediate`, fjall 2.11 `PersistMode::SyncAll`), on this 2-core VM (ext4,
//! other builds running), time per batch of 500 (criterion median), two runs of this
//! bench's first version, which held both candidates (fjall was then dropped):
//!
//! | candidate | run 1    | run 2    |
//! |-----------|----------|----------|
//! | in memory | 1.05 ms  | 0.53 ms  |
//! | redb 2.6  | 24.4 ms  | 17.9 ms  |
//! | fjall 2.11| 26.8 ms  | 24.0 ms  |
//!
//! redb was faster in both runs (the fsync dominates both), has no dependencies (fjall
//! brings lsm-tree, dashmap, ... and background flush/compaction threads) and keeps one
//! file. (redb 3+/fjall 3 need Rust 1.89+/1.90; the crate's rust-version is 1.88.)
//!
//! This bench, on the store as shipped (`EmbeddedStore::merge`, through the blocking pool):
//! memory 0.29 ms, redb 22.0 ms per batch: about 23k partials/s, bound by the fsync;
//! shards that flush at once take turns (redb runs one write transaction at a time).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use embedjoin::config::{EmbeddedSettings, PartSettings, Settings};
use embedjoin::model::document::Partial;
use embedjoin::model::{Metadata, Schema};
use embedjoin::state::embedded::EmbeddedStore;
use embedjoin::state::MergeOutcome;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BATCH: usize = 500;

fn schema() -> Schema {
    Schema::new(&[
        PartSettings { type_name: "EMBEDDINGS_TEXT".into(), field: "text_embedding".into(), dims: 384 },
        PartSettings { type_name: "EMBEDDINGS_IMAGE".into(), field: "image_embedding".into(), dims: 512 },
    ])
}

/// Batch `k`: first parts of items `k-*`, second parts of items `(k-1)-*`.
fn batch(schema: &Schema, k: u64, rng: &mut StdRng) -> Vec<(String, Partial)> {
    let meta: Metadata = serde_json::from_str(r#"{"lang":"en"}"#).unwrap();
    let mut out = Vec::with_capacity(BATCH);
    for i in 0..BATCH / 2 {
        for (slot, generation) in [(0, k), (1, k.wrapping_sub(1))] {
            let mut partial = Partial::new(schema.len(), Instant::now());
            let dims = schema.part(slot).dims;
            partial.vectors[slot] = Some((0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect());
            partial.metadata[slot] = (slot == 0).then(|| meta.clone());
            partial.stamps[slot] = embedjoin::model::stamp::next();
            out.push((format!("item-{generation}-{i}"), partial));
        }
    }
    out
}

/// An item's parts by slot: vector bytes, metadata JSON.
type Parts = Vec<Option<(Vec<u8>, Option<Vec<u8>>)>>;

/// The baseline: the same bookkeeping in a map, nothing on disk.
#[derive(Default)]
struct Memory {
    partials: HashMap<String, Parts>,
    outbox: HashMap<String, Parts>,
}

impl Memory {
    fn merge(&mut self, batch: &[(String, Partial)]) -> Vec<String> {
        let mut completed = Vec::new();
        for (id, partial) in batch {
            let parts = self.partials.entry(id.clone()).or_insert_with(|| vec![None; partial.vectors.len()]);
            for (slot, vector) in partial.vectors.iter().enumerate() {
                if let Some(v) = vector {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    let meta = partial.metadata[slot].as_ref().map(|m| serde_json::to_vec(m).unwrap());
                    parts[slot] = Some((bytes, meta));
                }
            }
            if parts.iter().all(Option::is_some) {
                let parts = self.partials.remove(id).expect("present");
                for (bytes, _) in parts.iter().flatten() {
                    let floats: Vec<f32> =
                        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                    black_box(floats);
                }
                self.outbox.insert(id.clone(), parts);
                completed.push(id.clone());
            }
        }
        completed
    }
}

fn benches(c: &mut Criterion) {
    let schema = schema();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut group = c.benchmark_group("merge_500");
    group.throughput(Throughput::Elements(BATCH as u64));

    let (mut rng, mut k, mut memory) = (StdRng::seed_from_u64(7), 0u64, Memory::default());
    group.bench_function("memory", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                k += 1;
                let batch = batch(&schema, k, &mut rng);
                let start = Instant::now();
                let completed = memory.merge(&batch);
                spent += start.elapsed();
                for id in completed {
                    memory.outbox.remove(&id);
                }
            }
            spent
        })
    });

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let settings = EmbeddedSettings { path: dir.path().join("bench.redb"), partial_ttl: Duration::from_secs(3600) };
    let state = Settings::defaults().state;
    let store = runtime.block_on(EmbeddedStore::open(&settings, &state, &schema)).unwrap();
    let (mut rng, mut k) = (StdRng::seed_from_u64(7), 0u64);
    group.bench_function("redb", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                k += 1;
                let batch = batch(&schema, k, &mut rng);
                let start = Instant::now();
                let outcomes = runtime.block_on(store.merge(&batch, Duration::from_secs(30))).unwrap();
                spent += start.elapsed();
                let done: Vec<(String, u64)> = outcomes
                    .into_iter()
                    .filter_map(|o| match o {
                        MergeOutcome::Completed(doc) => Some((doc.id.clone(), doc.version())),
                        _ => None,
                    })
                    .collect();
                assert_eq!(done.len(), if k == 1 { 0 } else { BATCH / 2 });
                runtime.block_on(store.confirm(&done)).unwrap();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(name = embedded; config = Criterion::default().sample_size(20); targets = benches);
criterion_main!(embedded);
