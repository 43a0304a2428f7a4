//! Nothing acknowledged is lost: Elasticsearch and Redis faults, crashes, shutdowns and
//! overload. Each test prints its figures (sent, acknowledged, indexed, dead-lettered).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::end_to_end::assert_indexed_exactly;
use crate::support::app::{spawn_app, test_settings};
use crate::support::data::{item, IMAGE, TEXT};
use crate::support::es::EsTarget;
use crate::support::load::{post_all, post_until_acknowledged, ClientTally};
use crate::support::process::{service_env, ServiceProcess};
use crate::support::redis_server::RedisServer;

const DIMS: [(&str, usize); 2] = [(TEXT, 384), (IMAGE, 512)];

/// A batch of parts, and which (id, part) pairs it carries.
#[derive(Clone)]
pub(crate) struct Batch {
    items: Vec<Value>,
    parts: Vec<(String, &'static str)>,
}

/// Every part of `ids`, shuffled, in batches: the two parts of an item usually in two.
pub(crate) fn shuffled_batches(ids: &[String], size: usize, seed: u64) -> Vec<Batch> {
    let mut parts: Vec<(String, &'static str, usize)> =
        ids.iter().flat_map(|id| DIMS.iter().map(move |(p, d)| (id.clone(), *p, *d))).collect();
    parts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    parts
        .chunks(size)
        .map(|c| Batch {
            items: c.iter().map(|(id, p, d)| item(id, p, *d)).collect(),
            parts: c.iter().map(|(id, p, _)| (id.clone(), *p)).collect(),
        })
        .collect()
}

/// Ids whose every part was acknowledged.
pub(crate) fn fully_acknowledged(acked: &HashSet<(String, &'static str)>, ids: &[String]) -> Vec<String> {
    ids.iter().filter(|id| DIMS.iter().all(|(p, _)| acked.contains(&((*id).clone(), *p)))).cloned().collect()
}

async fn dead_letters(redis: &RedisServer) -> usize {
    let mut conn = redis.connection().await;
    redis::cmd("LLEN").arg("embedjoin:deadletter").query_async(&mut conn).await.unwrap()
}

/// A load running in the background, and what its clients saw so far.
pub(crate) struct Load {
    pub task: tokio::task::JoinHandle<()>,
    pub acked: Arc<Mutex<HashSet<(String, &'static str)>>>,
    pub tally: Arc<Mutex<ClientTally>>,
}

pub(crate) fn start_load(batches: Vec<Batch>, workers: usize, target: Arc<Mutex<String>>, patience: Duration) -> Load {
    let (acked, tally) = (Arc::default(), Arc::new(Mutex::new(ClientTally::default())));
    let task = tokio::spawn(send_with_retries(batches, workers, target, patience, Arc::clone(&acked), tally.clone()));
    Load { task, acked, tally }
}

/// Sends batches from `workers` concurrent clients to whichever address `target` gives at
/// the time, each batch until acknowledged; records acknowledged parts.
async fn send_with_retries(
    batches: Vec<Batch>,
    workers: usize,
    target: Arc<Mutex<String>>,
    patience: Duration,
    acked: Arc<Mutex<HashSet<(String, &'static str)>>>,
    tally: Arc<Mutex<ClientTally>>,
) {
    let queue = Arc::new(Mutex::new(batches));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (queue, target, acked, tally) = (queue.clone(), target.clone(), acked.clone(), tally.clone());
        tasks.spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let Some(batch) = queue.lock().unwrap().pop() else { return };
                let address = || target.lock().unwrap().clone();
                if post_until_acknowledged(&http, address, &batch.items, patience, &tally).await {
                    acked.lock().unwrap().extend(batch.parts.iter().cloned());
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// Waits until `condition` holds, or panics after `limit`.
pub(crate) async fn until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es_item_rejections_and_request_failures_are_retried_until_all_is_indexed() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    let settings = test_settings(&redis, &es);
    let app = spawn_app(settings).await;
    standin.faults().set_seed(42);
    standin.faults().set_item_429_ratio(0.3);
    standin.faults().set_request_503_ratio(0.1);
    let ids: Vec<String> = (0..10_000).map(|i| format!("f-{i}")).collect();
    let batches: Vec<Vec<Value>> = shuffled_batches(&ids, 100, 1).into_iter().map(|b| b.items).collect();
    let sent = post_all(&[&app], batches, 8).await;

    assert_indexed_exactly(&es, &ids).await;
    let stats = standin.stats();
    let dead = dead_letters(&redis).await;
    eprintln!(
        "es faults: parts sent {sent}, acknowledged {sent}, items indexed {}, dead-lettered {dead}; \
         bulk requests {} ({} failed whole), items rejected 429: {}",
        ids.len(),
        stats.bulk_requests,
        stats.bulk_requests_failed,
        stats.items_failed.get(&429).copied().unwrap_or(0)
    );
    assert!(stats.items_failed.get(&429).copied().unwrap_or(0) > 1000, "the fault was injected");
    assert!(stats.bulk_requests_failed > 0, "the fault was injected");
    assert_eq!(dead, 0, "nothing dead-lettered");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_document_is_dead_lettered_with_its_reason_and_the_rest_indexed() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    let app = spawn_app(test_settings(&redis, &es)).await;
    standin.faults().reject_id("bad-doc", 400, 1);
    let ids: Vec<String> = ["ok-1", "bad-doc", "ok-2"].iter().map(|s| s.to_string()).collect();
    let items: Vec<Value> = ids.iter().flat_map(|id| DIMS.iter().map(move |(p, d)| item(id, p, *d))).collect();
    post_all(&[&app], vec![items], 1).await;
    assert_eq!(es.wait_for_count(2, Duration::from_secs(30)).await, 2);
    let letters = redis.wait_for_dead_letters().await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter["id"], "bad-doc");
    assert!(letter["version"].as_u64().is_some_and(|v| v > 0), "a replay keeps the document's version: {letter}");
    assert_eq!(letter["status"], 400);
    assert!(!letter["reason"].as_str().unwrap().is_empty());
    assert_eq!(letter["document"]["text_embedding"].as_array().unwrap().len(), 384, "the document is kept");
    assert!(es.doc("bad-doc").await.is_none());
    app.stop().await.unwrap();
    let keys = crate::end_to_end::redis_keys(&redis).await;
    assert_eq!(keys, vec!["deadletter".to_owned()], "the dead-lettered item left the outbox");
}

/// Persisted acknowledgements, and Redis timeouts short enough that a dead Redis shows as
/// 503s within a test's patience.
pub(crate) fn persisted_and_quick_to_notice(settings: &mut embedjoin::Settings) {
    settings.durability.ack = embedjoin::config::AckMode::Persisted;
    settings.durability.ack_timeout = Duration::from_secs(2);
    settings.durability.enqueue_timeout = Duration::from_millis(500);
    settings.redis.response_timeout = Duration::from_millis(500);
    settings.redis.connection_timeout = Duration::from_millis(300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_loses_no_acknowledged_part_in_persisted_mode() {
    let (mut redis, es) = (RedisServer::start_with(true).await, EsTarget::start().await);
    let mut settings = test_settings(&redis, &es);
    persisted_and_quick_to_notice(&mut settings);
    let app = spawn_app(settings).await;
    let ids: Vec<String> = (0..3_000).map(|i| format!("r-{i}")).collect();
    let batches = shuffled_batches(&ids, 50, 2);
    let total = batches.len();
    let load = start_load(batches, 4, Arc::new(Mutex::new(app.address.clone())), Duration::from_secs(90));
    let (acked, tally) = (load.acked.clone(), load.tally.clone());
    until(Duration::from_secs(60), "a third of the load acknowledged", || {
        tally.lock().unwrap().acknowledged >= total / 3
    })
    .await;
    redis.kill();
    until(Duration::from_secs(30), "clients see 503 while Redis is down", || tally.lock().unwrap().unavailable > 0)
        .await;
    redis.restart().await;
    load.task.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    let complete = fully_acknowledged(&acked, &ids);
    let tally = tally.lock().unwrap().clone();
    assert_eq!(complete.len(), ids.len(), "every batch was acknowledged in the end: {tally:?}");
    assert_indexed_exactly(&es, &complete).await;
    let dead = dead_letters(&redis).await;
    eprintln!(
        "redis killed: batches {total}, acknowledged {}, 503s seen {}, items acknowledged {}, indexed {}, dead-lettered {dead}",
        tally.acknowledged,
        tally.unavailable,
        complete.len(),
        es.count().await
    );
    assert_eq!(dead, 0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_every_acknowledged_item_recoverable_by_the_next() {
    let (redis, es) = (RedisServer::start_with(true).await, EsTarget::start().await);
    let env = service_env(
        &redis.url(),
        &es,
        &[
            ("EMBEDJOIN__DURABILITY__ACK", "persisted"),
            ("EMBEDJOIN__DURABILITY__OUTBOX_RESEND_AFTER", "1s"),
            ("EMBEDJOIN__DURABILITY__MAINTENANCE_INTERVAL", "200ms"),
        ],
    );
    let mut first = ServiceProcess::start(&env).await;
    let ids: Vec<String> = (0..3_000).map(|i| format!("k-{i}")).collect();
    let batches = shuffled_batches(&ids, 50, 3);
    let total = batches.len();
    let target = Arc::new(Mutex::new(first.address.clone()));
    let load = start_load(batches, 4, target.clone(), Duration::from_secs(90));
    let (acked, tally) = (load.acked.clone(), load.tally.clone());
    until(Duration::from_secs(60), "half of the load acknowledged", || tally.lock().unwrap().acknowledged >= total / 2)
        .await;
    first.kill();
    let acked_at_crash = fully_acknowledged(&acked.lock().unwrap(), &ids);
    let second = ServiceProcess::start(&env).await;
    *target.lock().unwrap() = second.address.clone();
    load.task.await.unwrap();

    // Everything acknowledged before the crash is indexed, then everything else too.
    assert_indexed_exactly(&es, &ids).await;
    let dead = dead_letters(&redis).await;
    let tally = tally.lock().unwrap().clone();
    eprintln!(
        "instance killed: batches {total}, acknowledged {}, failed without answer {} (retried), items fully \
         acknowledged at the crash {}, indexed {}, dead-lettered {dead}",
        tally.acknowledged,
        tally.no_answer,
        acked_at_crash.len(),
        es.count().await
    );
    assert_eq!(dead, 0);
    second.terminate(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_exits_cleanly_and_keeps_everything_acknowledged() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let env = service_env(&redis.url(), &es, &[]);
    let service = ServiceProcess::start(&env).await;
    // Both parts of an item in one batch, so acknowledged items are complete ones.
    let ids: Vec<String> = (0..4_000).map(|i| format!("t-{i}")).collect();
    let batches: Vec<Batch> = ids
        .chunks(25)
        .map(|chunk| Batch {
            items: chunk.iter().flat_map(|id| DIMS.iter().map(move |(p, d)| item(id, p, *d))).collect(),
            parts: chunk.iter().flat_map(|id| DIMS.iter().map(move |(p, _)| (id.clone(), *p))).collect(),
        })
        .collect();
    let total = batches.len();
    let load = start_load(batches, 4, Arc::new(Mutex::new(service.address.clone())), Duration::from_millis(500));
    let (acked, tally) = (load.acked.clone(), load.tally.clone());
    until(Duration::from_secs(60), "a third of the load acknowledged", || {
        tally.lock().unwrap().acknowledged >= total / 3
    })
    .await;
    let status = service.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "exit status {status}");
    load.task.await.unwrap();

    let complete = fully_acknowledged(&acked.lock().unwrap(), &ids);
    assert!(!complete.is_empty());
    let indexed = es.docs(&complete).await;
    let tally = tally.lock().unwrap().clone();
    eprintln!(
        "sigterm: batches {total}, acknowledged {}, items acknowledged {}, of them indexed {}",
        tally.acknowledged,
        complete.len(),
        indexed.len()
    );
    assert_eq!(indexed.len(), complete.len(), "every acknowledged item is indexed after a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_503_keeps_memory_capped_and_loses_nothing_acknowledged() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    let mut settings = test_settings(&redis, &es);
    settings.shards.count = 2;
    settings.shards.mailbox_capacity = 4;
    settings.shards.max_resident_bytes = 2 * 1024 * 1024;
    settings.durability.enqueue_timeout = Duration::from_millis(50);
    settings.elasticsearch.requests_in_flight = 1;
    settings.elasticsearch.bulk_max_docs = 20;
    let app = spawn_app(settings.clone()).await;
    standin.faults().set_latency(Duration::from_millis(300));
    let ids: Vec<String> = (0..2_000).map(|i| format!("o-{i}")).collect();
    let batches = shuffled_batches(&ids, 50, 4);
    let total = batches.len();

    // A client far faster than Elasticsearch: no retries while loading.
    let http = reqwest::Client::new();
    let mut refused = Vec::new();
    let mut accepted = 0;
    let metrics_url = format!("{}/metrics", app.address);
    let mut peak_resident = 0f64;
    for chunk in batches.chunks(8) {
        let answers = futures_util::future::join_all(chunk.iter().map(|b| {
            http.post(format!("{}/aggregate/", app.address)).json(&serde_json::json!({"embeddings": b.items})).send()
        }))
        .await;
        for (batch, answer) in chunk.iter().zip(answers) {
            match answer.unwrap().status().as_u16() {
                202 => accepted += 1,
                503 => refused.push(batch.clone()),
                other => panic!("unexpected status {other}"),
            }
        }
        let text = http.get(&metrics_url).send().await.unwrap().text().await.unwrap();
        peak_resident = peak_resident.max(metric(&text, "embedjoin_partial_bytes_resident"));
    }
    eprintln!("overload: batches {total}, accepted {accepted}, refused with 503 {}, peak resident partial bytes {peak_resident}", refused.len());
    assert!(!refused.is_empty(), "overload turns into 503s");
    let slack = 8.0 * 50.0 * 512.0 * 4.0; // one round of requests admitted at once
    assert!(peak_resident <= settings.shards.max_resident_bytes as f64 + slack, "resident {peak_resident}");

    // Load stops, Elasticsearch recovers: the refused batches are sent again.
    standin.faults().set_latency(Duration::ZERO);
    let tally = Mutex::new(ClientTally::default());
    for batch in &refused {
        assert!(
            post_until_acknowledged(&http, || app.address.clone(), &batch.items, Duration::from_secs(60), &tally).await
        );
    }
    assert_indexed_exactly(&es, &ids).await;
    app.stop().await.unwrap();
}

/// A value from a Prometheus text exposition.
pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_with_duplicates_index_every_item_with_its_vectors() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut apps = Vec::new();
    for _ in 0..4 {
        let mut settings = test_settings(&redis, &es);
        settings.shards.count = 2;
        settings.http.workers = 1;
        apps.push(spawn_app(settings).await);
    }
    let ids: Vec<String> = (0..2_000).map(|i| format!("q-{i}")).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut parts: Vec<Value> = ids.iter().flat_map(|id| DIMS.iter().map(move |(p, d)| item(id, p, *d))).collect();
    let again: Vec<Value> = parts.iter().filter(|_| rand::Rng::random_bool(&mut rng, 0.25)).cloned().collect();
    let duplicates = again.len();
    parts.extend(again);
    parts.shuffle(&mut rng);
    let batches: Vec<Vec<Value>> = parts.chunks(40).map(<[Value]>::to_vec).collect();
    let refs: Vec<&crate::support::app::TestApp> = apps.iter().collect();
    let sent = post_all(&refs, batches, 8).await;

    let writes = assert_indexed_exactly(&es, &ids).await;
    eprintln!(
        "four instances: parts sent {sent} ({duplicates} duplicates), items indexed {}, index writes {writes}",
        ids.len()
    );
    for app in apps {
        app.stop().await.unwrap();
    }
    assert_eq!(crate::end_to_end::complete_items_left_in_redis(&redis).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_indexed_incomplete_or_dead_lettered_as_configured() {
    use embedjoin::config::OrphanAction;
    for action in [OrphanAction::Index, OrphanAction::DeadLetter] {
        let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
        let mut settings = test_settings(&redis, &es);
        settings.redis.partial_ttl = Duration::from_secs(1);
        settings.durability.maintenance_interval = Duration::from_millis(100);
        settings.durability.orphans = action;
        let app = spawn_app(settings).await;
        post_all(&[&app], vec![vec![item("lonely", TEXT, 384)]], 1).await;
        match action {
            OrphanAction::Index => {
                assert_eq!(es.wait_for_count(1, Duration::from_secs(30)).await, 1);
                let doc = es.doc("lonely").await.unwrap().source;
                assert_eq!(doc["incomplete"], true);
                assert_eq!(doc["missing_parts"], serde_json::json!([IMAGE]));
                assert_eq!(doc["text_embedding"].as_array().unwrap().len(), 384);
                assert!(doc.get("image_embedding").is_none());
            }
            _ => {
                let deadline = Instant::now() + Duration::from_secs(30);
                while dead_letters(&redis).await == 0 {
                    assert!(Instant::now() < deadline, "the orphan was never dead-lettered");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert_eq!(es.count().await, 0);
            }
        }
        let text = app.http.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
        assert_eq!(metric(&text, "embedjoin_orphans_expired_total"), 1.0, "{action:?}");
        app.stop().await.unwrap();
        assert!(crate::end_to_end::redis_keys(&redis).await.iter().all(|k| !k.contains("{lonely}")));
    }
}
