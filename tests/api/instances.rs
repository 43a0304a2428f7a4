//! Several instances behind a load balancer share one Redis: the parts of an item may land
//! on different instances, and the item must still be completed exactly once.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::end_to_end::{assert_indexed_exactly, redis_keys};
use crate::support::app::{spawn_app, test_settings, TestApp};
use crate::support::data::{item, IMAGE, TEXT};
use crate::support::es::EsTarget;
use crate::support::load::post_all;
use crate::support::redis_server::RedisServer;

/// Sends every text of `ids` to `a` and every image to `b`, at the same time, shuffled.
pub(crate) async fn texts_to_one_images_to_the_other(a: &TestApp, b: &TestApp, ids: &[String], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut texts: Vec<Value> = ids.iter().map(|id| item(id, TEXT, 384)).collect();
    let mut images: Vec<Value> = ids.iter().map(|id| item(id, IMAGE, 512)).collect();
    texts.shuffle(&mut rng);
    images.shuffle(&mut rng);
    // Texts only to `a`, images only to `b`, at the same time.
    let to_a: Vec<Vec<Value>> = texts.chunks(100).map(<[Value]>::to_vec).collect();
    let to_b: Vec<Vec<Value>> = images.chunks(100).map(<[Value]>::to_vec).collect();
    let (only_a, only_b) = ([a], [b]);
    let (sent_a, sent_b) = tokio::join!(post_all(&only_a, to_a, 4), post_all(&only_b, to_b, 4));
    assert_eq!(sent_a + sent_b, 2 * ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_split_across_instances_complete_exactly_once() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let a = spawn_app(test_settings(&redis, &es)).await;
    let b = spawn_app(test_settings(&redis, &es)).await;
    let ids: Vec<String> = (0..3_000).map(|i| format!("x-{i}")).collect();
    texts_to_one_images_to_the_other(&a, &b, &ids, 3).await;

    let writes = assert_indexed_exactly(&es, &ids).await;
    assert_eq!(writes, ids.len() as u64, "each item indexed once");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(redis_keys(&redis).await, Vec::<String>::new());
}
