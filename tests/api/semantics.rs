//! The join's semantics, one test per way it used to break (issue "One completion per
//! item, the newest parts win, and the index never goes back"): a real redis-server, the
//! pipeline driven part by part with explicit flushes, and the Elasticsearch stand-in (or
//! a real engine where no fault injection is needed).

use std::time::{Duration, Instant};

use embedjoin::config::{LatePartsAction, OrphanAction};
use embedjoin::model::{Metadata, Part};
use embedjoin::{Pipeline, Settings};
use serde_json::{json, Value};

use crate::end_to_end::redis_keys;
use crate::support::app::test_settings;
use crate::support::data::{stored_vector, vector, IMAGE, TEXT};
use crate::support::es::{EsTarget, StoredDoc};
use crate::support::proxy::Proxy;
use crate::support::redis_server::{item_key, keys, RedisServer};

const DIMS: usize = 8;

/// Small parts, and flushes only when the test says.
fn settings(redis: &RedisServer, es: &EsTarget) -> Settings {
    let mut s = test_settings(redis, es);
    for part in &mut s.parts {
        part.dims = DIMS;
    }
    s.shards.count = 2;
    s.shards.flush_interval = Duration::from_secs(3600);
    s.shards.max_dirty = 1_000_000;
    s.elasticsearch.flush_interval = Duration::from_millis(5);
    s
}

fn part(id: &str, kind: &str, copy: u32, metadata: Option<Value>) -> Part {
    let slot = if kind == TEXT { 0 } else { 1 };
    let metadata: Option<Metadata> = metadata.and_then(|m| m.as_object().cloned());
    Part::new(id.to_owned(), slot, vector(id, kind, DIMS, copy), metadata)
}

/// Waits until the document of `id` satisfies `done`; returns it.
async fn wait_for_doc(es: &EsTarget, id: &str, done: impl Fn(&StoredDoc) -> bool) -> StoredDoc {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(doc) = es.doc(id).await.filter(|d| done(d)) {
            return doc;
        }
        assert!(Instant::now() < deadline, "{id} never reached the expected state: {:?}", es.doc(id).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn has_copy(doc: &StoredDoc, id: &str, kind: &str, copy: u32) -> bool {
    let field = if kind == TEXT { "text_embedding" } else { "image_embedding" };
    stored_vector(&doc.source, field) == vector(id, kind, DIMS, copy)
}

fn metric(pipeline: &Pipeline, name: &str) -> f64 {
    let text = pipeline.metrics.render();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_never_comes_back_after_a_completion_in_memory() {
    for late_parts in [LatePartsAction::NewItem, LatePartsAction::Update] {
        let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
        if late_parts == LatePartsAction::Update && es.skip_without_painless("a stale copy (update)") {
            continue;
        }
        let mut s = settings(&redis, &es);
        s.state.late_parts = late_parts;
        let pipeline = Pipeline::start(&s).await.unwrap();
        pipeline.router.submit(vec![part("x", TEXT, 1, None)]).await.unwrap();
        pipeline.router.flush().await.unwrap(); // Redis holds TEXT v1; memory evicts it
                                                // A client retrying after a 503 sends both parts again, TEXT newer.
        pipeline.router.submit(vec![part("x", TEXT, 2, None), part("x", IMAGE, 0, None)]).await.unwrap();
        wait_for_doc(&es, "x", |d| has_copy(d, "x", TEXT, 2)).await;
        pipeline.router.flush().await.unwrap();
        assert_eq!(redis_keys(&redis).await, Vec::<String>::new(), "nothing of x stays behind as a partial");
        // IMAGE again: it must not complete from the stale TEXT v1.
        pipeline.router.submit(vec![part("x", IMAGE, 1, None)]).await.unwrap();
        pipeline.router.flush().await.unwrap();
        pipeline.shutdown().await;
        let doc = es.doc("x").await.unwrap();
        assert!(has_copy(&doc, "x", TEXT, 2), "the index never goes back to TEXT v1");
        if late_parts == LatePartsAction::NewItem {
            // It waits for a TEXT newer than the completed one.
            assert_eq!(redis_keys(&redis).await, vec!["i:x".to_owned(), "partials".to_owned()]);
        } else {
            // It updated the document; only the record stays.
            assert!(has_copy(&doc, "x", IMAGE, 1), "the newer IMAGE updated the document");
            assert_eq!(redis_keys(&redis).await, Vec::<String>::new(), "only the record stays");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_whose_reply_was_lost_completes_once_and_leaves_no_orphan() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let upstream = redis.url().trim_start_matches("redis://").parse().unwrap();
    let proxy = Proxy::start(upstream).await;
    let mut s = settings(&redis, &es);
    s.redis.url = proxy.redis_url();
    // The completion the lost reply carried waits in the outbox; its lease lapses fast here.
    s.durability.outbox_resend_after = Duration::from_millis(400);
    s.durability.maintenance_interval = Duration::from_secs(3600); // quiet: the flush is alone
    let pipeline = Pipeline::start(&s).await.unwrap();
    pipeline.router.submit(vec![part("x", TEXT, 0, None)]).await.unwrap();
    pipeline.router.flush().await.unwrap();
    // The merge of x (its keys name x's outbox), not another script call, such as the
    // maintenance's sweep of records.
    let keys = keys();
    proxy.lose_reply_to(keys.outbox(keys.bucket("x"), "x").as_bytes());
    pipeline.router.submit(vec![part("x", IMAGE, 0, None)]).await.unwrap();
    pipeline.router.flush().await.unwrap(); // applied by Redis; the reply is lost
    assert_eq!(proxy.replies_lost(), 1);
    // The shard kept the part and merges it again (at the latest at shutdown): a no-op.
    pipeline.shutdown().await;
    // No partial was left to expire later as an orphan (and be indexed over the document
    // with `orphans = "index"`): only the completion, waiting in the outbox.
    let left = redis_keys(&redis).await;
    assert_eq!(left, vec!["o:x".to_owned(), "outbox".to_owned()]);
    // Any instance resends it once its lease lapses.
    s.durability.maintenance_interval = Duration::from_millis(100);
    let again = Pipeline::start(&s).await.unwrap();
    let doc = wait_for_doc(&es, "x", |_| true).await;
    assert!(has_copy(&doc, "x", TEXT, 0) && has_copy(&doc, "x", IMAGE, 0));
    again.shutdown().await;
    assert_eq!(es.doc("x").await.unwrap().seq_no, 0, "written once");
    assert_eq!(redis_keys(&redis).await, Vec::<String>::new(), "nothing left but the record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_completion_is_superseded_never_indexed_over_a_newer_one() {
    for late_parts in [LatePartsAction::NewItem, LatePartsAction::Update] {
        let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
        if late_parts == LatePartsAction::Update && es.skip_without_painless("an older completion (update)") {
            continue;
        }
        let mut s = settings(&redis, &es);
        s.state.late_parts = late_parts;
        let pipeline = Pipeline::start(&s).await.unwrap();
        let (text, image) = (part("x", TEXT, 1, None), part("x", IMAGE, 1, None));
        // A newer completion of x already won in the index (another instance, a resend).
        let newer_stamp = image.stamp + 1;
        let newer = json!({"id": "x", "text_embedding": vector("x", TEXT, DIMS, 9), "image_embedding": vector("x", IMAGE, DIMS, 9),
                           "_parts": {TEXT: newer_stamp, IMAGE: newer_stamp}});
        es.put_versioned("x", &newer, newer_stamp).await;
        pipeline.router.submit(vec![text, image]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(&pipeline, "embedjoin_documents_ended_total{end=\"superseded\"}") < 1.0 {
            assert!(Instant::now() < deadline, "the older completion was never settled ({late_parts:?})");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pipeline.shutdown().await;
        let doc = es.doc("x").await.unwrap();
        assert!(has_copy(&doc, "x", TEXT, 9), "the newer document stays ({late_parts:?})");
        assert!(has_copy(&doc, "x", IMAGE, 9), "the newer document stays ({late_parts:?})");
        assert!(redis.dead_letters().await.is_empty(), "a version conflict is not a dead letter");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_sent_again_without_metadata_has_none_in_memory_and_in_the_store() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let pipeline = Pipeline::start(&settings(&redis, &es)).await.unwrap();
    let tagged = || Some(json!({"title": "old"}));
    // In memory.
    pipeline
        .router
        .submit(vec![part("m", TEXT, 0, tagged()), part("m", TEXT, 1, None), part("m", IMAGE, 0, None)])
        .await
        .unwrap();
    // Through the store.
    pipeline.router.submit(vec![part("s", TEXT, 0, tagged())]).await.unwrap();
    pipeline.router.flush().await.unwrap();
    pipeline.router.submit(vec![part("s", TEXT, 1, None)]).await.unwrap();
    pipeline.router.flush().await.unwrap();
    pipeline.router.submit(vec![part("s", IMAGE, 0, None)]).await.unwrap();
    pipeline.router.flush().await.unwrap();
    pipeline.shutdown().await;
    for id in ["m", "s"] {
        let doc = es.doc(id).await.unwrap();
        assert!(has_copy(&doc, id, TEXT, 1), "{id}: the newer copy");
        assert_eq!(doc.source.get("title"), None, "{id}: its metadata went with the older copy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_orphan_is_dead_lettered_with_its_id_and_the_others_are_swept() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut conn = redis.connection().await;
    // A partial stored when the configured dims were different: 3 floats, not 8.
    let _: () = redis::cmd("HSET")
        .arg(item_key("bad"))
        .arg(TEXT)
        .arg(vec![0u8; 12])
        .arg(format!("s:{TEXT}"))
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(keys().partial_index(keys().bucket("bad")))
        .arg(0)
        .arg("bad")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut s = settings(&redis, &es);
    s.durability.orphans = OrphanAction::Index;
    s.durability.maintenance_interval = Duration::from_millis(100);
    s.redis.partial_ttl = Duration::from_millis(300);
    let pipeline = Pipeline::start(&s).await.unwrap();
    pipeline.router.submit(vec![part("good", TEXT, 0, None)]).await.unwrap();
    pipeline.router.flush().await.unwrap();
    let doc = wait_for_doc(&es, "good", |_| true).await;
    assert_eq!(doc.source["incomplete"], true, "the readable orphan went through as configured");
    let letters = redis.wait_for_dead_letters().await;
    pipeline.shutdown().await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!((letter["id"].as_str(), letter["error_type"].as_str()), (Some("bad"), Some("unreadable")));
    assert!(letter["reason"].as_str().unwrap().contains("12 bytes"), "{letter}");
    assert!(es.doc("bad").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_delivery_is_not_resent_by_other_instances_while_it_is_alive() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    let mut s = settings(&redis, &es);
    s.durability.outbox_resend_after = Duration::from_millis(400);
    s.durability.maintenance_interval = Duration::from_millis(100);
    let (a, b) = (Pipeline::start(&s).await.unwrap(), Pipeline::start(&s).await.unwrap());
    let ids: Vec<String> = (0..50).map(|i| format!("slow-{i}")).collect();
    standin.faults().pause();
    // Parts split across the instances: every item completes in the store, leased to the
    // instance whose flush completed it.
    a.router.submit(ids.iter().map(|id| part(id, TEXT, 0, None)).collect()).await.unwrap();
    a.router.flush().await.unwrap();
    b.router.submit(ids.iter().map(|id| part(id, IMAGE, 0, None)).collect()).await.unwrap();
    b.router.flush().await.unwrap();
    // Several leases long: the deliveries are alive (held by the sink), so nobody resends.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    standin.faults().resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while es.count().await < ids.len() {
        assert!(Instant::now() < deadline, "not every item was indexed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resent = metric(&a, "embedjoin_outbox_resent_total") + metric(&b, "embedjoin_outbox_resent_total");
    a.shutdown().await;
    b.shutdown().await;
    assert_eq!(resent, 0.0, "no copy was resent while its delivery was alive");
    let writes = es.docs(&ids).await.values().map(|d| d.seq_no + 1).max().unwrap();
    assert_eq!(writes, ids.len() as u64, "each document written once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_part_that_finds_no_partner_is_never_indexed_over_its_complete_document() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut s = settings(&redis, &es);
    s.state.late_parts = LatePartsAction::NewItem; // with updates, the part updates its document
    s.durability.orphans = OrphanAction::Index;
    s.durability.maintenance_interval = Duration::from_millis(100);
    s.redis.partial_ttl = Duration::from_millis(300);
    let pipeline = Pipeline::start(&s).await.unwrap();
    pipeline.router.submit(vec![part("late", TEXT, 0, None), part("late", IMAGE, 0, None)]).await.unwrap();
    wait_for_doc(&es, "late", |_| true).await;
    pipeline.router.flush().await.unwrap(); // the completion is recorded
                                            // A newer TEXT after the completion; no IMAGE follows.
    pipeline.router.submit(vec![part("late", TEXT, 1, None)]).await.unwrap();
    pipeline.router.flush().await.unwrap();
    let letters = redis.wait_for_dead_letters().await;
    pipeline.shutdown().await;
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0]["id"].as_str(), letters[0]["error_type"].as_str()), (Some("late"), Some("incomplete")));
    assert!(letters[0]["reason"].as_str().unwrap().contains("came after the item was completed"), "{}", letters[0]);
    let doc = es.doc("late").await.unwrap();
    assert_eq!(doc.source.get("incomplete"), None, "the complete document stays");
    assert!(has_copy(&doc, "late", TEXT, 0) && has_copy(&doc, "late", IMAGE, 0));
}
