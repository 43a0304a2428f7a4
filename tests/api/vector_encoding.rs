//! `elasticsearch.vector_encoding = "base64"` against a real Elasticsearch 9.3+, the first
//! version that reads a `dense_vector` as base64 of big-endian float32. The stand-in and the
//! engines `scripts/test` starts (Elasticsearch 8.17, OpenSearch 2.19) do not, so this runs
//! only when `EMBEDJOIN_TEST_ES_URL` names such an engine (the test skips itself otherwise):
//!
//! ```sh
//! scripts/search-engine --engine elasticsearch9 --port 9293 &
//! EMBEDJOIN_TEST_ES_URL=http://127.0.0.1:9293 cargo test --test api vector_encoding::
//! ```

use std::time::Duration;

use embedjoin::config::VectorEncoding;
use serde_json::Value;

use crate::support::app::{spawn_app, test_settings};
use crate::support::data::{batch, item, stored_vector, vector, IMAGE, TEXT};
use crate::support::es::EsTarget;
use crate::support::redis_server::RedisServer;

const TEXT_DIMS: usize = 384;
const IMAGE_DIMS: usize = 512;

/// Documents whose parts meet in memory and whose parts meet in Redis are indexed with
/// base64 vectors, and the engine reads back the very floats sent, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_vectors_are_indexed_as_the_floats_sent() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    match es.engine().await.filter(|_| es.standin().is_none()) {
        Some(("Elasticsearch", major, minor)) if (major, minor) >= (9, 3) => {}
        other => {
            eprintln!("base64 vectors: skipped: needs Elasticsearch 9.3 or later (this is {other:?})");
            return;
        }
    }
    let mut settings = test_settings(&redis, &es);
    settings.elasticsearch.vector_encoding = VectorEncoding::Base64;
    // Indexed vectors: Elasticsearch 9 then keeps them out of the stored `_source` and
    // returns them, when asked, from what it indexed, as arrays of floats; unindexed ones
    // stay in `_source` as sent (base64 text), which would prove nothing.
    settings.elasticsearch.index_vectors = true;
    // With `cosine` (the default) the engine indexes each vector normalised and returns it
    // rebuilt from that, a last bit off here and there, whatever the encoding; `l2_norm`
    // indexes it as it is.
    settings.elasticsearch.similarity = embedjoin::config::Similarity::L2Norm;
    settings.shards.flush_interval = Duration::from_millis(20);
    let app = spawn_app(settings).await;
    let ids: Vec<String> = (0..20).map(|i| format!("b64-{i}")).collect();
    // Half the items in one request (they meet in memory), half part by part in two
    // requests, the second after a flush (they meet in Redis).
    let (together, apart) = ids.split_at(10);
    let both: Vec<Value> =
        together.iter().flat_map(|id| [item(id, TEXT, TEXT_DIMS), item(id, IMAGE, IMAGE_DIMS)]).collect();
    assert!(app.post_json(&batch(both)).await.status().is_success());
    let texts: Vec<Value> = apart.iter().map(|id| item(id, TEXT, TEXT_DIMS)).collect();
    assert!(app.post_json(&batch(texts)).await.status().is_success());
    tokio::time::sleep(Duration::from_millis(200)).await; // a flush or more: the texts go to Redis
    let images: Vec<Value> = apart.iter().map(|id| item(id, IMAGE, IMAGE_DIMS)).collect();
    assert!(app.post_json(&batch(images)).await.status().is_success());
    assert_eq!(es.wait_for_count(ids.len(), Duration::from_secs(60)).await, ids.len());

    // Elasticsearch 9 returns indexed vectors, on request, from what it indexed.
    let docs = es.docs(&ids).await;
    for id in &ids {
        let doc = docs.get(id).unwrap_or_else(|| panic!("{id} is indexed"));
        for (part, field, dims) in [(TEXT, "text_embedding", TEXT_DIMS), (IMAGE, "image_embedding", IMAGE_DIMS)] {
            let (stored, sent) = (stored_vector(&doc.source, field), vector(id, part, dims, 0));
            assert_eq!(stored.len(), sent.len(), "{id}: {field}");
            for (a, b) in stored.iter().zip(&sent) {
                assert_eq!(a.to_bits(), b.to_bits(), "{id}: {field}: {a} indexed for {b}");
            }
        }
    }
}
