//! Operating the service: where an item's parts are (`GET /documents/{id}`), the bearer
//! token on the data endpoints, and the OpenAPI description of every route.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use embedjoin::config::{SinkBackend, StateBackend};
use embedjoin::Settings;
use serde_json::{json, Value};

use crate::support::app::{spawn_app, test_settings, TestApp};
use crate::support::data::{batch, item, IMAGE, TEXT};
use crate::support::es::EsTarget;
use crate::support::redis_server::RedisServer;

/// The test settings on Redis and the Elasticsearch stand-in, whatever the defaults are.
fn settings(redis: &RedisServer, es: &EsTarget) -> Settings {
    let mut s = test_settings(redis, es);
    s.state.backend = StateBackend::Redis;
    s.sink.backend = SinkBackend::Elasticsearch;
    s
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let r = app.http.get(format!("{}{path}", app.address)).send().await.expect("answered");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls `GET path` until `done` holds for the answer, or fails after 10 s.
async fn wait_for(app: &TestApp, path: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(app, path).await;
        if done(status, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} stayed at {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_tells_where_each_part_is_until_the_sink_confirms() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else {
        eprintln!("skipped: needs the stand-in to hold the sink");
        return;
    };
    // `a` flushes every 50 ms; `b` keeps what it is given in memory.
    let a = spawn_app(settings(&redis, &es)).await;
    let mut slow = settings(&redis, &es);
    slow.shards.flush_interval = Duration::from_secs(3600);
    let b = spawn_app(slow).await;

    let (status, body) = get(&a, "/documents/sku-1").await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")), "{body}");

    assert_eq!(a.post_json(&batch(vec![item("sku-1", TEXT, 384)])).await.status(), 202);
    wait_for(&a, "/documents/sku-1", |_, v| v["parts"] == json!({"EMBEDDINGS_TEXT": "store"})).await;

    // `b` holds the image in memory and sees the text in the store: complete at its next flush.
    assert_eq!(b.post_json(&batch(vec![item("sku-1", IMAGE, 512)])).await.status(), 202);
    let (status, body) = get(&b, "/documents/sku-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"id": "sku-1", "parts": {"EMBEDDINGS_TEXT": "store", "EMBEDDINGS_IMAGE": "memory"},
               "missing": [], "complete": true, "awaiting_sink": false, "completed_version": null})
    );
    let (_, body) = get(&a, "/documents/sku-1").await;
    assert_eq!(
        body,
        json!({"id": "sku-1", "parts": {"EMBEDDINGS_TEXT": "store"},
               "missing": ["EMBEDDINGS_IMAGE"], "complete": false, "awaiting_sink": false,
               "completed_version": null})
    );

    // With the sink held, the item completes in the store and waits in the outbox...
    standin.faults().pause();
    assert_eq!(a.post_json(&batch(vec![item("sku-1", IMAGE, 512)])).await.status(), 202);
    let body = wait_for(&a, "/documents/sku-1", |_, v| v["awaiting_sink"] == true).await;
    assert_eq!(body["parts"], json!({"EMBEDDINGS_TEXT": "store", "EMBEDDINGS_IMAGE": "store"}));
    assert_eq!(body["complete"], true);
    let text = body.to_string();
    assert!(!text.contains("0."), "vectors must never be returned: {text}");
    let version = body["completed_version"].as_u64().expect("the completion is remembered");
    // ...until the sink confirms it; then only its completion is remembered.
    standin.faults().resume();
    let body = wait_for(&a, "/documents/sku-1", |_, v| v["awaiting_sink"] == false).await;
    assert_eq!(
        body,
        json!({"id": "sku-1", "parts": {}, "missing": ["EMBEDDINGS_TEXT", "EMBEDDINGS_IMAGE"],
               "complete": false, "awaiting_sink": false, "completed_version": version})
    );
    assert_eq!(es.doc("sku-1").await.unwrap().newest(), version, "the index holds that completion");

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn documents_answers_404_for_ids_no_item_can_have() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let app = spawn_app(settings(&redis, &es)).await;
    let long = "x".repeat(513);
    for path in ["/documents/%00", "/documents/%FF%FE", &format!("/documents/{long}")] {
        let (status, body) = get(&app, path).await;
        assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")), "{path}: {body}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn data_endpoints_need_the_bearer_token_when_one_is_set() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut settings = settings(&redis, &es);
    settings.http.auth_token = "t0ken-s3cret".into();
    let app = spawn_app(settings).await;
    let body = batch(vec![item("sku-1", TEXT, 384)]);
    let post = |token: Option<&str>| {
        let mut r = app.http.post(format!("{}/aggregate/", app.address)).json(&body);
        if let Some(token) = token {
            r = r.bearer_auth(token);
        }
        r.send()
    };

    let r = post(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], r#"Bearer realm="embedjoin""#);
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unauthorized", "{error}");

    let r = post(Some("t0ken-s3creT")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));

    assert_eq!(post(Some("t0ken-s3cret")).await.unwrap().status(), 202);

    let documents = format!("{}/documents/sku-1", app.address);
    assert_eq!(app.http.get(&documents).send().await.unwrap().status(), 401);
    let r = app.http.get(&documents).bearer_auth("t0ken-s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Probes, scrapers and clients reading the description need no token.
    for open in ["/health", "/ready", "/metrics", "/openapi.json"] {
        let r = app.http.get(format!("{}{open}", app.address)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn openapi_describes_every_route_the_app_serves() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let app = spawn_app(settings(&redis, &es)).await;
    let (status, doc) = get(&app, "/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0."), "{doc}");

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
        .collect();
    let served: BTreeSet<(String, String)> = [
        ("POST", "/aggregate/"),
        ("POST", "/aggregate"),
        ("GET", "/documents/{id}"),
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    assert_eq!(documented, served);

    // Each documented operation is routed: none gets the unknown-endpoint answer or a 405.
    for (method, path) in &documented {
        let url = format!("{}{}", app.address, path.replace("{id}", "no-such-item"));
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app.http.request(method.clone(), &url).send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert!(status != 405 && !body.contains("no such endpoint"), "{method} {path}: {status} {body}");
    }

    // A documented path asked with another method says which one it takes.
    let r = app.http.get(format!("{}/aggregate/", app.address)).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["allow"].to_str().unwrap()), (405, "POST"));
    let (status, body) = get(&app, "/no-such-endpoint").await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));

    // Every reference resolves inside the document.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| match (k.as_str(), v) {
                ("$ref", Value::String(r)) => out.push(r.clone()),
                _ => refs(v, out),
            }),
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').expect("local reference");
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
    app.stop().await.unwrap();
}
