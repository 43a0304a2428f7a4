//! A property test: whatever the interleaving of parts, instances and flushes, the final
//! index holds exactly the complete items, each with its vectors, and Redis holds no
//! complete item and no unconfirmed document.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use embedjoin::config::PartSettings;
use embedjoin::model::Part;
use embedjoin::Pipeline;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::app::test_settings;
use crate::support::data::{stored_vector, vector};
use crate::support::es::EsTarget;
use crate::support::redis_server::RedisServer;

const PARTS: [(&str, &str, usize); 3] = [("A", "a_vec", 4), ("B", "b_vec", 3), ("C", "c_vec", 2)];

enum Op {
    Send { instance: usize, id: usize, slot: usize },
    Flush { instance: usize },
}

fn random_ops(rng: &mut StdRng, ids: usize, len: usize) -> Vec<Op> {
    (0..len)
        .map(|_| {
            if rng.random_bool(0.15) {
                Op::Flush { instance: rng.random_range(0..2) }
            } else {
                Op::Send {
                    instance: rng.random_range(0..2),
                    id: rng.random_range(0..ids),
                    slot: rng.random_range(0..PARTS.len()),
                }
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_interleaving_of_parts_instances_and_flushes_yields_exactly_the_complete_items() {
    let redis = RedisServer::start().await;
    let cases: u64 = std::env::var("EMBEDJOIN_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    for case in 0..cases {
        let seed = 1000 + case;
        let mut rng = StdRng::seed_from_u64(seed);
        let es = EsTarget::start().await;
        let mut settings = test_settings(&redis, &es);
        settings.parts = PARTS
            .iter()
            .map(|(t, f, d)| PartSettings { type_name: t.to_string(), field: f.to_string(), dims: *d })
            .collect();
        settings.redis.key_prefix = format!("case{case}:");
        settings.shards.flush_interval = Duration::from_secs(3600); // flushes only when the test says
        settings.shards.max_dirty = 1_000_000;
        settings.elasticsearch.flush_interval = Duration::from_millis(5);
        let mut instances = Vec::new();
        for _ in 0..2 {
            settings.shards.count = rng.random_range(1..=3);
            instances.push(Pipeline::start(&settings).await.expect("pipeline starts"));
        }
        let ids = rng.random_range(1..=12);
        let len = rng.random_range(5..80);
        let ops = random_ops(&mut rng, ids, len);
        let mut sent: HashMap<usize, BTreeSet<usize>> = HashMap::new();
        for op in &ops {
            match *op {
                Op::Send { instance, id, slot } => {
                    let (type_name, _, dims) = PARTS[slot];
                    let name = format!("i{id}");
                    let part = Part::new(name.clone(), slot, vector(&name, type_name, dims, 0), None);
                    instances[instance].router.submit(vec![part]).await.unwrap();
                    sent.entry(id).or_default().insert(slot);
                }
                Op::Flush { instance } => instances[instance].router.flush().await.unwrap(),
            }
        }
        for instance in instances {
            instance.shutdown().await;
        }

        let complete: Vec<String> =
            sent.iter().filter(|(_, slots)| slots.len() == PARTS.len()).map(|(id, _)| format!("i{id}")).collect();
        let all: Vec<String> = (0..ids).map(|i| format!("i{i}")).collect();
        let indexed = es.docs(&all).await;
        let mut got: Vec<&String> = indexed.keys().collect();
        let mut want: Vec<&String> = complete.iter().collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "case {case} (seed {seed}): the index holds exactly the complete items");
        for id in &complete {
            for (type_name, field, dims) in PARTS {
                assert_eq!(
                    stored_vector(&indexed[id].source, field),
                    vector(id, type_name, dims, 0),
                    "case {case}: {id} {field}"
                );
            }
        }
        let mut conn = redis.connection().await;
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("case{case}:*")).query_async(&mut conn).await.unwrap();
        for key in &keys {
            assert!(!key.contains("outbox"), "case {case}: {key} left unconfirmed");
            if key.contains('{') {
                let fields: Vec<String> = redis::cmd("HKEYS").arg(key).query_async(&mut conn).await.unwrap();
                let parts = PARTS.iter().filter(|(t, _, _)| fields.iter().any(|f| f == t)).count();
                assert!(parts < PARTS.len(), "case {case}: {key} is complete but still a partial");
            }
        }
    }
}
