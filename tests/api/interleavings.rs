//! A model test of the join's semantics: random sequences of parts (several copies of each
//! part type, with and without metadata, duplicates of a copy), flushes, lost replies (a
//! proxy drops Redis's answer after Redis applied the flush), instance restarts and two
//! instances, then a closing round for some items, checked against a simple reference:
//!
//! - an item given a closing round (every part again, in one request) is indexed with
//!   exactly those copies, the newest of each part, and its metadata, at their version;
//! - every indexed document is made of copies that were sent, each part with its stamp
//!   in `_parts`, and (with `late_parts = "new_item"`) its version is the stamp of its
//!   newest part;
//! - Redis keeps no outbox entry and nothing of a closed item but its completion record,
//!   and no item with every part waiting (it would have completed).
//!
//! Seeded; `EMBEDJOIN_PROPTEST_CASES` sets the number of cases (16 by default).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use embedjoin::config::{LatePartsAction, PartSettings};
use embedjoin::model::{Metadata, Part};
use embedjoin::{Pipeline, Settings};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::support::app::test_settings;
use crate::support::data::{stored_vector, vector};
use crate::support::es::EsTarget;
use crate::support::proxy::Proxy;
use crate::support::redis_server::RedisServer;

const PARTS: [(&str, &str, usize); 3] = [("A", "a_vec", 4), ("B", "b_vec", 3), ("C", "c_vec", 2)];
const INSTANCES: usize = 2;

/// One copy of a part, as sent.
#[derive(Clone)]
struct Copy {
    part: Part,
    copy: u32,
}

fn copy_of(id: &str, slot: usize, copy: u32, with_meta: bool) -> Copy {
    let (type_name, _, dims) = PARTS[slot];
    let metadata: Option<Metadata> =
        with_meta.then(|| json!({ format!("m{slot}"): copy }).as_object().cloned()).flatten();
    Copy { part: Part::new(id.to_owned(), slot, vector(id, type_name, dims, copy), metadata), copy }
}

struct Case {
    settings: Settings,
    proxies: Vec<Proxy>,
    instances: Vec<Option<Pipeline>>,
}

impl Case {
    async fn start(redis: &RedisServer, es: &EsTarget, case: u64, rng: &mut StdRng) -> Case {
        let mut settings = test_settings(redis, es);
        settings.parts = PARTS
            .iter()
            .map(|(t, f, d)| PartSettings { type_name: t.to_string(), field: f.to_string(), dims: *d })
            .collect();
        settings.redis.key_prefix = format!("case{case}:");
        // Both answers to a part for a completed item: odd cases run `new_item`, even ones
        // (where the engine runs painless) guarded updates.
        if case % 2 == 1 {
            settings.state.late_parts = LatePartsAction::NewItem;
        }
        settings.shards.flush_interval = Duration::from_secs(3600); // flushes only when the test says
        settings.shards.max_dirty = 1_000_000;
        settings.elasticsearch.flush_interval = Duration::from_millis(5);
        settings.redis.response_timeout = Duration::from_millis(300);
        settings.durability.outbox_resend_after = Duration::from_millis(400);
        settings.durability.maintenance_interval = Duration::from_millis(100);
        let upstream = redis.url().trim_start_matches("redis://").parse().unwrap();
        let mut case = Case { settings, proxies: Vec::new(), instances: Vec::new() };
        for i in 0..INSTANCES {
            case.proxies.push(Proxy::start(upstream).await);
            case.instances.push(None);
            case.restart(i, rng).await;
        }
        case
    }

    /// Stops instance `i` if it runs (draining it), and starts it again.
    async fn restart(&mut self, i: usize, rng: &mut StdRng) {
        if let Some(old) = self.instances[i].take() {
            old.shutdown().await;
        }
        let mut settings = self.settings.clone();
        settings.redis.url = self.proxies[i].redis_url();
        settings.shards.count = rng.random_range(1..=3);
        self.instances[i] = Some(Pipeline::start(&settings).await.expect("pipeline starts"));
    }

    fn at(&self, i: usize) -> &Pipeline {
        self.instances[i].as_ref().expect("running")
    }

    async fn shutdown(&mut self) {
        for instance in self.instances.iter_mut().filter_map(Option::take) {
            instance.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_interleaving_indexes_the_newest_copies_and_leaves_nothing_behind() {
    let redis = RedisServer::start().await;
    let cases: u64 = std::env::var("EMBEDJOIN_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    for case in 0..cases {
        let seed = 2000 + case;
        let mut rng = StdRng::seed_from_u64(seed);
        let es = EsTarget::start().await;
        let mut run = Case::start(&redis, &es, case, &mut rng).await;
        let updates = run.settings.state.late_parts == LatePartsAction::Update;
        let ids = rng.random_range(1..=8);
        let mut sent: HashMap<(usize, usize), Vec<Copy>> = HashMap::new();
        let mut copies = 0u32;
        for _ in 0..rng.random_range(5..60) {
            let instance = rng.random_range(0..INSTANCES);
            let r = rng.random_range(0..100);
            match r {
                0..=59 => {
                    let (id, slot) = (rng.random_range(0..ids), rng.random_range(0..PARTS.len()));
                    copies += 1;
                    let c = copy_of(&format!("i{id}"), slot, copies, rng.random_bool(0.5));
                    run.at(instance).router.submit(vec![c.part.clone()]).await.unwrap();
                    sent.entry((id, slot)).or_default().push(c);
                }
                60..=69 => {
                    // The same copy delivered again (a duplicate): same stamp.
                    let (id, slot) = (rng.random_range(0..ids), rng.random_range(0..PARTS.len()));
                    if let Some(c) = sent.get(&(id, slot)).and_then(|v| v.last()) {
                        run.at(instance).router.submit(vec![c.part.clone()]).await.unwrap();
                    }
                }
                70..=89 => run.at(instance).router.flush().await.unwrap(),
                90..=95 => {
                    // The reply to the next script call (a merge, or maintenance's) is lost.
                    run.proxies[instance].lose_reply_to(b"EVALSHA");
                    run.at(instance).router.flush().await.unwrap();
                    run.proxies[instance].disarm();
                }
                _ => run.restart(instance, &mut rng).await,
            }
        }
        // The closing round: every part again, newest, in one request, for some items.
        let mut closed: HashMap<usize, Vec<Copy>> = HashMap::new();
        for id in 0..ids {
            if rng.random_bool(0.6) {
                let round: Vec<Copy> = (0..PARTS.len())
                    .map(|slot| {
                        copies += 1;
                        copy_of(&format!("i{id}"), slot, copies, rng.random_bool(0.5))
                    })
                    .collect();
                let instance = rng.random_range(0..INSTANCES);
                run.at(instance).router.submit(round.iter().map(|c| c.part.clone()).collect()).await.unwrap();
                for (slot, c) in round.iter().enumerate() {
                    sent.entry((id, slot)).or_default().push(c.clone());
                }
                closed.insert(id, round);
            }
        }
        run.shutdown().await;
        // Lost replies may have left completions in the outbox: a fresh instance resends them.
        drain_outbox(&mut run, &redis, case, &mut rng).await;
        run.shutdown().await;

        let all: Vec<String> = (0..ids).map(|i| format!("i{i}")).collect();
        let indexed = es.docs(&all).await;
        let context = |id: &str| format!("case {case} (seed {seed}), {id}");
        for (id, round) in &closed {
            let name = format!("i{id}");
            let doc = indexed.get(&name).unwrap_or_else(|| panic!("{}: a closed item is indexed", context(&name)));
            let version = round.iter().map(|c| c.part.stamp).max().unwrap();
            assert_eq!(doc.newest(), version, "{}: the newest completion's version", context(&name));
            if !updates {
                assert_eq!(doc.version, version, "{}: the external version", context(&name));
            }
            let mut meta = serde_json::Map::new();
            for (slot, c) in round.iter().enumerate() {
                let (type_name, field, dims) = PARTS[slot];
                assert_eq!(
                    stored_vector(&doc.source, field),
                    vector(&name, type_name, dims, c.copy),
                    "{}: {field}",
                    context(&name)
                );
                meta.extend(c.part.metadata.clone().unwrap_or_default());
            }
            for slot in 0..PARTS.len() {
                let key = format!("m{slot}");
                assert_eq!(
                    doc.source.get(&key),
                    meta.get(&key),
                    "{}: metadata of the closing copies only",
                    context(&name)
                );
            }
        }
        for (name, doc) in &indexed {
            let id: usize = name[1..].parse().unwrap();
            let mut newest = 0;
            for (slot, (type_name, field, dims)) in PARTS.iter().enumerate() {
                let got = stored_vector(&doc.source, field);
                let copy = sent[&(id, slot)].iter().find(|c| vector(name, type_name, *dims, c.copy) == got);
                let copy = copy.unwrap_or_else(|| panic!("{}: {field} is a copy that was sent", context(name)));
                assert_eq!(doc.stamp(type_name), Some(copy.part.stamp), "{}: the stamp of {field}", context(name));
                newest = newest.max(copy.part.stamp);
            }
            if !updates {
                assert_eq!(doc.version, newest, "{}: version = stamp of the newest part", context(name));
            }
        }
        assert_redis_is_clean(&redis, case, &closed).await;
    }
}

/// Runs one more instance until the outbox is empty.
async fn drain_outbox(run: &mut Case, redis: &RedisServer, case: u64, rng: &mut StdRng) {
    let mut conn = redis.connection().await;
    let pattern = format!("case{case}:outbox:*");
    let waiting: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.unwrap();
    if waiting.is_empty() {
        return;
    }
    run.restart(0, rng).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.unwrap();
        if waiting.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "case {case}: the outbox never drained: {waiting:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_redis_is_clean(redis: &RedisServer, case: u64, closed: &HashMap<usize, Vec<Copy>>) {
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("case{case}:*")).query_async(&mut conn).await.unwrap();
    for key in &keys {
        assert!(!key.contains("outbox:"), "case {case}: {key} left unsettled");
        let Some(id) = key.strip_prefix(&format!("case{case}:{{i")).and_then(|k| k.strip_suffix('}')) else { continue };
        let fields: Vec<String> = redis::cmd("HKEYS").arg(key).query_async(&mut conn).await.unwrap();
        let waiting = PARTS.iter().filter(|(t, _, _)| fields.iter().any(|f| f == t)).count();
        assert!(waiting < PARTS.len(), "case {case}: {key} has every part but did not complete");
        if closed.contains_key(&id.parse::<usize>().unwrap()) {
            assert_eq!(waiting, 0, "case {case}: {key} completed but parts stayed behind: {fields:?}");
        }
    }
}
