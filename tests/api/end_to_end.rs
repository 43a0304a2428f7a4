//! Parts in, complete documents out: every item indexed once, with exactly the vectors sent.

use std::time::Duration;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::support::app::{spawn_app, test_settings};
use crate::support::data::{item, stored_vector, vector, IMAGE, TEXT};
use crate::support::es::EsTarget;
use crate::support::load::post_all;
use crate::support::redis_server::{item_key, key_role, RedisServer};

const TEXT_DIMS: usize = 384;
const IMAGE_DIMS: usize = 512;

fn parts_of(ids: &[String]) -> Vec<Value> {
    ids.iter().flat_map(|id| [item(id, TEXT, TEXT_DIMS), item(id, IMAGE, IMAGE_DIMS)]).collect()
}

/// Asserts every id (and nothing else) is indexed with its exact vectors; returns how many
/// writes the index took in all (its one shard numbers writes: the largest `_seq_no` + 1),
/// so that `ids.len()` means each document was written once.
pub async fn assert_indexed_exactly(es: &EsTarget, ids: &[String]) -> u64 {
    let count = es.wait_for_count(ids.len(), Duration::from_secs(120)).await;
    assert_eq!(count, ids.len(), "documents in the index");
    let docs = es.docs(ids).await;
    assert_eq!(docs.len(), ids.len(), "documents found by id");
    for id in ids {
        let doc = &docs[id];
        assert_eq!(doc.source["id"], id.as_str());
        assert_eq!(stored_vector(&doc.source, "text_embedding"), vector(id, TEXT, TEXT_DIMS, 0), "{id} text");
        assert_eq!(stored_vector(&doc.source, "image_embedding"), vector(id, IMAGE, IMAGE_DIMS, 0), "{id} image");
        assert!(doc.source["completed_at"].is_string());
    }
    docs.values().map(|d| d.seq_no + 1).max().unwrap_or(0)
}

/// Keys left in Redis that hold every part: there must be none.
pub async fn complete_items_left_in_redis(redis: &RedisServer) -> usize {
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("embedjoin:{*}i:*").query_async(&mut conn).await.unwrap();
    let mut complete = 0;
    for key in keys {
        let fields: Vec<String> = redis::cmd("HKEYS").arg(&key).query_async(&mut conn).await.unwrap();
        if fields.iter().any(|f| f == TEXT) && fields.iter().any(|f| f == IMAGE) {
            complete += 1;
        }
    }
    complete
}

/// Keys left in Redis, by role ([`key_role`]: `i:x`, `partials`, ...), but the epoch
/// markers and the layout (which stay for the life of the data), completed items' records (the stamps of
/// their parts: no vector, no metadata), and a running instance's maintenance leases and
/// announcement (released when it stops).
pub async fn redis_keys(redis: &RedisServer) -> Vec<String> {
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    let mut left: Vec<String> = keys
        .iter()
        .map(|k| key_role(k))
        .filter(|role| !["epoch", "layout", "lease", "instances"].contains(role) && !role.starts_with("r:"))
        .map(str::to_owned)
        .collect();
    left.sort();
    left
}

/// How many completed items Redis remembers (fields of the record hashes).
pub async fn records_in_redis(redis: &RedisServer) -> usize {
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("embedjoin:{*}r:*").query_async(&mut conn).await.unwrap();
    let mut records = 0;
    for key in keys {
        let n: usize = redis::cmd("HLEN").arg(&key).query_async(&mut conn).await.unwrap();
        records += n;
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_items_in_random_order_are_each_indexed_once_with_their_vectors() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let app = spawn_app(test_settings(&redis, &es)).await;
    let ids: Vec<String> = (0..10_000).map(|i| format!("sku-{i}")).collect();
    let mut parts = parts_of(&ids);
    parts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let batches: Vec<Vec<Value>> = parts.chunks(100).map(<[Value]>::to_vec).collect();
    assert_eq!(post_all(&[&app], batches, 8).await, 20_000);

    let writes = assert_indexed_exactly(&es, &ids).await;
    assert_eq!(writes, ids.len() as u64, "every document indexed once");
    app.stop().await.unwrap();
    assert_eq!(complete_items_left_in_redis(&redis).await, 0);
    assert_eq!(redis_keys(&redis).await, Vec::<String>::new(), "nothing left in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_parts_in_one_batch_complete_in_memory() {
    // The Python service lost every item whose two parts arrived in one batch.
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let app = spawn_app(test_settings(&redis, &es)).await;
    let ids: Vec<String> = (0..2_000).map(|i| format!("pair-{i}")).collect();
    let batches: Vec<Vec<Value>> = parts_of(&ids).chunks(100).map(<[Value]>::to_vec).collect();
    post_all(&[&app], batches, 4).await;

    let writes = assert_indexed_exactly(&es, &ids).await;
    assert_eq!(writes, ids.len() as u64, "every document indexed once");
    app.stop().await.unwrap();
    assert_eq!(redis_keys(&redis).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_sent_twice_still_yield_one_complete_document_per_item() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut settings = test_settings(&redis, &es);
    settings.shards.flush_interval = Duration::from_millis(5);
    let app = spawn_app(settings).await;
    let ids: Vec<String> = (0..3_000).map(|i| format!("dup-{i}")).collect();
    let mut parts = parts_of(&ids);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let again: Vec<Value> = parts.iter().filter(|_| rand::Rng::random_bool(&mut rng, 0.2)).cloned().collect();
    parts.extend(again);
    parts.shuffle(&mut rng);
    post_all(&[&app], parts.chunks(50).map(<[Value]>::to_vec).collect(), 8).await;

    assert_indexed_exactly(&es, &ids).await;
    app.stop().await.unwrap();
    assert_eq!(complete_items_left_in_redis(&redis).await, 0, "a complete item left in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_merged_into_the_document_and_the_index_has_vector_mappings() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let mut settings = test_settings(&redis, &es);
    settings.elasticsearch.index_vectors = true;
    let app = spawn_app(settings).await;
    let mut text = item("m-1", TEXT, TEXT_DIMS);
    text["metadata"] = serde_json::json!({"title": "a red shoe", "lang": "en"});
    let mut image = item("m-1", IMAGE, IMAGE_DIMS);
    image["metadata"] = serde_json::json!({"lang": "und", "width": 640});
    // Parts in two requests far enough apart that the first is persisted to Redis.
    let r = app.post_json(&serde_json::json!({"embeddings": [text]})).await;
    assert_eq!(r.status(), 202);
    let mut conn = redis.connection().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while redis_keys(&redis).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the partial never reached Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ttl: i64 = redis::cmd("PTTL").arg(item_key("m-1")).query_async(&mut conn).await.unwrap();
    assert!(ttl > 0, "partials carry a TTL");
    let r = app.post_json(&serde_json::json!({"embeddings": [image]})).await;
    assert_eq!(r.status(), 202);

    assert_eq!(es.wait_for_count(1, Duration::from_secs(30)).await, 1);
    let doc = es.doc("m-1").await.unwrap().source;
    assert_eq!(doc["title"], "a red shoe");
    assert_eq!(doc["lang"], "und", "the later part's metadata wins");
    assert_eq!(doc["width"], 640);
    let mapping = es.mapping().await;
    let props = &mapping[&es.index]["mappings"]["properties"];
    if es.is_opensearch().await {
        assert_eq!(props["text_embedding"]["type"], "knn_vector");
        assert_eq!(props["text_embedding"]["dimension"], 384);
        assert_eq!(props["image_embedding"]["dimension"], 512);
        let method = &props["image_embedding"]["method"];
        assert_eq!((&method["engine"], &method["space_type"]), (&"lucene".into(), &"cosinesimil".into()), "{method}");
    } else {
        assert_eq!(props["text_embedding"]["type"], "dense_vector");
        assert_eq!(props["text_embedding"]["dims"], 384);
        assert_eq!(props["image_embedding"]["dims"], 512);
        assert_eq!(props["image_embedding"]["similarity"], "cosine");
    }
    app.stop().await.unwrap();
    assert_eq!(redis_keys(&redis).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_bodies_with_binary_vectors_are_indexed_bit_exact() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let app = spawn_app(test_settings(&redis, &es)).await;
    // What a numpy client sends: vectors as little-endian f32 bytes (`bin`).
    fn part(id: &str, kind: &str, dims: usize) -> rmpv::Value {
        let bytes: Vec<u8> = vector(id, kind, dims, 0).iter().flat_map(|x| x.to_le_bytes()).collect();
        rmpv::Value::Map(vec![
            ("id".into(), id.into()),
            ("embedding_type".into(), kind.into()),
            ("embedding".into(), rmpv::Value::Binary(bytes)),
        ])
    }
    let items = vec![part("bin-1", TEXT, TEXT_DIMS), part("bin-1", IMAGE, IMAGE_DIMS), part("bin-2", TEXT, 7)];
    let body = rmpv::Value::Map(vec![("embeddings".into(), rmpv::Value::Array(items))]);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &body).unwrap();
    let response = app.post_raw(bytes, "application/msgpack").await;
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["rejected"][0]["code"], "wrong_dims");

    assert_eq!(es.wait_for_count(1, Duration::from_secs(30)).await, 1);
    let doc = es.doc("bin-1").await.unwrap().source;
    assert_eq!(stored_vector(&doc, "text_embedding"), vector("bin-1", TEXT, TEXT_DIMS, 0));
    assert_eq!(stored_vector(&doc, "image_embedding"), vector("bin-1", IMAGE, IMAGE_DIMS, 0));
    assert_eq!(app.post_raw(vec![0xc1u8], "application/msgpack").await.status(), 400, "not MessagePack");
    app.stop().await.unwrap();
}
