//! Bad input gets a clear error, and the valid items of the same batch are still indexed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_elasticsearch_would_refuse_is_rejected_per_item_in_json_and_msgpack() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut settings = test_settings(&redis, &es);
    settings.http.max_metadata_bytes = 4096;
    let app = spawn_app(settings).await;
    let with_meta = |id: &str, metadata: Value| {
        let mut i = item(id, IMAGE, 512);
        i["metadata"] = metadata;
        i
    };
    let mut deep = json!("leaf");
    for _ in 0..21 {
        deep = json!({ "k": deep });
    }
    let items = |prefix: &str| {
        let id = |n: &str| format!("{prefix}{n}");
        vec![
            item(&id("good"), TEXT, 384),
            json!({"id": id("zero"), "embedding_type": TEXT, "embedding": vec![0.0f32; 384]}),
            json!({"id": id("tiny"), "embedding_type": TEXT, "embedding": vec![1e-50; 384]}),
            with_meta(&id("m1"), json!({"_id": "other"})),
            with_meta(&id("m2"), json!({"_routing": "r"})),
            with_meta(&id("m3"), json!({"": 1})),
            with_meta(&id("m4"), json!({"text_embedding.x": 1})),
            with_meta(&id("m5"), deep.clone()),
            with_meta(&id("m6"), json!({"blob": "x".repeat(5000)})),
            with_meta(&id("good"), json!({"lang": "en", "tags.main": "shoe"})),
        ]
    };
    let expected = vec![
        (1, "zero_vector"),
        (2, "zero_vector"),
        (3, "bad_metadata"),
        (4, "bad_metadata"),
        (5, "bad_metadata"),
        (6, "bad_metadata"),
        (7, "metadata_too_deep"),
        (8, "metadata_too_large"),
    ];
    let codes = |body: &Value| -> Vec<(u64, String)> {
        body["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap().to_owned()))
            .collect()
    };
    let expected: Vec<(u64, String)> = expected.into_iter().map(|(i, c)| (i, c.to_owned())).collect();

    let response = app.post_json(&json!({ "embeddings": items("j-") })).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!((body["accepted"].as_u64(), codes(&body)), (Some(2), expected.clone()));
    let m4 = &body["rejected"][5]["reason"];
    assert!(m4.as_str().unwrap().contains("text_embedding"), "the reason names the field: {m4}");

    let msgpack = rmp_serde::to_vec_named(&json!({ "embeddings": items("m-") })).unwrap();
    let response = app.post_raw(msgpack, "application/msgpack").await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!((body["accepted"].as_u64(), codes(&body)), (Some(2), expected));

    // The valid items of both batches were indexed; the rest never reached the sink.
    assert_eq!(es.wait_for_count(2, Duration::from_secs(30)).await, 2);
    let doc = es.doc("j-good").await.expect("the valid item is indexed").source;
    assert_eq!(doc["lang"], "en");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_product_takes_only_unit_vectors() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut settings = test_settings(&redis, &es);
    settings.elasticsearch.similarity = embedjoin::config::Similarity::DotProduct;
    let app = spawn_app(settings).await;
    let unit = |v: Vec<f32>| {
        let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|x| (*x as f64 / norm) as f32).collect::<Vec<f32>>()
    };
    let batch = json!({"embeddings": [
        {"id": "u", "embedding_type": TEXT, "embedding": unit(vector("u", TEXT, 384, 0))},
        {"id": "u", "embedding_type": IMAGE, "embedding": unit(vector("u", IMAGE, 512, 0))},
        item("raw", TEXT, 384),
    ]});
    let response = app.post_json(&batch).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["rejected"][0]["code"], "not_unit_length");
    assert_eq!(es.wait_for_count(1, Duration::from_secs(30)).await, 1, "the stand-in takes what ingress took");
    app.stop().await.unwrap();
}

/// A client that sends the headers of a 1 MB body, then one byte a second; returns the
/// answer's status and body and when it came, once the server has closed the connection.
async fn slow_client(address: String, sending: Arc<Barrier>) -> (u16, Value, Duration) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let started = Instant::now();
    let head = "POST /aggregate/ HTTP/1.1\r\nHost: embedjoin\r\nContent-Type: application/json\r\n\
                Content-Length: 1000000\r\n\r\n{";
    stream.write_all(head.as_bytes()).await.unwrap();
    sending.wait().await;
    let mut drip = tokio::time::interval(Duration::from_secs(1));
    let (mut received, mut chunk) = (Vec::new(), [0u8; 4096]);
    let mut answered_at = None;
    loop {
        tokio::select! {
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    received.extend_from_slice(&chunk[..n]);
                    answered_at.get_or_insert_with(|| started.elapsed());
                }
            },
            // Writes fail once the server has closed its side: keep reading until EOF.
            _ = drip.tick() => { let _ = stream.write_all(b" ").await; }
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(at)) = response.parse(&received) else {
        return (0, Value::Null, started.elapsed());
    };
    let body = serde_json::from_slice(&received[at..]).unwrap_or(Value::Null);
    (response.code.unwrap_or(0), body, answered_at.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_by_the_body_timeout_while_others_are_served() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let settings = test_settings(&redis, &es);
    // The default, which README documents: this test runs with it.
    let timeout = settings.http.body_timeout;
    assert_eq!(timeout, Duration::from_secs(10));
    let app = spawn_app(settings).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let sending = Arc::new(Barrier::new(65));
    let started = Instant::now();
    let slow: Vec<_> = (0..64).map(|_| tokio::spawn(slow_client(address.clone(), sending.clone()))).collect();
    sending.wait().await;

    // All 64 are trickling: a normal request is still served, well before they are cut.
    let asked = Instant::now();
    let response = app.post_json(&json!({"embeddings": [item("meanwhile", TEXT, 384)]})).await;
    assert_eq!(response.status(), 202);
    let served_in = asked.elapsed();
    assert!(started.elapsed() < timeout, "served after {:?}", started.elapsed());
    let mut cut_after = Vec::new();

    for client in slow {
        // The client returns only once the server closed the connection.
        let (status, body, answered_after) =
            tokio::time::timeout(timeout * 3, client).await.expect("the slow client is cut off").unwrap();
        assert_eq!(status, 408, "{body}");
        assert_eq!(body["error"]["code"], "body_timeout");
        assert!(
            answered_after >= timeout && answered_after < timeout + Duration::from_secs(5),
            "cut after {answered_after:?}"
        );
        cut_after.push(answered_after);
    }
    let (first, last) = (cut_after.iter().min().unwrap(), cut_after.iter().max().unwrap());
    eprintln!("slow clients: 64 cut with 408 after {first:?}..{last:?}; a normal request meanwhile took {served_in:?}");
    app.stop().await.unwrap();
}

/// `embedjoin_request_bytes_resident` as `GET /metrics` shows it.
async fn request_bytes_resident(app: &crate::support::app::TestApp) -> u64 {
    let text = app.http.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
    let name = "embedjoin_request_bytes_resident ";
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_being_read_count_against_the_resident_memory_cap() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut settings = test_settings(&redis, &es);
    settings.shards.max_resident_bytes = 1_000_000;
    let app = spawn_app(settings).await;
    // A client that announces 900 kB and sends nothing more: its buffer is held meanwhile.
    let mut slow = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://")).await.unwrap();
    let head = "POST /aggregate/ HTTP/1.1\r\nHost: embedjoin\r\nContent-Type: application/json\r\n\
                Content-Length: 900000\r\n\r\n{";
    slow.write_all(head.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while request_bytes_resident(&app).await < 900_000 {
        assert!(Instant::now() < deadline, "the body's buffer was never charged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let big = json!({"embeddings": (0..40).map(|i| item(&format!("b{i}"), TEXT, 384)).collect::<Vec<_>>()});
    assert!(serde_json::to_vec(&big).unwrap().len() > 100_000);
    let response = app.post_json(&big).await;
    assert_eq!(error_code(response).await, (503, "overloaded".into()), "over the cap with the held body");
    let small = json!({"embeddings": [item("small", TEXT, 384)]});
    assert_eq!(app.post_json(&small).await.status(), 202, "what fits is still taken");

    drop(slow);
    while request_bytes_resident(&app).await > 0 {
        assert!(Instant::now() < deadline + Duration::from_secs(10), "the charge was never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.post_json(&big).await.status(), 202, "taken once the held body is gone");
    app.stop().await.unwrap();
}
