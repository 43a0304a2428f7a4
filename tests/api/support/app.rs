//! Spawns the real application on port 0 with a fresh config, like the binary does.

use std::time::Duration;

use embedjoin::{Application, Settings};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::es::EsTarget;
use super::redis_cluster::RedisCluster;
use super::redis_server::RedisServer;

pub struct TestApp {
    pub address: String,
    pub settings: Settings,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Settings for a test: free port, the test's Redis and Elasticsearch, small workers.
pub fn test_settings(redis: &RedisServer, es: &EsTarget) -> Settings {
    let mut s = base_settings(es);
    s.redis.url = redis.url();
    s
}

/// Settings for a test on a Redis Cluster (cluster mode: `redis.cluster_nodes`).
pub fn cluster_settings(cluster: &RedisCluster, es: &EsTarget) -> Settings {
    let mut s = base_settings(es);
    s.redis.cluster_nodes = cluster.seeds();
    s
}

fn base_settings(es: &EsTarget) -> Settings {
    let mut s = Settings::defaults();
    // The defaults are embedded + file; these tests are about Redis and Elasticsearch.
    s.state.backend = embedjoin::config::StateBackend::Redis;
    s.sink.backend = embedjoin::config::SinkBackend::Elasticsearch;
    s.http.bind = "127.0.0.1:0".into();
    s.http.workers = 2;
    s.elasticsearch.url = es.url.clone();
    s.elasticsearch.index = es.index.clone();
    // Stored, not HNSW-indexed, vectors: no test searches them, and a real engine spends
    // most of its indexing time building the graph (the mapping test turns it back on).
    s.elasticsearch.index_vectors = false;
    s.elasticsearch.retry_initial_backoff = Duration::from_millis(10);
    s.elasticsearch.retry_max_backoff = Duration::from_millis(200);
    s.shards.count = 4;
    // The suite runs many services at once on 2 cores: a flush that times out after Redis
    // applied it is handled safely, but may index a document twice, which tests count.
    s.redis.response_timeout = Duration::from_secs(30);
    // A cluster without painless (the test Elasticsearch: its module is not on Maven
    // Central) takes no guarded updates: the service then runs as a user would configure it
    // there, and the tests of updates skip themselves.
    if !es.painless {
        s.state.late_parts = embedjoin::config::LatePartsAction::NewItem;
    }
    s
}

pub async fn spawn_app(settings: Settings) -> TestApp {
    let app = Application::build(settings.clone()).await.expect("the application starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp { address, settings, http: reqwest::Client::new(), stop: Some(stop), task: Some(task) }
}

impl TestApp {
    pub async fn post_json(&self, body: &Value) -> reqwest::Response {
        self.post_raw(serde_json::to_vec(body).unwrap(), "application/json").await
    }

    pub async fn post_raw(&self, body: impl Into<reqwest::Body>, content_type: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/aggregate/", self.address))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("the request is answered")
    }

    /// Graceful shutdown: drains the pipeline; returns how the service ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.expect("the service task")
    }
}
