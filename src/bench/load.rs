//! Generated load for the benchmark, deterministic from a seed.
//!
//! Contract: for the same [`LoadSpec`] the same parts come out in the same order, with
//! the same values. A part's vector depends only on the seed, its item and its slot (each
//! part seeds its own fast RNG), so two orders of one seed carry identical data and their
//! figures compare the orders, not the numbers. Every item gets every configured part, so
//! every item can complete; duplicates are extra copies on top.
//!
//! Everything is generated before the clock starts: the in-process mode gets [`Part`]s
//! ready to hand to the router, the `--http` mode gets ready-made JSON bodies.

use std::time::Instant;

use bytes::Bytes;
use clap::ValueEnum;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::PartSettings;
use crate::model::Part;

/// In which order the parts of all items are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// The parts of one item next to each other, so usually in one batch: they meet in a
    /// shard's memory and never touch Redis.
    Interleaved,
    /// Every item's first part, then every item's second part, ...: each item is
    /// persisted to Redis first and completes there (the encoders-finish-apart case), as
    /// long as the run outlasts `shards.flush_interval`.
    Split,
    /// A random order: some items meet in memory, others through Redis.
    Shuffled,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Items; each gets every part.
    pub entities: usize,
    /// The parts of an item (type name and dims are used).
    pub parts: Vec<PartSettings>,
    /// Parts per batch (one router submission, or one HTTP request).
    pub batch_size: usize,
    pub order: Order,
    /// Share of parts sent a second time, each copy at a random later position.
    pub duplicates: f64,
    pub seed: u64,
    /// Prepended to the item number to make its id.
    pub id_prefix: String,
}

/// One part to send: which item, which slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    pub entity: u32,
    pub slot: u8,
}

impl LoadSpec {
    /// Parts sent in all, duplicates included.
    pub fn total_parts(&self) -> usize {
        let base = self.entities * self.parts.len();
        base + duplicate_count(base, self.duplicates)
    }

    /// The order of every part to send, duplicates included.
    pub fn sequence(&self) -> Vec<Slot> {
        let slots = self.parts.len();
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let mut seq: Vec<Slot> = match self.order {
            Order::Interleaved | Order::Shuffled => {
                (0..self.entities).flat_map(|e| (0..slots).map(move |s| slot(e, s))).collect()
            }
            Order::Split => (0..slots).flat_map(|s| (0..self.entities).map(move |e| slot(e, s))).collect(),
        };
        if self.order == Order::Shuffled {
            use rand::seq::SliceRandom;
            seq.shuffle(&mut rng);
        }
        let copies = duplicate_count(seq.len(), self.duplicates);
        if copies == 0 {
            return seq;
        }
        // An original at position i sorts at 2i; its copy at 2j+1 for a random j >= i,
        // that is right after some later original (a client resending a part later).
        let n = seq.len();
        let mut keyed: Vec<(usize, Slot)> = seq.iter().enumerate().map(|(i, s)| (2 * i, *s)).collect();
        for i in rand::seq::index::sample(&mut rng, n, copies) {
            let j = rng.random_range(i..n);
            keyed.push((2 * j + 1, seq[i]));
        }
        keyed.sort_by_key(|(k, _)| *k);
        keyed.into_iter().map(|(_, s)| s).collect()
    }

    /// The id of item `entity`.
    pub fn id(&self, entity: u32) -> String {
        format!("{}{entity}", self.id_prefix)
    }

    /// The vector of one part; depends only on the seed, the item and the slot.
    pub fn vector(&self, s: Slot) -> Vec<f32> {
        let dims = self.parts[s.slot as usize].dims;
        let mut rng =
            SmallRng::seed_from_u64(self.seed ^ (u64::from(s.entity) << 8 | u64::from(s.slot)).wrapping_mul(GOLDEN));
        (0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Batches of parts for the router. `received_at` is a placeholder: the sender
    /// stamps each batch as it submits it.
    pub fn part_batches(&self) -> Vec<Vec<Part>> {
        let now = Instant::now();
        self.sequence()
            .chunks(self.batch_size)
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|&s| Part {
                        id: self.id(s.entity),
                        slot: s.slot as usize,
                        vector: self.vector(s),
                        metadata: None,
                        received_at: now,
                        stamp: crate::model::stamp::next(),
                        ack: None,
                    })
                    .collect()
            })
            .collect()
    }

    /// Batches as MessagePack `POST /aggregate/` bodies (vectors as `bin` of little-endian
    /// f32s, what a numpy client sends), with the number of parts in each.
    pub fn msgpack_batches(&self) -> Vec<(Bytes, usize)> {
        use rmp::encode::{write_array_len, write_bin, write_map_len, write_str};
        self.sequence()
            .chunks(self.batch_size)
            .map(|chunk| {
                let mut body = Vec::with_capacity(chunk.len() * (64 + 4 * 512));
                write_map_len(&mut body, 1).expect("to a Vec");
                write_str(&mut body, "embeddings").expect("to a Vec");
                write_array_len(&mut body, chunk.len() as u32).expect("to a Vec");
                for &s in chunk {
                    let part = &self.parts[s.slot as usize];
                    let vector: Vec<u8> = self.vector(s).iter().flat_map(|x| x.to_le_bytes()).collect();
                    write_map_len(&mut body, 3).expect("to a Vec");
                    write_str(&mut body, "id").expect("to a Vec");
                    write_str(&mut body, &self.id(s.entity)).expect("to a Vec");
                    write_str(&mut body, "embedding_type").expect("to a Vec");
                    write_str(&mut body, &part.type_name).expect("to a Vec");
                    write_str(&mut body, "embedding").expect("to a Vec");
                    write_bin(&mut body, &vector).expect("to a Vec");
                }
                (Bytes::from(body), chunk.len())
            })
            .collect()
    }

    /// Batches as `POST /aggregate/` bodies, with the number of parts in each.
    pub fn json_batches(&self) -> Vec<(Bytes, usize)> {
        let mut floats = ryu::Buffer::new();
        self.sequence()
            .chunks(self.batch_size)
            .map(|chunk| {
                let mut body = Vec::with_capacity(chunk.len() * 16 * 512);
                body.extend_from_slice(b"{\"embeddings\":[");
                for (i, &s) in chunk.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    let part = &self.parts[s.slot as usize];
                    body.extend_from_slice(b"{\"id\":");
                    serde_json::to_writer(&mut body, &self.id(s.entity)).expect("to a Vec");
                    body.extend_from_slice(b",\"embedding_type\":");
                    serde_json::to_writer(&mut body, &part.type_name).expect("to a Vec");
                    body.extend_from_slice(b",\"embedding\":[");
                    for (k, x) in self.vector(s).into_iter().enumerate() {
                        if k > 0 {
                            body.push(b',');
                        }
                        body.extend_from_slice(floats.format_finite(x).as_bytes());
                    }
                    body.extend_from_slice(b"]}");
                }
                body.extend_from_slice(b"]}");
                (Bytes::from(body), chunk.len())
            })
            .collect()
    }
}

/// Mixes the item and slot into the seed (Fibonacci hashing), so neighbours differ.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn slot(entity: usize, slot: usize) -> Slot {
    Slot { entity: entity as u32, slot: slot as u8 }
}

/// Copies for `ratio` of `parts`, rounded to the nearest whole part.
fn duplicate_count(parts: usize, ratio: f64) -> usize {
    ((parts as f64 * ratio.clamp(0.0, 1.0)).round() as usize).min(parts)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn spec(order: Order, duplicates: f64) -> LoadSpec {
        LoadSpec {
            entities: 50,
            parts: vec![
                PartSettings { type_name: "A".into(), field: "a".into(), dims: 3 },
                PartSettings { type_name: "B".into(), field: "b".into(), dims: 5 },
            ],
            batch_size: 7,
            order,
            duplicates,
            seed: 42,
            id_prefix: "t-".into(),
        }
    }

    fn counts(seq: &[Slot]) -> HashMap<Slot, usize> {
        let mut m = HashMap::new();
        for s in seq {
            *m.entry(*s).or_default() += 1;
        }
        m
    }

    #[test]
    fn every_order_sends_every_part_of_every_item_once() {
        for order in [Order::Interleaved, Order::Split, Order::Shuffled] {
            let seq = spec(order, 0.0).sequence();
            assert_eq!(seq.len(), 100, "{order:?}");
            let c = counts(&seq);
            assert_eq!(c.len(), 100, "{order:?}");
            assert!(c.values().all(|&n| n == 1), "{order:?}");
        }
    }

    #[test]
    fn orders_place_parts_as_documented() {
        let seq = spec(Order::Interleaved, 0.0).sequence();
        assert_eq!(&seq[..2], &[slot(0, 0), slot(0, 1)]);
        let seq = spec(Order::Split, 0.0).sequence();
        assert!(seq[..50].iter().all(|s| s.slot == 0));
        assert!(seq[50..].iter().all(|s| s.slot == 1));
        let seq = spec(Order::Shuffled, 0.0).sequence();
        assert_ne!(seq, spec(Order::Interleaved, 0.0).sequence());
    }

    #[test]
    fn duplicates_add_the_asked_share_of_later_copies() {
        let s = spec(Order::Split, 0.25);
        let seq = s.sequence();
        assert_eq!(seq.len(), 125);
        assert_eq!(s.total_parts(), 125);
        let c = counts(&seq);
        assert_eq!(c.len(), 100);
        assert_eq!(c.values().filter(|&&n| n == 2).count(), 25);
        // Copies come after their originals, which keep their order.
        let mut seen = std::collections::HashSet::new();
        let originals: Vec<Slot> = seq.iter().copied().filter(|s| seen.insert(*s)).collect();
        assert_eq!(originals, spec(Order::Split, 0.0).sequence());
    }

    #[test]
    fn the_same_seed_gives_the_same_load_and_another_seed_does_not() {
        let a = spec(Order::Shuffled, 0.1);
        assert_eq!(a.sequence(), a.sequence());
        assert_eq!(a.json_batches(), a.json_batches());
        let mut b = a.clone();
        b.seed = 43;
        assert_ne!(a.sequence(), b.sequence());
        assert_ne!(a.vector(slot(3, 1)), b.vector(slot(3, 1)));
    }

    #[test]
    fn a_vector_depends_on_its_item_and_slot_only() {
        let interleaved = spec(Order::Interleaved, 0.0);
        let split = spec(Order::Split, 0.0);
        assert_eq!(interleaved.vector(slot(7, 1)), split.vector(slot(7, 1)));
        assert_ne!(interleaved.vector(slot(7, 1)), interleaved.vector(slot(8, 1)));
        let v = interleaved.vector(slot(7, 1));
        assert_eq!(v.len(), 5);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
    }

    #[test]
    fn batches_hold_batch_size_parts_with_the_configured_dims() {
        let s = spec(Order::Interleaved, 0.0);
        let batches = s.part_batches();
        assert_eq!(batches.len(), 15); // 100 parts in 7s
        assert_eq!(batches[0].len(), 7);
        assert_eq!(batches[14].len(), 2);
        assert_eq!(batches[0][0].id, "t-0");
        assert_eq!(batches[0][1].vector.len(), 5);
    }

    #[test]
    fn msgpack_batches_carry_the_same_parts_as_json() {
        let s = spec(Order::Shuffled, 0.0);
        let schema = crate::model::Schema::new(&s.parts);
        let limits = crate::model::ingest::Limits {
            max_id_bytes: 512,
            similarity: crate::config::Similarity::Cosine,
            max_metadata_bytes: 65536,
        };
        for ((json, n), (msgpack, m)) in s.json_batches().iter().zip(s.msgpack_batches()) {
            assert_eq!(*n, m);
            let (a, ra) = crate::model::ingest::parse_batch(json, &schema, limits).unwrap();
            let (b, rb) = crate::model::ingest::parse_batch_msgpack(&msgpack, &schema, limits).unwrap();
            assert!(ra.is_empty() && rb.is_empty());
            assert_eq!(
                a.iter().map(|p| (&p.id, p.slot, &p.vector)).collect::<Vec<_>>(),
                b.iter().map(|p| (&p.id, p.slot, &p.vector)).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn json_batches_parse_as_the_ingest_contract() {
        let s = spec(Order::Interleaved, 0.0);
        let batches = s.json_batches();
        assert_eq!(batches.len(), 15);
        let body: serde_json::Value = serde_json::from_slice(&batches[0].0).unwrap();
        let items = body["embeddings"].as_array().unwrap();
        assert_eq!(items.len(), batches[0].1);
        assert_eq!(items[1]["id"], "t-0");
        assert_eq!(items[1]["embedding_type"], "B");
        let values: Vec<f32> =
            items[1]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(values, s.vector(slot(0, 1)));
    }
}
