//! Re-embedding runs (`state.late_parts = "update"`, the default): a newer copy of a part
//! for an item already completed and indexed updates that document, that part only, newest
//! wins whatever order the writes arrive in; an id the store no longer remembers starts a
//! new item. Real redis-server; the stand-in, or a real engine that runs painless (the
//! tests skip themselves on one that does not).

use std::time::{Duration, Instant};

use embedjoin::model::Part;
use embedjoin::Pipeline;
use serde_json::{json, Value};

use crate::end_to_end::{records_in_redis, redis_keys};
use crate::support::app::{spawn_app, test_settings, TestApp};
use crate::support::data::{stored_vector, vector, IMAGE, TEXT};
use crate::support::es::{EsTarget, StoredDoc};
use crate::support::load::post_all;
use crate::support::redis_server::{item_key, RedisServer};

const ITEMS: usize = 500;

fn copy(id: &str, kind: &str, dims: usize, n: u32) -> Value {
    json!({"id": id, "embedding_type": kind, "embedding": vector(id, kind, dims, n)})
}

fn has(doc: &StoredDoc, id: &str, kind: &str, n: u32) -> bool {
    let (field, dims) = if kind == TEXT { ("text_embedding", 384) } else { ("image_embedding", 512) };
    doc.source.get(field).is_some() && stored_vector(&doc.source, field) == vector(id, kind, dims, n)
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.http.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Waits until every document satisfies `done`.
async fn wait_for_all(es: &EsTarget, ids: &[String], done: impl Fn(&str, &StoredDoc) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let docs = es.docs(ids).await;
        let left = ids.iter().filter(|id| !docs.get(*id).is_some_and(|d| done(id, d))).count();
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} of {} documents never {what}", ids.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_new_text_vectors_updates_every_document_and_keeps_its_image() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    if es.skip_without_painless("a re-embedding run") {
        return;
    }
    let app = spawn_app(test_settings(&redis, &es)).await;
    let ids: Vec<String> = (0..ITEMS).map(|i| format!("sku-{i}")).collect();
    // Indexed with both parts (text and image in separate requests, as they arrive)...
    let texts: Vec<Vec<Value>> = ids.chunks(50).map(|c| c.iter().map(|id| copy(id, TEXT, 384, 0)).collect()).collect();
    let images: Vec<Vec<Value>> =
        ids.chunks(50).map(|c| c.iter().map(|id| copy(id, IMAGE, 512, 0)).collect()).collect();
    post_all(&[&app], texts, 4).await;
    post_all(&[&app], images, 4).await;
    wait_for_all(&es, &ids, |id, d| has(d, id, TEXT, 0) && has(d, id, IMAGE, 0), "complete").await;
    // ...then a run of a new text encoder: text parts only.
    let run: Vec<Vec<Value>> = ids.chunks(50).map(|c| c.iter().map(|id| copy(id, TEXT, 384, 1)).collect()).collect();
    post_all(&[&app], run, 4).await;
    wait_for_all(&es, &ids, |id, d| has(d, id, TEXT, 1), "took the new text vector").await;

    let docs = es.docs(&ids).await;
    for id in &ids {
        assert!(has(&docs[id], id, IMAGE, 0), "{id}: the image vector stays");
        assert_eq!(docs[id].source.get("incomplete"), None, "{id}: never replaced by an incomplete one");
    }
    assert_eq!(metric(&app, "embedjoin_document_updates_total").await, ITEMS as f64);
    let ended = metric(&app, "embedjoin_documents_ended_total{end=\"updated\"}").await;
    assert_eq!(ended, ITEMS as f64, "every update counted apart from completions");
    let completed = metric(&app, "embedjoin_documents_completed_total").await;
    assert_eq!(completed, ITEMS as f64, "an update is not a completion");
    // `/documents/{id}` says the id is remembered as indexed.
    let status: Value =
        app.http.get(format!("{}/documents/sku-7", app.address)).send().await.unwrap().json().await.unwrap();
    assert!(status["completed_version"].as_u64().is_some(), "{status}");
    assert_eq!(status["awaiting_sink"], false, "{status}");
    app.stop().await.unwrap();
    assert_eq!(redis_keys(&redis).await, Vec::<String>::new(), "nothing left in Redis but the records");
    assert_eq!(records_in_redis(&redis).await, ITEMS, "one record per item");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_parts_sent_to_two_instances_in_either_order_end_with_the_newest() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    if es.skip_without_painless("late parts at two instances") {
        return;
    }
    let mut s = test_settings(&redis, &es);
    for part in &mut s.parts {
        part.dims = 4;
    }
    s.shards.flush_interval = Duration::from_secs(3600); // flushes only when the test says
    s.shards.max_dirty = 1_000_000;
    s.elasticsearch.flush_interval = Duration::from_millis(5);
    let (a, b) = (Pipeline::start(&s).await.unwrap(), Pipeline::start(&s).await.unwrap());
    let part = |id: &str, kind: &str, n: u32| {
        let slot = if kind == TEXT { 0 } else { 1 };
        Part::new(id.to_owned(), slot, vector(id, kind, 4, n), None)
    };
    let small = |doc: &StoredDoc, id: &str, kind: &str, n: u32| {
        let field = if kind == TEXT { "text_embedding" } else { "image_embedding" };
        stored_vector(&doc.source, field) == vector(id, kind, 4, n)
    };
    for id in ["p", "q"] {
        a.router.submit(vec![part(id, TEXT, 0), part(id, IMAGE, 0)]).await.unwrap();
    }
    a.router.flush().await.unwrap();
    let ids = vec!["p".to_owned(), "q".to_owned()];
    wait_for_all(&es, &ids, |_, _| true, "indexed").await;
    // Two copies of TEXT each, stamped in this order: 1 is older than 2.
    let (p1, p2, q1, q2) = (part("p", TEXT, 1), part("p", TEXT, 2), part("q", TEXT, 1), part("q", TEXT, 2));
    let newest = (p2.stamp, q2.stamp);
    // p: the newer copy first (at b), the older one after (at a).
    b.router.submit(vec![p2.clone()]).await.unwrap();
    b.router.flush().await.unwrap();
    a.router.submit(vec![p1]).await.unwrap();
    a.router.flush().await.unwrap();
    // q: the older copy first (at a), the newer one after (at b); then the client retries
    // the newer one at a.
    a.router.submit(vec![q1]).await.unwrap();
    a.router.flush().await.unwrap();
    b.router.submit(vec![q2.clone()]).await.unwrap();
    b.router.flush().await.unwrap();
    a.router.submit(vec![q2, p2]).await.unwrap();
    a.router.flush().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;

    let docs = es.docs(&ids).await;
    for (id, stamp) in [("p", newest.0), ("q", newest.1)] {
        let doc = &docs[id];
        assert!(small(doc, id, TEXT, 2), "{id}: the newest TEXT wins");
        assert!(small(doc, id, IMAGE, 0), "{id}: IMAGE stays");
        assert_eq!(doc.stamp(TEXT), Some(stamp), "{id}: the document records the newest TEXT's stamp");
    }
    assert_eq!(redis_keys(&redis).await, Vec::<String>::new(), "nothing left in Redis but the records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_no_longer_remembered_starts_a_new_item() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    if es.skip_without_painless("an id no longer remembered") {
        return;
    }
    let mut s = test_settings(&redis, &es);
    s.state.remember_completed = Duration::from_millis(300);
    s.shards.flush_interval = Duration::from_millis(20);
    let app = spawn_app(s).await;
    let ids = vec!["r".to_owned()];
    app.post_json(&json!({"embeddings": [copy("r", TEXT, 384, 0), copy("r", IMAGE, 512, 0)]})).await;
    wait_for_all(&es, &ids, |id, d| has(d, id, TEXT, 0), "indexed").await;
    // The record expires with remember_completed (at most 2.25 times it).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.http.get(format!("{}/documents/r", app.address)).send().await.unwrap();
        if r.status() == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "the record never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = redis.connection().await;
    // A newer TEXT now waits for an IMAGE, as for a new item: the document is not touched.
    app.post_json(&json!({"embeddings": [copy("r", TEXT, 384, 1)]})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fields: Vec<String> = redis::cmd("HKEYS").arg(item_key("r")).query_async(&mut conn).await.unwrap();
        if fields.iter().any(|f| f == TEXT) {
            break;
        }
        assert!(Instant::now() < deadline, "the TEXT was never stored as a partial");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(has(&es.doc("r").await.unwrap(), "r", TEXT, 0), "not updated: the id is not remembered");
    assert_eq!(metric(&app, "embedjoin_document_updates_total").await, 0.0);
    // Its IMAGE completes it as a new item, which replaces the document (every part newer).
    app.post_json(&json!({"embeddings": [copy("r", IMAGE, 512, 1)]})).await;
    wait_for_all(&es, &ids, |id, d| has(d, id, TEXT, 1) && has(d, id, IMAGE, 1), "replaced").await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_of_a_deleted_document_starts_a_new_item_never_indexed_alone() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    if es.skip_without_painless("an update of a deleted document") {
        return;
    }
    let mut s = test_settings(&redis, &es);
    s.shards.flush_interval = Duration::from_millis(20);
    // An update waits as long as a lease for its document (its completion may be on its way).
    s.durability.outbox_resend_after = Duration::from_millis(500);
    s.durability.maintenance_interval = Duration::from_millis(100);
    let app = spawn_app(s).await;
    let ids = vec!["gone".to_owned()];
    app.post_json(&json!({"embeddings": [copy("gone", TEXT, 384, 0), copy("gone", IMAGE, 512, 0)]})).await;
    wait_for_all(&es, &ids, |_, _| true, "indexed").await;
    let url = format!("{}/{}/_doc/gone?refresh=true", es.url, es.index);
    assert!(reqwest::Client::new().delete(url).send().await.unwrap().status().is_success());
    app.post_json(&json!({"embeddings": [copy("gone", TEXT, 384, 1)]})).await;
    // The update finds no document: its TEXT waits for an IMAGE, as a new item's would.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&app, "embedjoin_documents_ended_total{end=\"reopened\"}").await < 1.0 {
        assert!(Instant::now() < deadline, "the update was never reopened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status: Value =
        app.http.get(format!("{}/documents/gone", app.address)).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["parts"], json!({TEXT: "store"}), "{status}");
    assert_eq!(status["completed_version"], Value::Null, "no longer remembered as indexed: {status}");
    assert!(es.doc("gone").await.is_none(), "an update never indexes its parts alone");
    // The IMAGE completes it: indexed again, with both new copies.
    app.post_json(&json!({"embeddings": [copy("gone", IMAGE, 512, 1)]})).await;
    wait_for_all(&es, &ids, |id, d| has(d, id, TEXT, 1) && has(d, id, IMAGE, 1), "indexed again").await;
    assert!(redis.dead_letters().await.is_empty());
    app.stop().await.unwrap();
    assert_eq!(redis_keys(&redis).await, Vec::<String>::new());
}
