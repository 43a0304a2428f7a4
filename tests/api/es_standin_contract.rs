//! Contract tests for the Elasticsearch stand-in (`support::es_standin`): it must answer the
//! way Elasticsearch 8.x does (`shared/ES_BULK_CONTRACT.md`), faults included, or the service
//! tests built on it prove nothing.
//!
//! The protocol tests (statuses, error types, response shapes) run against the real engine
//! too when `EMBEDJOIN_TEST_ES_URL` is set, through [`Es`], which observes either side over
//! HTTP or through the stand-in's own view; where the two differ, the stand-in is wrong.
//! Against a real engine they share its index names, so run them one at a time there:
//! `EMBEDJOIN_TEST_ES_URL=... cargo test --test api es_standin -- --test-threads=1`.
//! Tests of the stand-in's fault injection and bookkeeping skip themselves there.
//!
//! Run: `cargo test --test api es_standin`

use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::es_standin::{DropMode, EsStandin};

const INDEX: &str = "embeddings";
const DIMS: usize = 384;
const WAIT: Duration = Duration::from_secs(10);

fn vector(seed: f32, dims: usize) -> Vec<f32> {
    (0..dims).map(|i| seed + (i as f32 + 1.0) / 1000.0).collect()
}

fn source(item: &str, v: Value) -> Value {
    json!({ "item_id": item, "text_embedding": v })
}

fn ndjson(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn index_action(id: &str) -> Value {
    json!({ "index": { "_index": INDEX, "_id": id } })
}

fn test_index_body() -> Value {
    json!({ "mappings": { "properties": {
        "item_id": { "type": "keyword" },
        "text_embedding": { "type": "dense_vector", "dims": DIMS, "index": true, "similarity": "cosine" }
    }}})
}

/// The stand-in with the test index, for tests of its faults and bookkeeping; `None` when
/// the suite runs against a real engine (the test then skips).
async fn standin_with_index() -> Option<EsStandin> {
    if real_engine_url().is_some() {
        eprintln!("skipped: tests the stand-in's own fault injection or bookkeeping");
        return None;
    }
    let es = EsStandin::start().await;
    es.create_index(INDEX, test_index_body()).expect("index created");
    Some(es)
}

fn real_engine_url() -> Option<String> {
    std::env::var("EMBEDJOIN_TEST_ES_URL").ok().filter(|u| !u.is_empty()).map(|u| u.trim_end_matches('/').to_owned())
}

/// Every index a contract test touches: removed before each test on a real engine.
const CONTRACT_INDICES: &[&str] = &[INDEX, "auto", "other", "strict", "nosuchindex", "merge"];

/// What a protocol test talks to: a fresh stand-in, or the real engine (its test indices
/// removed first). Reads what is stored over HTTP on the engine, and through the
/// stand-in's own view on the stand-in, so a test asserts the same facts of both.
struct Es {
    url: String,
    standin: Option<EsStandin>,
}

impl Es {
    async fn start() -> Es {
        match real_engine_url() {
            Some(url) => {
                let r = client()
                    .delete(format!("{url}/{}?ignore_unavailable=true", CONTRACT_INDICES.join(",")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "cleaning the test indices: {:?}", r.text().await);
                set_auto_create_index_setting(&url, Value::Null).await;
                Es { url, standin: None }
            }
            None => {
                let standin = EsStandin::start().await;
                Es { url: standin.url(), standin: Some(standin) }
            }
        }
    }

    async fn with_index() -> Es {
        let es = Es::start().await;
        es.create_index(INDEX, test_index_body()).await.expect("index created");
        es
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    /// The stand-in, for assertions on its bookkeeping; `None` on a real engine.
    fn standin(&self) -> Option<&EsStandin> {
        self.standin.as_ref()
    }

    async fn create_index(&self, index: &str, body: Value) -> Result<(), Value> {
        if let Some(s) = &self.standin {
            return s.create_index(index, body);
        }
        let (status, v) =
            json_of(client().put(format!("{}/{index}", self.url)).json(&body).send().await.unwrap()).await;
        if status == 200 {
            Ok(())
        } else {
            Err(v)
        }
    }

    /// Documents stored, searchable or not (a refresh first on the engine).
    async fn doc_count(&self, index: &str) -> usize {
        if let Some(s) = &self.standin {
            return s.doc_count(index);
        }
        client().post(format!("{}/{index}/_refresh", self.url)).send().await.unwrap();
        self.searchable_count(index).await
    }

    /// Documents visible to search, without a refresh.
    async fn searchable_count(&self, index: &str) -> usize {
        if let Some(s) = &self.standin {
            return s.searchable_count(index);
        }
        let (status, v) = json_of(client().get(format!("{}/{index}/_count", self.url)).send().await.unwrap()).await;
        if status == 404 {
            return 0;
        }
        v["count"].as_u64().expect("count") as usize
    }

    /// A document's `_source` and `_version` (realtime).
    async fn stored(&self, index: &str, id: &str) -> Option<(Value, u64)> {
        let (status, v) = json_of(client().get(format!("{}/{index}/_doc/{id}", self.url)).send().await.unwrap()).await;
        (status == 200).then(|| (v["_source"].clone(), v["_version"].as_u64().unwrap()))
    }

    async fn doc(&self, index: &str, id: &str) -> Option<Value> {
        match &self.standin {
            Some(s) => s.doc(index, id),
            None => self.stored(index, id).await.map(|(source, _)| source),
        }
    }

    async fn version(&self, index: &str, id: &str) -> Option<u64> {
        match &self.standin {
            Some(s) => s.version(index, id),
            None => self.stored(index, id).await.map(|(_, version)| version),
        }
    }

    /// The ids stored, sorted.
    async fn ids(&self, index: &str) -> Vec<String> {
        if let Some(s) = &self.standin {
            return s.ids(index);
        }
        client().post(format!("{}/{index}/_refresh", self.url)).send().await.unwrap();
        let (_, v) = json_of(
            client()
                .post(format!("{}/{index}/_search", self.url))
                .json(&json!({"size": 10000, "_source": false}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let mut ids: Vec<String> =
            v["hits"]["hits"].as_array().unwrap().iter().map(|h| h["_id"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        ids
    }

    /// The index's mappings (`{"properties": ..}`).
    async fn mapping(&self, index: &str) -> Option<Value> {
        if let Some(s) = &self.standin {
            return s.mapping(index);
        }
        let (status, v) = json_of(client().get(format!("{}/{index}/_mapping", self.url)).send().await.unwrap()).await;
        (status == 200).then(|| v[index]["mappings"].clone())
    }

    /// `action.auto_create_index`; on the engine a cluster setting (reset by [`Es::start`]).
    async fn set_auto_create_index(&self, on: bool) {
        match &self.standin {
            Some(s) => s.set_auto_create_index(on),
            None => set_auto_create_index_setting(&self.url, Value::from(on.to_string())).await,
        }
    }

    async fn index_exists(&self, index: &str) -> bool {
        client().head(format!("{}/{index}", self.url)).send().await.unwrap().status() == 200
    }
}

/// Sets (or with `Null` resets) the engine's `action.auto_create_index` cluster setting.
async fn set_auto_create_index_setting(url: &str, value: Value) {
    let body = json!({"persistent": {"action.auto_create_index": value}});
    let r = client().put(format!("{url}/_cluster/settings")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}

/// Anything with a base URL: the stand-in itself, or [`Es`].
trait Target {
    fn base_url(&self) -> String;
}

impl Target for EsStandin {
    fn base_url(&self) -> String {
        self.url()
    }
}

impl Target for Es {
    fn base_url(&self) -> String {
        self.url()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(WAIT).build().unwrap()
}

async fn post_bulk(
    es: &impl Target,
    path_and_query: &str,
    body: impl Into<reqwest::Body>,
) -> Result<reqwest::Response, reqwest::Error> {
    client()
        .post(format!("{}{}", es.base_url(), path_and_query))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("a JSON body");
    (status, body)
}

/// Asserts the whole-request error shape: `{"error":{"root_cause":[..],"type","reason"},"status"}`.
fn assert_es_error(body: &Value, status: u16, typ: &str) {
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["error"]["type"], typ, "{body}");
    assert!(body["error"]["reason"].is_string(), "{body}");
    let root = body["error"]["root_cause"].as_array().expect("root_cause array");
    assert!(!root.is_empty(), "{body}");
    assert!(root[0]["type"].is_string() && root[0]["reason"].is_string(), "{body}");
}

fn item_statuses(body: &Value) -> Vec<u64> {
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|it| it.as_object().unwrap().values().next().unwrap()["status"].as_u64().unwrap())
        .collect()
}

fn item(body: &Value, i: usize, action: &str) -> Value {
    body["items"][i][action].clone()
}

#[tokio::test]
async fn es_standin_root_answers_cluster_info_with_product_header() {
    let es = Es::start().await;
    let r = client().get(es.url()).header("accept", "application/json").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get("x-elastic-product").unwrap(), "Elasticsearch");
    assert!(r.headers().get("content-type").unwrap().to_str().unwrap().starts_with("application/json"));
    let body: Value = r.json().await.unwrap();
    let number = body["version"]["number"].as_str().unwrap();
    assert!(number.starts_with("8."), "{number}");
    if es.standin().is_some() {
        assert_eq!(number, crate::support::es_standin::ES_VERSION);
    }
    assert_eq!(body["tagline"], "You Know, for Search");
    assert!(body["cluster_name"].is_string() && body["name"].is_string());

    // Error answers carry the header too.
    let r = client().get(format!("{}/missing/_doc/1", es.url())).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers().get("x-elastic-product").unwrap(), "Elasticsearch");
}

#[tokio::test]
async fn es_standin_bulk_without_trailing_newline_fails_whole_request() {
    let es = Es::with_index().await;
    let mut body = ndjson(&[index_action("a"), source("a", json!(vector(0.1, DIMS)))]);
    body.pop(); // drop the final '\n'
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_es_error(&v, 400, "illegal_argument_exception");
    assert_eq!(v["error"]["reason"], "The bulk request must be terminated by a newline [\\n]");
    assert_eq!(es.doc_count(INDEX).await, 0);
    if let Some(standin) = es.standin() {
        assert_eq!(standin.stats().bulk_requests_failed, 1);
    }
}

#[tokio::test]
async fn es_standin_malformed_action_line_fails_whole_request() {
    let es = Es::with_index().await;
    // A good pair first: nothing at all may be applied.
    let body = format!(
        "{}{{\"index\": {{\"_index\": \"{INDEX}\", \"_id\": \"b\"\n{}\n",
        ndjson(&[index_action("a"), source("a", json!(vector(0.1, DIMS)))]),
        source("b", json!(vector(0.2, DIMS)))
    );
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 400);
    // A line cut short is end-of-input, a distinct parse error.
    assert_es_error(&v, 400, "x_content_e_o_f_exception");
    assert_eq!(es.doc_count(INDEX).await, 0);

    // Unknown action and unknown metadata: 400 illegal_argument_exception.
    let body = ndjson(&[json!({"upsert": {"_index": INDEX, "_id": "c"}}), json!({"x": 1})]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_es_error(&v, 400, "illegal_argument_exception");
    assert!(v["error"]["reason"].as_str().unwrap().contains("Malformed action/metadata line [1]"), "{v}");

    let body = ndjson(&[json!({"index": {"_index": INDEX, "_id": "c", "_type": "_doc"}}), json!({"x": 1})]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(v["error"]["reason"].as_str().unwrap().contains("unknown parameter [_type]"), "{v}");

    // An action line with no source line after it.
    let body = ndjson(&[index_action("d")]);
    let (status, _) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_eq!(es.doc_count(INDEX).await, 0);
}

#[tokio::test]
async fn es_standin_mixed_batch_reports_each_item_in_order() {
    let es = Es::with_index().await;
    let mut non_number = vector(0.3, DIMS).into_iter().map(|f| json!(f)).collect::<Vec<_>>();
    non_number[7] = json!("NaN");
    let body = ndjson(&[
        index_action("good"),
        source("good", json!(vector(0.1, DIMS))),
        index_action("short"),
        source("short", json!(vector(0.2, DIMS - 1))),
        index_action("nan"),
        source("nan", Value::Array(non_number)),
        index_action("zero"),
        source("zero", json!(vec![0.0f32; DIMS])),
        index_action("long"),
        source("long", json!(vector(0.4, DIMS + 1))),
    ]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["errors"], true);
    assert!(v["took"].is_u64());
    assert_eq!(item_statuses(&v), vec![201, 400, 400, 400, 400]);
    let ids: Vec<&str> = v["items"].as_array().unwrap().iter().map(|it| it["index"]["_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["good", "short", "nan", "zero", "long"]);

    let good = item(&v, 0, "index");
    assert_eq!(good["result"], "created");
    assert_eq!(good["_version"], 1);
    assert_eq!(good["_index"], INDEX);
    assert_eq!(good["_seq_no"], 0);
    assert_eq!(good["_primary_term"], 1);
    assert_eq!(good["_shards"], json!({"total": 2, "successful": 1, "failed": 0}));
    assert!(good.get("error").is_none());

    let short = item(&v, 1, "index");
    assert_eq!(short["error"]["type"], "document_parsing_exception");
    let reason = short["error"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("The [dense_vector] field [text_embedding] in doc [document with id 'short'] has a different number of dimensions [383] than defined in the mapping [384]"),
        "{reason}"
    );
    assert!(short.get("_version").is_none() && short.get("result").is_none());
    assert_eq!(item(&v, 2, "index")["error"]["type"], "document_parsing_exception");
    let zero = item(&v, 3, "index");
    assert!(zero["error"]["reason"].as_str().unwrap().contains("zero magnitude"), "{zero}");
    let long = item(&v, 4, "index");
    assert!(
        long["error"]["reason"].as_str().unwrap().contains("has more dimensions than defined in the mapping [384]"),
        "{long}"
    );

    assert_eq!(es.ids(INDEX).await, vec!["good".to_string()]);
    if let Some(standin) = es.standin() {
        let stats = standin.stats();
        assert_eq!(stats.items_received, 5);
        assert_eq!(stats.items_applied, 1);
        assert_eq!(stats.failed_with(400), 4);
    }
}

#[tokio::test]
async fn es_standin_id_over_512_bytes_fails_the_whole_request() {
    // Real Elasticsearch validates every item before executing any (BulkRequest.validate):
    // one over-long `_id` turns the whole request into a 400, nothing applied.
    let es = Es::with_index().await;
    let long_id = "x".repeat(600);
    let body = ndjson(&[
        index_action("good"),
        source("good", json!(vector(0.1, DIMS))),
        index_action(&long_id),
        source("long", json!(vector(0.2, DIMS))),
    ]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_es_error(&v, 400, "action_request_validation_exception");
    assert!(
        v["error"]["reason"].as_str().unwrap().contains("is too long, must be no longer than 512 bytes but was: 600"),
        "{v}"
    );
    assert_eq!(es.doc_count(INDEX).await, 0);

    // Exactly 512 bytes is fine.
    let id512 = "y".repeat(512);
    let body = ndjson(&[index_action(&id512), source("y", json!(vector(0.1, DIMS)))]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(item_statuses(&v), vec![201]);

    // A missing index (neither in the action nor in the path) is a request-level 400 too.
    let body = ndjson(&[json!({"index": {"_id": "z"}}), source("z", json!(vector(0.1, DIMS)))]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_es_error(&v, 400, "action_request_validation_exception");
    assert!(v["error"]["reason"].as_str().unwrap().contains("index is missing"));
}

#[tokio::test]
async fn es_standin_same_id_again_is_updated_with_growing_version() {
    let es = Es::with_index().await;
    let body = ndjson(&[
        index_action("a"),
        source("first", json!(vector(0.1, DIMS))),
        index_action("a"),
        source("second", json!(vector(0.2, DIMS))),
    ]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(v["errors"], false);
    assert_eq!(item_statuses(&v), vec![201, 200]);
    let second = item(&v, 1, "index");
    assert_eq!(second["result"], "updated");
    assert_eq!(second["_version"], 2);
    assert_eq!(second["_seq_no"], 1);

    // And across requests, through the index in the path.
    let body = ndjson(&[json!({"index": {"_id": "a"}}), source("third", json!(vector(0.3, DIMS)))]);
    let (_, v) = json_of(post_bulk(&es, &format!("/{INDEX}/_bulk"), body).await.unwrap()).await;
    assert_eq!(item(&v, 0, "index")["_version"], 3);
    assert_eq!(es.version(INDEX, "a").await, Some(3));
    assert_eq!(es.doc(INDEX, "a").await.unwrap()["item_id"], "third");
    assert_eq!(es.doc_count(INDEX).await, 1);
}

#[tokio::test]
async fn es_standin_external_versions_refuse_an_older_write_with_409() {
    let es = Es::with_index().await;
    let versioned = |id: &str, version: u64, kind: &str| json!({"index": {"_index": INDEX, "_id": id, "version": version, "version_type": kind}});
    let body = ndjson(&[
        versioned("g", 1795989837613488, "external_gte"),
        source("first", json!(vector(0.1, DIMS))),
        // The same version again: applied with external_gte (a resend of one completion).
        versioned("g", 1795989837613488, "external_gte"),
        source("again", json!(vector(0.2, DIMS))),
        // An older version: refused, the newer stays.
        versioned("g", 1795989837613400, "external_gte"),
        source("older", json!(vector(0.3, DIMS))),
        // `external` refuses an equal version too.
        versioned("e", 10, "external"),
        source("ten", json!(vector(0.4, DIMS))),
        versioned("e", 10, "external"),
        source("ten again", json!(vector(0.5, DIMS))),
    ]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(v["errors"], true);
    assert_eq!(item_statuses(&v), vec![201, 200, 409, 201, 409]);
    assert_eq!(item(&v, 0, "index")["_version"], 1795989837613488u64, "the given version is stored");
    let older = item(&v, 2, "index");
    assert_eq!(older["error"]["type"], "version_conflict_engine_exception");
    assert_eq!(
        older["error"]["reason"],
        "[g]: version conflict, current version [1795989837613488] is higher than the one provided [1795989837613400]"
    );
    assert_eq!(
        item(&v, 4, "index")["error"]["reason"],
        "[e]: version conflict, current version [10] is higher or equal to the one provided [10]"
    );
    assert_eq!(es.doc(INDEX, "g").await.unwrap()["item_id"], "again", "the refused write changed nothing");
    assert_eq!(es.version(INDEX, "g").await, Some(1795989837613488));
}

#[tokio::test]
async fn es_standin_create_on_existing_id_is_409() {
    let es = Es::with_index().await;
    let create = json!({"create": {"_index": INDEX, "_id": "a"}});
    let body = ndjson(&[
        create.clone(),
        source("one", json!(vector(0.1, DIMS))),
        create,
        source("two", json!(vector(0.2, DIMS))),
    ]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(v["errors"], true);
    assert_eq!(item_statuses(&v), vec![201, 409]);
    let conflict = item(&v, 1, "create");
    assert_eq!(conflict["error"]["type"], "version_conflict_engine_exception");
    assert_eq!(conflict["error"]["index"], INDEX);
    assert!(conflict["error"]["reason"].as_str().unwrap().contains("document already exists"));
    assert_eq!(es.doc(INDEX, "a").await.unwrap()["item_id"], "one");
    assert_eq!(es.version(INDEX, "a").await, Some(1));
}

#[tokio::test]
async fn es_standin_update_and_delete_semantics() {
    let es = Es::with_index().await;
    let update = |id: &str| json!({"update": {"_index": INDEX, "_id": id}});
    let delete = |id: &str| json!({"delete": {"_index": INDEX, "_id": id}});
    let body = ndjson(&[
        update("a"),
        json!({"doc": {"item_id": "a"}}),
        update("a"),
        json!({"doc": {"item_id": "a", "text_embedding": vector(0.1, DIMS)}, "doc_as_upsert": true}),
        update("a"),
        json!({"doc": {"extra": "x"}}),
        update("a"),
        json!({"doc": {"extra": "x"}}),
        delete("a"),
        delete("a"),
    ]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(item_statuses(&v), vec![404, 201, 200, 200, 200, 404]);
    assert_eq!(item(&v, 0, "update")["error"]["type"], "document_missing_exception");
    assert_eq!(item(&v, 1, "update")["result"], "created");
    assert_eq!(item(&v, 2, "update")["result"], "updated");
    assert_eq!(item(&v, 2, "update")["_version"], 2);
    assert_eq!(item(&v, 3, "update")["result"], "noop");
    assert_eq!(item(&v, 3, "update")["_version"], 2);
    assert_eq!(item(&v, 4, "delete")["result"], "deleted");
    assert_eq!(item(&v, 5, "delete")["result"], "not_found");
    assert!(item(&v, 5, "delete").get("error").is_none());
    assert_eq!(v["errors"], true, "the 404 document_missing_exception is an error");
    assert_eq!(es.doc_count(INDEX).await, 0);

    // A delete of a missing doc alone is not an error.
    let (_, v) = json_of(post_bulk(&es, "/_bulk", ndjson(&[delete("nope")])).await.unwrap()).await;
    assert_eq!(v["errors"], false);
    assert_eq!(item_statuses(&v), vec![404]);

    // A malformed update body fails the whole request (parsed up front, like ES does).
    let body = ndjson(&[update("b"), json!({"doc": {"x": 1}, "bogus": true})]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_es_error(&v, 400, "x_content_parse_exception");
}

/// Whether the target runs painless scripts (the execute API answers).
async fn runs_painless(es: &Es) -> bool {
    let probe = json!({"script": {"lang": "painless", "source": "params.x + 1", "params": {"x": 1}}});
    let r = client().post(format!("{}/_scripts/painless/_execute", es.url())).json(&probe).send().await.unwrap();
    let ok = r.status().is_success();
    if ok {
        assert_eq!(json_of(r).await.1, json!({"result": "2"}));
    }
    ok
}

/// One guarded write of embedjoin's merge script (as `sink::encode` writes it) for `d`.
fn merge_op(id: &str, d: Value, upsert: bool) -> [Value; 2] {
    let mut body = json!({"script": {"lang": "painless", "source": embedjoin::sink::encode::MERGE_SCRIPT,
        "params": {"fields": {"T": "t", "I": "i"}, "d": d}}});
    if upsert {
        body["scripted_upsert"] = json!(true);
        body["upsert"] = json!({});
    }
    [json!({"update": {"_index": "merge", "_id": id, "retry_on_conflict": 5}}), body]
}

/// (status, result or error type) of each item.
fn outcomes(v: &Value) -> Vec<(u64, String)> {
    (v["items"].as_array().expect("items").iter())
        .map(|it| {
            let r = it.as_object().unwrap().values().next().unwrap();
            let what = r["result"].as_str().or(r["error"]["type"].as_str()).unwrap_or_default();
            (r["status"].as_u64().unwrap(), what.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn es_standin_guarded_merge_writes_each_part_only_if_newer() {
    let es = Es::start().await;
    if !runs_painless(&es).await {
        eprintln!("skipped: the engine runs no painless scripts");
        return;
    }
    let parts_unindexed = json!({"mappings": {"properties": {"_parts": {"type": "object", "enabled": false}}}});
    es.create_index("merge", parts_unindexed).await.expect("index created");
    let full = json!({"id": "a", "t": [1.0], "i": [2.0], "_parts": {"T": 10, "I": 20},
                      "completed_at": "2026-01-01T00:00:00Z", "lang": "en"});
    let create = json!({"create": {"_index": "merge", "_id": "a"}});
    let newer_t =
        json!({"id": "a", "t": [3.0], "_parts": {"T": 30}, "completed_at": "2026-01-02T00:00:00Z", "title": "x"});
    let older_t = json!({"id": "a", "t": [0.5], "_parts": {"T": 25}, "completed_at": "2026-01-03T00:00:00Z"});
    let mut lines = vec![create.clone(), full.clone(), create, full.clone()];
    lines.extend(merge_op("a", full.clone(), false));
    lines.extend(merge_op("a", newer_t.clone(), false));
    lines.extend(merge_op("a", older_t, false));
    lines.extend(merge_op("missing", newer_t, false));
    let (status, v) = json_of(post_bulk(&es, "/_bulk?refresh=true", ndjson(&lines)).await.unwrap()).await;
    assert_eq!(status, 200);
    let want = [(201, "created"), (409, "version_conflict_engine_exception"), (200, "noop"), (200, "updated")];
    let want = want.iter().chain(&[(200, "noop"), (404, "document_missing_exception")]);
    assert_eq!(outcomes(&v), want.map(|(s, r)| (*s, r.to_string())).collect::<Vec<_>>());
    // The newer TEXT and its metadata went in; the older one did not; IMAGE stayed.
    assert_eq!(
        es.doc("merge", "a").await.unwrap(),
        json!({"id": "a", "t": [3.0], "i": [2.0], "_parts": {"T": 30, "I": 20},
               "completed_at": "2026-01-02T00:00:00Z", "lang": "en", "title": "x"})
    );

    // An upsert of an orphan creates it as it is, markers included; the missing part later
    // completes it and the markers go.
    let orphan = json!({"id": "o", "t": [1.0], "_parts": {"T": 5}, "incomplete": true, "missing_parts": ["I"],
                        "completed_at": "2026-01-04T00:00:00Z"});
    let image = json!({"id": "o", "i": [9.0], "_parts": {"I": 6}, "completed_at": "2026-01-05T00:00:00Z"});
    // Every part newer: the document is replaced as a newer completion would.
    let replace = json!({"id": "a", "t": [7.0], "i": [8.0], "_parts": {"T": 40, "I": 41}, "completed_at": "2026-01-06T00:00:00Z"});
    let mut lines = merge_op("o", orphan.clone(), true).to_vec();
    lines.extend(merge_op("o", image, false));
    lines.extend(merge_op("a", replace.clone(), false));
    let (_, v) = json_of(post_bulk(&es, "/_bulk?refresh=true", ndjson(&lines)).await.unwrap()).await;
    let want = [(201, "created"), (200, "updated"), (200, "updated")];
    assert_eq!(outcomes(&v), want.map(|(s, r)| (s, r.to_string())).to_vec());
    assert_eq!(
        es.doc("merge", "o").await.unwrap(),
        json!({"id": "o", "t": [1.0], "i": [9.0], "_parts": {"T": 5, "I": 6}, "completed_at": "2026-01-05T00:00:00Z"})
    );
    assert_eq!(es.doc("merge", "a").await.unwrap(), replace, "no metadata of the replaced document stays");
}

#[tokio::test]
async fn es_standin_without_painless_refuses_scripts_as_an_engine_without_it() {
    let es = Es::start().await;
    match es.standin() {
        Some(standin) => standin.set_painless(false),
        None if runs_painless(&es).await => return eprintln!("skipped: the engine runs painless"),
        None => {}
    }
    assert!(!runs_painless(&es).await);
    let full = json!({"id": "a", "t": [1.0], "_parts": {"T": 10}});
    let mut lines = vec![json!({"index": {"_index": "merge", "_id": "a"}}), full.clone()];
    lines.extend(merge_op("a", full, false));
    let (status, v) = json_of(post_bulk(&es, "/_bulk", ndjson(&lines)).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(outcomes(&v), vec![(201, "created".to_owned()), (400, "illegal_argument_exception".to_owned())]);
}

#[tokio::test]
async fn es_standin_accepts_gzip_request_bodies() {
    let es = Es::with_index().await;
    let body = ndjson(&[index_action("gz"), source("gz", json!(vector(0.5, DIMS)))]);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(body.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let r = client()
        .post(format!("{}/_bulk", es.url()))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(gz.clone())
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(item_statuses(&v), vec![201]);
    assert!(es.doc(INDEX, "gz").await.is_some());
    if let Some(standin) = es.standin() {
        let rec = standin.requests().into_iter().find(|r| r.is_bulk()).unwrap();
        assert_eq!(rec.header("content-encoding"), Some("gzip"));
        assert_eq!(rec.body_bytes, gz.len());
        assert_eq!(rec.decoded_body_bytes, body.len());
    }

    // A corrupt gzip body gets no answer: the connection is closed.
    let r = client()
        .post(format!("{}/_bulk", es.url()))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(b"not gzip at all".to_vec())
        .send()
        .await;
    assert!(r.is_err(), "{r:?}");
}

/// Reads one HTTP/1.1 response (Content-Length framed) from a raw connection.
async fn read_response(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (u16, Vec<(String, String)>, Vec<u8>) {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(n) = resp.parse(buf).unwrap() {
            let status = resp.code.unwrap();
            let hs: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            let len: usize =
                hs.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
            while buf.len() < n + len {
                let mut tmp = [0u8; 8192];
                let k = stream.read(&mut tmp).await.unwrap();
                assert!(k > 0, "connection closed mid-response");
                buf.extend_from_slice(&tmp[..k]);
            }
            let body = buf[n..n + len].to_vec();
            buf.drain(..n + len);
            return (status, hs, body);
        }
        let mut tmp = [0u8; 8192];
        let k = stream.read(&mut tmp).await.unwrap();
        assert!(k > 0, "connection closed before a response");
        buf.extend_from_slice(&tmp[..k]);
    }
}

#[tokio::test]
async fn es_standin_serves_chunked_bodies_and_several_requests_per_connection() {
    let Some(es) = standin_with_index().await else { return };
    let mut stream = tokio::net::TcpStream::connect(es.addr()).await.unwrap();
    let mut buf = Vec::new();

    // 1: a plain GET.
    stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let (status, headers, body) = read_response(&mut stream, &mut buf).await;
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, v)| k == "x-elastic-product" && v == "Elasticsearch"));
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["version"]["number"],
        crate::support::es_standin::ES_VERSION
    );

    // 2 and 3 pipelined on the same connection: a chunked bulk, then a realtime GET.
    let ndjson_body = ndjson(&[index_action("chunked"), source("chunked", json!(vector(0.1, DIMS)))]);
    let bytes = ndjson_body.as_bytes();
    let (a, b) = bytes.split_at(bytes.len() / 3);
    let mut req =
        b"POST /_bulk HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for part in [a, b] {
        req.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req.extend_from_slice(format!("GET /{INDEX}/_doc/chunked HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes());
    stream.write_all(&req).await.unwrap();
    let (status, _, body) = read_response(&mut stream, &mut buf).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(item_statuses(&serde_json::from_slice(&body).unwrap()), vec![201]);
    let (status, _, body) = read_response(&mut stream, &mut buf).await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["found"], true);
    assert_eq!(doc["_source"]["item_id"], "chunked");
    assert_eq!(es.stats().connections_accepted, 1);

    // Responses are gzip-compressed on request, when turned on (as Elasticsearch does).
    es.set_response_compression(true);
    stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\naccept-encoding: gzip\r\n\r\n").await.unwrap();
    let (status, headers, body) = read_response(&mut stream, &mut buf).await;
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, v)| k == "content-encoding" && v == "gzip"));
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut plain).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&plain).unwrap()["tagline"], "You Know, for Search");
    es.set_response_compression(false);

    // "Connection: close" is honoured.
    stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let (status, headers, _) = read_response(&mut stream, &mut buf).await;
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, v)| k == "connection" && v == "close"));
    let mut rest = Vec::new();
    let n = stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(n, 0, "the server closed the connection");
}

#[tokio::test]
async fn es_standin_item_429_ratio_rejects_every_item() {
    let Some(es) = standin_with_index().await else { return };
    es.faults().set_item_429_ratio(1.0);
    let mut lines = Vec::new();
    for i in 0..10 {
        lines.push(index_action(&format!("d{i}")));
        lines.push(source("x", json!(vector(i as f32, DIMS))));
    }
    let (status, v) = json_of(post_bulk(&es, "/_bulk", ndjson(&lines)).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(v["errors"], true);
    assert_eq!(item_statuses(&v), vec![429; 10]);
    assert_eq!(item(&v, 3, "index")["error"]["type"], "es_rejected_execution_exception");
    assert_eq!(item(&v, 3, "index")["_id"], "d3");
    assert_eq!(es.doc_count(INDEX), 0);
    assert_eq!(es.stats().failed_with(429), 10);

    // Off again: the same request goes through.
    es.faults().set_item_429_ratio(0.0);
    let (_, v) = json_of(post_bulk(&es, "/_bulk", ndjson(&lines)).await.unwrap()).await;
    assert_eq!(v["errors"], false);
    assert_eq!(es.doc_count(INDEX), 10);
}

#[tokio::test]
async fn es_standin_item_429_ratio_is_partial_and_seedable() {
    let Some(es) = standin_with_index().await else { return };
    es.faults().set_seed(42);
    es.faults().set_item_429_ratio(0.5);
    let mut lines = Vec::new();
    for i in 0..200 {
        lines.push(index_action(&format!("d{i}")));
        lines.push(source("x", json!(vector(i as f32, DIMS))));
    }
    let (_, v) = json_of(post_bulk(&es, "/_bulk", ndjson(&lines)).await.unwrap()).await;
    let statuses = item_statuses(&v);
    let rejected = statuses.iter().filter(|s| **s == 429).count();
    assert!((50..=150).contains(&rejected), "about half rejected, got {rejected}");
    assert_eq!(statuses.iter().filter(|s| **s == 201).count() + rejected, 200);
    assert_eq!(es.doc_count(INDEX), 200 - rejected);
    // Exactly the accepted ones are stored.
    for (i, s) in statuses.iter().enumerate() {
        assert_eq!(es.doc(INDEX, &format!("d{i}")).is_some(), *s == 201);
    }
}

#[tokio::test]
async fn es_standin_request_level_503_and_429() {
    let Some(es) = standin_with_index().await else { return };
    let body = ndjson(&[index_action("a"), source("a", json!(vector(0.1, DIMS)))]);

    es.faults().set_request_503_ratio(1.0);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body.clone()).await.unwrap()).await;
    assert_eq!(status, 503);
    assert_es_error(&v, 503, "unavailable_shards_exception");
    assert_eq!(es.doc_count(INDEX), 0);
    es.faults().set_request_503_ratio(0.0);

    es.faults().set_request_429_ratio(1.0);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body.clone()).await.unwrap()).await;
    assert_eq!(status, 429);
    assert_es_error(&v, 429, "es_rejected_execution_exception");
    assert_eq!(es.doc_count(INDEX), 0);
    es.faults().set_request_429_ratio(0.0);

    let (status, _) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(es.doc_count(INDEX), 1);
    let stats = es.stats();
    assert_eq!(stats.bulk_requests, 3);
    assert_eq!(stats.bulk_requests_failed, 2);
}

#[tokio::test]
async fn es_standin_deterministic_rejections() {
    let Some(es) = standin_with_index().await else { return };
    let body = ndjson(&[
        index_action("a"),
        source("a", json!(vector(0.1, DIMS))),
        index_action("b"),
        source("b", json!(vector(0.2, DIMS))),
    ]);
    es.faults().reject_next_bulk(2, 503);
    for _ in 0..2 {
        let (status, v) = json_of(post_bulk(&es, "/_bulk", body.clone()).await.unwrap()).await;
        assert_eq!(status, 503);
        assert_es_error(&v, 503, "unavailable_shards_exception");
    }
    es.faults().reject_id("b", 429, 1);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body.clone()).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(item_statuses(&v), vec![201, 429]);
    assert!(es.doc(INDEX, "b").is_none());

    es.faults().reject_next_items(1, 429);
    let (_, v) = json_of(post_bulk(&es, "/_bulk", body.clone()).await.unwrap()).await;
    assert_eq!(item_statuses(&v), vec![429, 201]);

    let (_, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(item_statuses(&v), vec![200, 200]);
    assert_eq!(es.version(INDEX, "a"), Some(2));
    assert_eq!(es.version(INDEX, "b"), Some(2));
}

#[tokio::test]
async fn es_standin_dropped_connection_is_a_client_error() {
    let Some(es) = standin_with_index().await else { return };
    let body = ndjson(&[index_action("a"), source("a", json!(vector(0.1, DIMS)))]);

    es.faults().drop_next_bulk(1, DropMode::BeforeApply);
    let err = post_bulk(&es, "/_bulk", body.clone()).await.expect_err("no response");
    assert!(!err.is_timeout(), "{err:?}");
    assert_eq!(es.doc_count(INDEX), 0, "nothing applied before the drop");

    es.faults().drop_next_bulk(1, DropMode::AfterApply);
    let err = post_bulk(&es, "/_bulk", body.clone()).await.expect_err("no response");
    assert!(!err.is_timeout(), "{err:?}");
    assert_eq!(es.version(INDEX, "a"), Some(1), "applied, though the client cannot know");

    es.faults().set_drop_ratio(1.0);
    assert!(post_bulk(&es, "/_bulk", body.clone()).await.is_err());
    es.faults().set_drop_ratio(0.0);

    let r = post_bulk(&es, "/_bulk", body).await.unwrap();
    assert_eq!(r.status(), 200);
    let stats = es.stats();
    assert_eq!(stats.dropped_connections, 3);
    let dropped: Vec<_> = es.requests().into_iter().filter(|r| r.is_bulk() && r.status.is_none()).collect();
    assert_eq!(dropped.len(), 3);
}

#[tokio::test]
async fn es_standin_unknown_query_parameter_is_400() {
    let es = Es::with_index().await;
    let body = ndjson(&[index_action("a"), source("a", json!(vector(0.1, DIMS)))]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk?refresh=true&bogus=1", body.clone()).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_es_error(&v, 400, "illegal_argument_exception");
    assert_eq!(v["error"]["reason"], "request [/_bulk] contains unrecognized parameter: [bogus]");
    assert_eq!(es.doc_count(INDEX).await, 0);

    // A bad value of a known parameter is a 400 too.
    let (status, _) = json_of(post_bulk(&es, "/_bulk?refresh=sometimes", body.clone()).await.unwrap()).await;
    assert_eq!(status, 400);

    // The known ones are accepted.
    let (status, v) = json_of(
        post_bulk(
            &es,
            "/_bulk?refresh=wait_for&timeout=1m&wait_for_active_shards=1&pretty&routing=r&pipeline=_none",
            body,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(es.searchable_count(INDEX).await, 1, "refresh=wait_for made it visible");

    let r = client().get(format!("{}/{INDEX}/_doc/a?nope=1", es.url())).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn es_standin_doc_mget_and_count_after_refresh() {
    let es = Es::with_index().await;
    let body = ndjson(&[
        index_action("a"),
        source("a", json!(vector(0.1, DIMS))),
        index_action("b"),
        source("b", json!(vector(0.2, DIMS))),
    ]);
    post_bulk(&es, "/_bulk", body).await.unwrap();
    let c = client();

    // _doc is realtime.
    let (status, v) = json_of(c.get(format!("{}/{INDEX}/_doc/a", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(v["found"], true);
    assert_eq!(v["_id"], "a");
    assert_eq!(v["_index"], INDEX);
    assert_eq!(v["_version"], 1);
    assert_eq!(v["_primary_term"], 1);
    assert!(v["_seq_no"].is_u64());
    assert_eq!(v["_source"]["text_embedding"].as_array().unwrap().len(), DIMS);

    let (status, v) = json_of(c.get(format!("{}/{INDEX}/_doc/zzz", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(v, json!({"_index": INDEX, "_id": "zzz", "found": false}));

    let (status, v) = json_of(c.get(format!("{}/nosuchindex/_doc/a", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_es_error(&v, 404, "index_not_found_exception");

    // _mget, both body forms.
    let (status, v) = json_of(
        c.post(format!("{}/{INDEX}/_mget", es.url())).json(&json!({"ids": ["a", "zzz", "b"]})).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let docs = v["docs"].as_array().unwrap();
    assert_eq!(docs.iter().map(|d| d["found"].as_bool().unwrap()).collect::<Vec<_>>(), vec![true, false, true]);
    assert_eq!(docs[2]["_source"]["item_id"], "b");
    let (_, v) = json_of(
        c.post(format!("{}/_mget", es.url()))
            .json(&json!({"docs": [{"_index": INDEX, "_id": "b"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["docs"][0]["_version"], 1);

    // _count sees the docs only after a refresh.
    let count = |v: &Value| v["count"].as_u64().unwrap();
    let (status, v) = json_of(c.get(format!("{}/{INDEX}/_count", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(count(&v), 0);
    let r = c.post(format!("{}/{INDEX}/_refresh", es.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, v) = json_of(c.get(format!("{}/{INDEX}/_count", es.url())).send().await.unwrap()).await;
    assert_eq!(count(&v), 2);
    assert!(v["_shards"]["total"].is_u64());
    let (_, v) = json_of(
        c.post(format!("{}/{INDEX}/_count", es.url()))
            .json(&json!({"query": {"term": {"item_id": "a"}}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(count(&v), 1);

    // A delete stays counted until the next refresh.
    post_bulk(&es, "/_bulk", ndjson(&[json!({"delete": {"_index": INDEX, "_id": "a"}})])).await.unwrap();
    let (_, v) = json_of(c.get(format!("{}/{INDEX}/_count", es.url())).send().await.unwrap()).await;
    assert_eq!(count(&v), 2);
    c.post(format!("{}/_refresh", es.url())).send().await.unwrap();
    let (_, v) = json_of(c.get(format!("{}/{INDEX}/_count", es.url())).send().await.unwrap()).await;
    assert_eq!(count(&v), 1);
    let (status, _) = json_of(c.get(format!("{}/nosuchindex/_count", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn es_standin_body_over_max_content_length_is_413() {
    let Some(es) = standin_with_index().await else { return };
    es.set_max_content_length(64 * 1024);
    let mut lines = Vec::new();
    for i in 0..40 {
        lines.push(index_action(&format!("d{i}")));
        lines.push(source("x", json!(vector(i as f32, DIMS))));
    }
    let body = ndjson(&lines);
    assert!(body.len() > 64 * 1024);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body.clone()).await.unwrap()).await;
    assert_eq!(status, 413);
    assert_es_error(&v, 413, "content_too_long_exception");
    assert_eq!(es.doc_count(INDEX), 0);

    // The limit applies to the decompressed size too.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(body.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    assert!(gz.len() < 64 * 1024);
    let r = client()
        .post(format!("{}/_bulk", es.url()))
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(gz)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(es.doc_count(INDEX), 0);
}

#[tokio::test]
async fn es_standin_index_lifecycle() {
    let es = Es::start().await;
    let c = client();
    let url = format!("{}/{INDEX}", es.url());
    assert_eq!(c.head(&url).send().await.unwrap().status(), 404);

    let body = json!({
        "settings": {"number_of_shards": 1, "refresh_interval": "1s"},
        "mappings": {"properties": {"text_embedding": {"type": "dense_vector", "dims": DIMS}}}
    });
    let (status, v) = json_of(c.put(&url).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"acknowledged": true, "shards_acknowledged": true, "index": INDEX}));
    assert_eq!(c.head(&url).send().await.unwrap().status(), 200);

    let (status, v) = json_of(c.put(&url).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert_es_error(&v, 400, "resource_already_exists_exception");

    // 8.14+ defaults are filled in.
    let (_, v) = json_of(c.get(format!("{url}/_mapping")).send().await.unwrap()).await;
    let field = &v[INDEX]["mappings"]["properties"]["text_embedding"];
    assert_eq!(field["dims"], DIMS);
    assert_eq!(field["index"], true);
    assert_eq!(field["similarity"], "cosine");
    assert_eq!(field["index_options"]["type"], "int8_hnsw");
    assert_eq!(es.mapping(INDEX).await.unwrap()["properties"]["text_embedding"]["dims"], DIMS);

    // Mappings Elasticsearch rejects.
    for (name, bad, error) in [
        (
            "knn",
            json!({"mappings": {"properties": {"v": {"type": "knn_vector", "dimension": 3}}}}),
            "mapper_parsing_exception",
        ),
        // Refused before the mapping is parsed.
        (
            "typed",
            json!({"mappings": {"_doc": {"properties": {"v": {"type": "keyword"}}}}}),
            "illegal_argument_exception",
        ),
        (
            "dims",
            json!({"mappings": {"properties": {"v": {"type": "dense_vector", "dims": 5000}}}}),
            "mapper_parsing_exception",
        ),
        (
            "sim",
            json!({"mappings": {"properties": {"v": {"type": "dense_vector", "dims": 3, "similarity": "euclid"}}}}),
            "mapper_parsing_exception",
        ),
        (
            "sim-unindexed",
            json!({"mappings": {"properties": {"v": {"type": "dense_vector", "dims": 3, "index": false, "similarity": "cosine"}}}}),
            "mapper_parsing_exception",
        ),
    ] {
        let (status, v) = json_of(c.put(format!("{}/bad-{name}", es.url())).json(&bad).send().await.unwrap()).await;
        assert_eq!(status, 400, "{name}: {v}");
        assert_es_error(&v, 400, error);
    }
    let (status, v) = json_of(
        c.put(format!("{}/bad-knn-setting", es.url()))
            .json(&json!({"settings": {"index.knn": true}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = json_of(c.put(format!("{}/UPPER", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert_es_error(&v, 400, "invalid_index_name_exception");

    let (status, v) = json_of(c.delete(&url).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(v["acknowledged"], true);
    assert_eq!(c.head(&url).send().await.unwrap().status(), 404);
    assert!(!es.index_exists(INDEX).await);
}

#[tokio::test]
async fn es_standin_bulk_auto_creates_missing_index_with_dynamic_mapping() {
    let es = Es::start().await;
    let body = ndjson(&[
        json!({"index": {"_index": "auto", "_id": "a"}}),
        json!({"name": "x", "n": 3, "emb": vector(0.5, 128), "small": [0.5, 0.25]}),
    ]);
    let (status, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(item_statuses(&v), vec![201]);
    let props = es.mapping("auto").await.unwrap()["properties"].clone();
    assert_eq!(props["name"]["type"], "text");
    assert_eq!(props["n"]["type"], "long");
    assert_eq!(props["small"]["type"], "float");
    // 8.11+: a float array of 128..=4096 numbers becomes a cosine dense_vector.
    assert_eq!(props["emb"]["type"], "dense_vector");
    assert_eq!(props["emb"]["dims"], 128);
    // ...which later documents must then fit.
    let body = ndjson(&[json!({"index": {"_index": "auto", "_id": "b"}}), json!({"emb": vector(0.5, 129)})]);
    let (_, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(item_statuses(&v), vec![400]);

    // With auto-creation off, the item fails with index_not_found_exception.
    es.set_auto_create_index(false).await;
    let body = ndjson(&[json!({"index": {"_index": "other", "_id": "a"}}), json!({"x": 1})]);
    let (_, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    es.set_auto_create_index(true).await;
    assert_eq!(item_statuses(&v), vec![404]);
    assert_eq!(item(&v, 0, "index")["error"]["type"], "index_not_found_exception");
}

#[tokio::test]
async fn es_standin_strict_mapping_and_vector_dims_from_first_doc() {
    let es = Es::start().await;
    es.create_index(
        "strict",
        json!({"mappings": {"dynamic": "strict", "properties": {"v": {"type": "dense_vector", "similarity": "dot_product"}}}}),
    ).await
    .unwrap();
    let action = |id: &str| json!({"index": {"_index": "strict", "_id": id}});
    let body = ndjson(&[
        action("a"),
        json!({"v": [0.6, 0.8]}),
        action("b"),
        json!({"v": [0.6, 0.8, 0.0]}),
        action("c"),
        json!({"v": [1.0, 1.0]}),
        action("d"),
        json!({"v": [0.0, 1.0], "extra": 1}),
    ]);
    let (_, v) = json_of(post_bulk(&es, "/_bulk", body).await.unwrap()).await;
    assert_eq!(item_statuses(&v), vec![201, 400, 400, 400]);
    assert_eq!(es.mapping("strict").await.unwrap()["properties"]["v"]["dims"], 2, "dims set by the first document");
    assert!(item(&v, 2, "index")["error"]["reason"].as_str().unwrap().contains("unit-length"));
    assert_eq!(item(&v, 3, "index")["error"]["type"], "strict_dynamic_mapping_exception");
}

#[tokio::test]
async fn es_standin_filter_path_keeps_only_what_was_asked() {
    let es = Es::with_index().await;
    let body = ndjson(&[
        index_action("good"),
        source("good", json!(vector(0.1, DIMS))),
        index_action("bad"),
        source("bad", json!(vector(0.1, 3))),
    ]);
    let (status, v) =
        json_of(post_bulk(&es, "/_bulk?filter_path=errors,items.*.error", body.clone()).await.unwrap()).await;
    assert_eq!(status, 200);
    // As in Elasticsearch, items with nothing left are dropped: positions are lost.
    assert_eq!(v["errors"], true);
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["items"][0]["index"]["error"]["type"], "document_parsing_exception");
    assert!(v.get("took").is_none());

    let (_, v) = json_of(post_bulk(&es, "/_bulk?filter_path=-items", body).await.unwrap()).await;
    assert!(v.get("items").is_none() && v.get("took").is_some());
}

#[tokio::test]
async fn es_standin_pause_holds_bulk_requests_until_resume() {
    let Some(es) = standin_with_index().await else { return };
    es.faults().pause();
    let url = format!("{}/_bulk", es.url());
    let body = ndjson(&[index_action("p"), source("p", json!(vector(0.1, DIMS)))]);
    let pending = tokio::spawn(async move {
        client().post(url).header("content-type", "application/x-ndjson").body(body).send().await
    });
    assert!(es.wait_until(WAIT, |es| es.stats().bulk_paused == 1).await, "the request is held");
    assert_eq!(es.stats().bulk_in_flight, 1);
    assert_eq!(es.doc_count(INDEX), 0);
    assert!(!pending.is_finished());

    es.faults().resume();
    let r = pending.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert!(es.wait_for_docs(INDEX, 1, WAIT).await);
    assert!(es.wait_until(WAIT, |es| es.stats().bulk_in_flight == 0).await);
    assert_eq!(es.stats().max_bulk_in_flight, 1);
}

#[tokio::test]
async fn es_standin_latency_lets_the_client_time_out_while_the_write_lands() {
    let Some(es) = standin_with_index().await else { return };
    es.faults().set_latency(Duration::from_millis(400));
    let body = ndjson(&[index_action("slow"), source("slow", json!(vector(0.1, DIMS)))]);
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(50)).build().unwrap();
    let err = impatient
        .post(format!("{}/_bulk", es.url()))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect_err("times out");
    assert!(err.is_timeout(), "{err:?}");
    assert!(es.wait_for_docs(INDEX, 1, WAIT).await, "applied after the client gave up");
    assert!(!es.wait_for_docs(INDEX, 2, Duration::from_millis(50)).await);
}

#[tokio::test]
async fn es_standin_rejects_bad_methods_endpoints_and_content_types() {
    let es = Es::with_index().await;
    let c = client();
    let (status, v) = json_of(c.get(format!("{}/_bulk", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 405);
    assert!(v["error"].as_str().unwrap().contains("Incorrect HTTP method"), "{v}");
    // An unknown endpoint under an index: 405 for GET (a POST-only route matches its shape),
    // no handler for POST or deeper paths.
    let (status, v) = json_of(c.get(format!("{}/{INDEX}/_nope", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 405);
    assert!(v["error"].as_str().unwrap().contains("allowed: [POST]"), "{v}");
    let (status, v) = json_of(c.post(format!("{}/{INDEX}/_nope", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("no handler found"), "{v}");
    let (status, v) = json_of(c.get(format!("{}/{INDEX}/_nope/x", es.url())).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("no handler found"), "{v}");
    let body = ndjson(&[index_action("a"), source("a", json!(vector(0.1, DIMS)))]);
    let r = c.post(format!("{}/_bulk", es.url())).header("content-type", "text/plain").body(body).send().await.unwrap();
    assert_eq!(r.status(), 406);
    // An 8.x server refuses the 9.x compatibility header.
    let r =
        c.get(es.url()).header("accept", "application/vnd.elasticsearch+json; compatible-with=9").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(es.doc_count(INDEX).await, 0);
}

#[tokio::test]
async fn es_standin_unavailable_stop_and_restart() {
    let Some(es) = standin_with_index().await else { return };
    es.faults().set_unavailable(true);
    let (status, v) = json_of(client().get(es.url()).send().await.unwrap()).await;
    assert_eq!(status, 503);
    assert_es_error(&v, 503, "cluster_block_exception");
    es.faults().set_unavailable(false);

    let body = ndjson(&[index_action("a"), source("a", json!(vector(0.1, DIMS)))]);
    post_bulk(&es, "/_bulk", body).await.unwrap();
    es.stop();
    let err = client().get(es.url()).send().await.expect_err("nobody listens");
    assert!(err.is_connect(), "{err:?}");
    es.restart().await;
    let r = client().get(format!("{}/{INDEX}/_doc/a", es.url())).send().await.unwrap();
    assert_eq!(r.status(), 200, "data survives a restart");
}

#[tokio::test]
async fn es_standin_official_client_talks_to_the_stand_in() {
    use elasticsearch::http::request::JsonBody;
    use elasticsearch::http::transport::{SingleNodeConnectionPool, Transport, TransportBuilder};
    use elasticsearch::http::Url;
    use elasticsearch::indices::{IndicesCreateParts, IndicesExistsParts};
    use elasticsearch::{BulkParts, Elasticsearch, GetParts};

    let es = EsStandin::start().await;
    let client = Elasticsearch::new(Transport::single_node(&es.url()).unwrap());

    let info: Value = client.info().send().await.unwrap().json().await.unwrap();
    assert_eq!(info["version"]["number"], crate::support::es_standin::ES_VERSION);

    let exists = client.indices().exists(IndicesExistsParts::Index(&[INDEX])).send().await.unwrap();
    assert_eq!(exists.status_code().as_u16(), 404);
    let created = client
        .indices()
        .create(IndicesCreateParts::Index(INDEX))
        .body(json!({"mappings": {"properties": {"text_embedding": {"type": "dense_vector", "dims": DIMS}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status_code().as_u16(), 200);

    let body: Vec<bytes::Bytes> = vec![
        bytes::Bytes::from(json!({"index": {"_id": "a"}}).to_string()),
        bytes::Bytes::from(source("a", json!(vector(0.1, DIMS))).to_string()),
        bytes::Bytes::from(json!({"index": {"_id": "bad"}}).to_string()),
        bytes::Bytes::from(source("bad", json!(vector(0.1, 2))).to_string()),
    ];
    let resp = client.bulk(BulkParts::Index(INDEX)).body(body).send().await.unwrap();
    assert_eq!(resp.status_code().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(item_statuses(&v), vec![201, 400]);
    assert!(es.doc(INDEX, "a").is_some());

    // The same through a gzip-compressing transport.
    let transport = TransportBuilder::new(SingleNodeConnectionPool::new(Url::parse(&es.url()).unwrap()))
        .request_body_compression(true)
        .build()
        .unwrap();
    let gz_client = Elasticsearch::new(transport);
    let body: Vec<JsonBody<Value>> =
        vec![json!({"index": {"_id": "b"}}).into(), source("b", json!(vector(0.2, DIMS))).into()];
    let resp = gz_client.bulk(BulkParts::Index(INDEX)).body(body).send().await.unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(item_statuses(&v), vec![201]);

    let got: Value = client.get(GetParts::IndexId(INDEX, "b")).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["found"], true);

    // What the client sent, as the stand-in saw it.
    let bulks: Vec<_> = es.requests().into_iter().filter(|r| r.is_bulk()).collect();
    assert_eq!(bulks.len(), 2);
    assert!(bulks[0].header("x-elastic-client-meta").is_some());
    assert_eq!(bulks[0].header("content-type"), Some("application/json"));
    assert_eq!(bulks[1].header("content-encoding"), Some("gzip"));
    assert!(bulks[1].body_bytes < bulks[1].decoded_body_bytes);
}
