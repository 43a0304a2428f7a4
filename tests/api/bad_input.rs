//! Bad input gets a clear error, and the valid items of the same batch are still indexed.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::app::{spawn_app, test_settings};
use crate::support::data::{item, stored_vector, vector, IMAGE, TEXT};
use crate::support::es::EsTarget;
use crate::support::redis_server::RedisServer;

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("errors are JSON");
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_item_is_reported_by_index_and_the_valid_ones_are_indexed() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let app = spawn_app(test_settings(&redis, &es)).await;
    let mut non_number = item("bad-3", TEXT, 384);
    non_number["embedding"][5] = json!("0.5");
    let batch = json!({"embeddings": [
        item("good", TEXT, 384),
        item("bad-1", "EMBEDDINGS_AUDIO", 384),
        item("bad-2", TEXT, 383),
        non_number,
        item("", IMAGE, 512),
        item(&"x".repeat(513), IMAGE, 512),
        item("good", IMAGE, 512),
        {"id": "bad-7", "embedding_type": TEXT},
    ]});
    let response = app.post_json(&batch).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 2);
    let rejected: Vec<(u64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, "unknown_type"),
            (2, "wrong_dims"),
            (3, "not_a_number"),
            (4, "bad_id"),
            (5, "id_too_long"),
            (7, "missing_embedding")
        ]
    );
    let reasons: Vec<&str> =
        body["rejected"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert!(reasons[0].contains("EMBEDDINGS_AUDIO") && reasons[0].contains("EMBEDDINGS_TEXT"), "{}", reasons[0]);
    assert!(reasons[1].contains("384") && reasons[1].contains("383"), "{}", reasons[1]);
    assert!(reasons[2].contains("embedding[5]"), "{}", reasons[2]);

    assert_eq!(es.wait_for_count(1, Duration::from_secs(30)).await, 1);
    let doc = es.doc("good").await.expect("the valid item is indexed").source;
    assert_eq!(stored_vector(&doc, "text_embedding"), vector("good", TEXT, 384, 0));
    assert_eq!(stored_vector(&doc, "image_embedding"), vector("good", IMAGE, 512, 0));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_cannot_be_read_get_a_json_error() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut settings = test_settings(&redis, &es);
    settings.http.max_body_bytes = 64 * 1024;
    settings.http.max_batch_items = 10;
    let app = spawn_app(settings).await;

    assert_eq!(
        error_code(app.post_raw("{\"embeddings\": [", "application/json").await).await,
        (400, "malformed_json".into())
    );
    assert_eq!(
        error_code(app.post_raw("{\"items\": []}", "application/json").await).await,
        (400, "malformed_json".into())
    );
    assert_eq!(
        error_code(app.post_raw("embeddings=1", "application/x-www-form-urlencoded").await).await,
        (400, "unsupported_content_type".into())
    );
    assert_eq!(error_code(app.post_json(&json!({"embeddings": []})).await).await, (400, "empty_batch".into()));
    let big = json!({"embeddings": (0..50).map(|i| item(&format!("b{i}"), TEXT, 384)).collect::<Vec<_>>()});
    assert_eq!(error_code(app.post_json(&big).await).await, (413, "body_too_large".into()));
    let many = json!({"embeddings": (0..11).map(|i| item(&format!("m{i}"), TEXT, 3)).collect::<Vec<_>>()});
    assert_eq!(error_code(app.post_json(&many).await).await, (413, "too_many_items".into()));

    // Nothing valid in the batch: 422 with the reasons, not a 202.
    let response = app.post_json(&json!({"embeddings": [item("z", TEXT, 2)]})).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 0);
    assert_eq!(body["rejected"][0]["code"], "wrong_dims");

    // The service still works after all that.
    let ok = json!({"embeddings": [item("after", TEXT, 384)]});
    assert_eq!(app.post_json(&ok).await.status(), 202);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_alive_and_ready_reports_each_backend() {
    let (mut redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let app = spawn_app(test_settings(&redis, &es)).await;
    let get = |path: &'static str| {
        let (http, address) = (app.http.clone(), app.address.clone());
        async move { http.get(format!("{address}{path}")).send().await.unwrap() }
    };
    assert_eq!(get("/health").await.status(), 200);
    assert_eq!(get("/ready").await.status(), 200);
    redis.kill();
    let response = get("/ready").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["sink"], "ok");
    assert_ne!(body["state"], "ok");
    redis.restart().await;
    assert_eq!(get("/health").await.status(), 200);
    let nope = app.http.get(format!("{}/nope", app.address)).send().await.unwrap();
    assert_eq!(nope.status(), 404);
    app.stop().await.unwrap();
}
