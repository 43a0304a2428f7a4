//! The Elasticsearch a test writes to: the strict stand-in by default, or a real cluster
//! when `EMBEDJOIN_TEST_ES_URL` is set (each test then uses its own index).
//! Everything here goes over HTTP, so the same assertions hold for both.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::es_standin::EsStandin;

pub struct EsTarget {
    pub url: String,
    pub index: String,
    /// Whether the cluster runs painless scripts (guarded updates need them).
    pub painless: bool,
    /// Elasticsearch 9+, which leaves vectors out of `_source` unless asked
    /// (`_source_exclude_vectors=false`).
    vectors_on_request: bool,
    standin: Option<EsStandin>,
    http: reqwest::Client,
}

/// A stored document: how many times it was indexed, and its source.
#[derive(Debug, Clone)]
pub struct StoredDoc {
    /// `_version`: with `state.late_parts = "new_item"` embedjoin's external version (the
    /// newest part's stamp); with guarded updates, the engine's own count of writes.
    pub version: u64,
    /// `_seq_no` of its last write (one primary shard: it counts writes to the index).
    pub seq_no: u64,
    pub source: Value,
}

impl StoredDoc {
    /// The stamp of each part, as the document records it (`_parts`).
    pub fn stamp(&self, type_name: &str) -> Option<u64> {
        self.source["_parts"][type_name].as_u64()
    }

    /// The newest stamp of its parts: the version of the completion it holds.
    pub fn newest(&self) -> u64 {
        let parts = self.source["_parts"].as_object();
        parts.into_iter().flatten().filter_map(|(_, s)| s.as_u64()).max().unwrap_or(0)
    }
}

impl EsTarget {
    pub async fn start() -> EsTarget {
        let index = format!("embedjoin-test-{:08x}", rand::random::<u32>());
        let http = reqwest::Client::new();
        let mut target = match std::env::var("EMBEDJOIN_TEST_ES_URL") {
            Ok(url) if !url.is_empty() => {
                let url = url.trim_end_matches('/').to_owned();
                EsTarget { url, index, painless: true, vectors_on_request: false, standin: None, http }
            }
            _ => {
                let standin = EsStandin::start().await;
                EsTarget {
                    url: standin.url(),
                    index,
                    painless: true,
                    vectors_on_request: false,
                    standin: Some(standin),
                    http,
                }
            }
        };
        target.painless = target.runs_painless().await;
        target.vectors_on_request =
            target.engine().await.is_some_and(|(name, major, _)| name == "Elasticsearch" && major >= 9);
        target
    }

    /// The engine (`Elasticsearch` or `OpenSearch`) and its major and minor version, as
    /// `GET /` says.
    pub async fn engine(&self) -> Option<(&'static str, u64, u64)> {
        let root: Value = self.http.get(&self.url).send().await.ok()?.json().await.ok()?;
        let name = if root["version"]["distribution"] == "opensearch" { "OpenSearch" } else { "Elasticsearch" };
        let mut numbers = root["version"]["number"].as_str()?.split('.').map(|n| n.parse::<u64>().ok());
        Some((name, numbers.next()??, numbers.next()??))
    }

    /// Asks the cluster to run a painless script, as the service does at start.
    async fn runs_painless(&self) -> bool {
        let probe = serde_json::json!({"script": {"lang": "painless", "source": "params.x + 1", "params": {"x": 1}}});
        let r = self.http.post(format!("{}/_scripts/painless/_execute", self.url)).json(&probe).send().await.unwrap();
        r.status().is_success()
    }

    /// Whether a test of guarded updates can run here; says so when it cannot.
    pub fn skip_without_painless(&self, test: &str) -> bool {
        if !self.painless {
            eprintln!("{test}: skipped: the cluster runs no painless scripts (guarded updates need them)");
        }
        !self.painless
    }

    /// The stand-in, for fault injection; `None` against a real cluster (skip such tests).
    pub fn standin(&self) -> Option<&EsStandin> {
        self.standin.as_ref()
    }

    pub async fn refresh(&self) {
        // Its answer is not checked: `count` asks again while the engine is not ready.
        let _ = self.http.post(format!("{}/{}/_refresh", self.url, self.index)).send().await;
    }

    /// Documents visible to search, after a refresh. A real engine may answer 503 for a
    /// moment after the index is created (its shards not yet started): asked again then.
    pub async fn count(&self) -> usize {
        let mut last = String::new();
        for _ in 0..100 {
            self.refresh().await;
            let r = self.http.get(format!("{}/{}/_count", self.url, self.index)).send().await.unwrap();
            let status = r.status();
            if status == 404 {
                return 0;
            }
            let v: Value = r.json().await.unwrap_or_default();
            if let Some(count) = v["count"].as_u64().filter(|_| status.is_success()) {
                return count as usize;
            }
            last = format!("{status} {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("_count kept failing: {last}");
    }

    /// Waits until `n` documents are visible, or the timeout; returns the last count.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.count().await;
            if count >= n || Instant::now() >= deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fetches documents by id (realtime), in chunks.
    pub async fn docs(&self, ids: &[String]) -> HashMap<String, StoredDoc> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(500) {
            let r = self
                .http
                .post(format!("{}/{}/_mget{}", self.url, self.index, self.with_vectors()))
                .json(&serde_json::json!({ "ids": chunk }))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "_mget: {}", r.status());
            let v: Value = r.json().await.unwrap();
            for d in v["docs"].as_array().expect("docs") {
                if d["found"] == true {
                    let id = d["_id"].as_str().unwrap().to_owned();
                    let version = d["_version"].as_u64().unwrap();
                    let seq_no = d["_seq_no"].as_u64().expect("_seq_no");
                    out.insert(id, StoredDoc { version, seq_no, source: d["_source"].clone() });
                }
            }
        }
        out
    }

    /// The query string that asks for vectors in `_source` where the engine leaves them out.
    fn with_vectors(&self) -> &'static str {
        if self.vectors_on_request {
            "?_source_exclude_vectors=false"
        } else {
            ""
        }
    }

    pub async fn doc(&self, id: &str) -> Option<StoredDoc> {
        self.docs(&[id.to_owned()]).await.remove(id)
    }

    /// Indexes a document directly, with an external version (as another writer would).
    pub async fn put_versioned(&self, id: &str, source: &Value, version: u64) {
        let url =
            format!("{}/{}/_doc/{id}?version={version}&version_type=external_gte&refresh=true", self.url, self.index);
        let r = self.http.put(url).json(source).send().await.unwrap();
        assert!(r.status().is_success(), "PUT _doc: {} {}", r.status(), r.text().await.unwrap_or_default());
    }

    /// Whether the cluster is OpenSearch (its `GET /` says `"distribution": "opensearch"`).
    pub async fn is_opensearch(&self) -> bool {
        let root: Value = self.http.get(&self.url).send().await.unwrap().json().await.unwrap();
        root["version"]["distribution"] == "opensearch"
    }

    pub async fn mapping(&self) -> Value {
        let r = self.http.get(format!("{}/{}/_mapping", self.url, self.index)).send().await.unwrap();
        r.json().await.unwrap()
    }
}
