//! A busy, absent or misconfigured cluster is backpressure, never a dead letter; no input
//! poisons a batch; shutdown always ends (issue "An Elasticsearch outage or overload never
//! loses or dead-letters good documents"). Real redis-server, the stand-in's faults, the
//! default retry settings (only the backoff is shortened, so the tests run in seconds).

use std::time::{Duration, Instant};

use embedjoin::model::Part;
use embedjoin::Pipeline;
use serde_json::{json, Value};

use crate::end_to_end::assert_indexed_exactly;
use crate::support::app::{spawn_app, test_settings};
use crate::support::data::{item, vector, IMAGE, TEXT};
use crate::support::es::EsTarget;
use crate::support::load::post_all;
use crate::support::redis_server::RedisServer;

fn both_parts(ids: &[String]) -> Vec<Vec<Value>> {
    let items: Vec<Value> = ids.iter().flat_map(|id| [item(id, TEXT, 384), item(id, IMAGE, 512)]).collect();
    items.chunks(100).map(<[Value]>::to_vec).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_longer_than_any_retry_budget_dead_letters_nothing() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    let settings = test_settings(&redis, &es);
    assert_eq!(settings.elasticsearch.retry_for, None, "the default: retry until taken");
    let app = spawn_app(settings).await;
    standin.faults().set_item_429_ratio(1.0);
    let ids: Vec<String> = (0..500).map(|i| format!("storm-{i}")).collect();
    post_all(&[&app], both_parts(&ids), 4).await;
    // Every item refused, again and again, for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    while standin.stats().items_failed.get(&429).copied().unwrap_or(0) < 5 * ids.len() as u64 {
        assert!(Instant::now() < deadline, "the storm never reached five refusals per document");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(es.count().await, 0);
    let refused = standin.stats().items_failed.get(&429).copied().unwrap_or(0);
    standin.faults().set_item_429_ratio(0.0);
    assert_indexed_exactly(&es, &ids).await;
    eprintln!("429 storm: {} documents refused {refused} times in all, then every one indexed", ids.len());
    app.stop().await.unwrap();
    assert!(redis.dead_letters().await.is_empty(), "busy is not wrong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_across_sigterm_ends_within_the_deadline_and_the_next_start_indexes_everything() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    let mut settings = test_settings(&redis, &es);
    settings.durability.shutdown_deadline = Duration::from_secs(2);
    let app = spawn_app(settings.clone()).await;
    standin.faults().set_unavailable(true);
    let ids: Vec<String> = (0..300).map(|i| format!("outage-{i}")).collect();
    post_all(&[&app], both_parts(&ids), 4).await; // complete in memory: nowhere else yet
    let started = Instant::now();
    app.stop().await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?} with a 2 s deadline");
    eprintln!("outage across SIGTERM: shutdown took {took:?} with a 2 s deadline");
    assert_eq!(standin.doc_count(&es.index), 0, "nothing could be indexed");
    standin.faults().set_unavailable(false);
    let again = spawn_app(settings).await;
    assert_indexed_exactly(&es, &ids).await;
    again.stop().await.unwrap();
    assert!(redis.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_document_over_the_body_limit_is_dead_lettered_alone() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    standin.set_max_content_length(1 << 20); // as some hosted clusters
    let mut settings = test_settings(&redis, &es);
    settings.elasticsearch.flush_interval = Duration::from_millis(200); // one batch
    let pipeline = Pipeline::start(&settings).await.unwrap();
    let ids: Vec<String> = (0..100).map(|i| format!("b-{i}")).collect();
    let big: serde_json::Map<String, Value> = json!({"blob": "x".repeat(2 << 20)}).as_object().cloned().unwrap();
    let parts: Vec<Part> = ids
        .iter()
        .flat_map(|id| {
            let meta = (id == "b-42").then(|| big.clone());
            [
                Part::new(id.clone(), 0, vector(id, TEXT, 384, 0), meta),
                Part::new(id.clone(), 1, vector(id, IMAGE, 512, 0), None),
            ]
        })
        .collect();
    pipeline.router.submit(parts).await.unwrap();
    let others: Vec<String> = ids.iter().filter(|id| *id != "b-42").cloned().collect();
    assert_indexed_exactly(&es, &others).await;
    let letters = redis.wait_for_dead_letters().await;
    let metrics = pipeline.metrics.render();
    pipeline.shutdown().await;
    assert_eq!(letters.len(), 1, "only the oversized document");
    assert_eq!((letters[0]["id"].as_str(), letters[0]["error_type"].as_str()), (Some("b-42"), Some("too_large")));
    assert!(
        metrics.contains("embedjoin_bulk_requests_total{status=\"413\"}"),
        "the cluster refused a whole body first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_stalls_delivery_and_ready_says_why_until_the_cluster_accepts_again() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    let app = spawn_app(test_settings(&redis, &es)).await;
    standin.faults().reject_next_bulk(1_000_000, 401);
    let ids: Vec<String> = (0..200).map(|i| format!("auth-{i}")).collect();
    post_all(&[&app], both_parts(&ids), 4).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let r = app.http.get(format!("{}/ready", app.address)).send().await.unwrap();
        let (status, body): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "/ready never said the delivery stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(ready["sink"].as_str().unwrap().contains("delivery stalled: status 401"), "{ready}");
    let metrics = app.http.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("embedjoin_sink_stalled 1"), "the stall is a metric");
    standin.faults().reset();
    assert_indexed_exactly(&es, &ids).await;
    let r = app.http.get(format!("{}/ready", app.address)).send().await.unwrap();
    assert_eq!(r.status(), 200, "ready again once the cluster accepts");
    app.stop().await.unwrap();
    assert!(redis.dead_letters().await.is_empty(), "a misconfiguration is not a dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_index_whose_mapping_disagrees_is_a_clear_start_up_error() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mapping = json!({"mappings": {"properties": {
        "text_embedding": {"type": "dense_vector", "dims": 384, "index": false},
        "image_embedding": {"type": "dense_vector", "dims": 256, "index": false}
    }}});
    let url = format!("{}/{}", es.url, es.index);
    let r = reqwest::Client::new().put(url).json(&mapping).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let settings = test_settings(&redis, &es);
    let error = match Pipeline::start(&settings).await {
        Ok(_) => panic!("a disagreeing mapping must stop the start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("`image_embedding` (part EMBEDDINGS_IMAGE) has 256 dimensions in the index, 512 configured"),
        "{error}"
    );
    assert!(!error.contains("text_embedding"), "only what disagrees is named: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_waiting_for_a_stuck_sink_count_against_the_memory_cap() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: needs the stand-in's fault injection") };
    let mut settings = test_settings(&redis, &es);
    let cap = 2 << 20;
    settings.shards.max_resident_bytes = cap;
    let app = spawn_app(settings).await;
    standin.faults().pause(); // the sink takes nothing: complete documents pile up
    let gauge = |text: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with("embedjoin_document_bytes_resident ")).expect("the gauge");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (mut accepted, mut peak, mut refused) = (Vec::new(), 0.0f64, false);
    for round in 0..200 {
        // Both parts of 25 items per request: they complete in memory, never as partials.
        let ids: Vec<String> = (0..25).map(|i| format!("held-{round}-{i}")).collect();
        let r = app.post_json(&json!({"embeddings": both_parts(&ids).concat()})).await;
        let metrics = app.http.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
        peak = peak.max(gauge(&metrics));
        if r.status() == 503 {
            refused = true;
            break;
        }
        assert_eq!(r.status(), 202);
        accepted.extend(ids);
    }
    assert!(refused, "ingress shed load before the documents held exceeded the cap");
    // One request's documents may land after the last check: about 270 KB here.
    assert!(peak < (cap + (512 << 10)) as f64, "held {peak} bytes with a cap of {cap}");
    standin.faults().resume();
    assert_indexed_exactly(&es, &accepted).await;
    app.stop().await.unwrap();
}
