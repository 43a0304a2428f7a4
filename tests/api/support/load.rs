//! Sends many batches concurrently and checks each answer.

use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::app::TestApp;

/// Posts every batch, `concurrency` at a time, to the apps in turn; asserts that each is
/// answered 202 with every item accepted. Returns the number of items sent.
pub async fn post_all(apps: &[&TestApp], batches: Vec<Vec<Value>>, concurrency: usize) -> usize {
    let total: usize = batches.iter().map(Vec::len).sum();
    let queue = Arc::new(Mutex::new(batches.into_iter().enumerate().collect::<Vec<_>>()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let queue = queue.clone();
        let targets: Vec<(String, reqwest::Client)> =
            apps.iter().map(|a| (a.address.clone(), a.http.clone())).collect();
        tasks.spawn(async move {
            loop {
                let Some((n, items)) = queue.lock().unwrap().pop() else { return };
                let (address, http) = &targets[n % targets.len()];
                let count = items.len();
                let response = http
                    .post(format!("{address}/aggregate/"))
                    .json(&serde_json::json!({ "embeddings": items }))
                    .send()
                    .await
                    .expect("answered");
                let status = response.status();
                let body: Value = response.json().await.expect("a JSON answer");
                assert_eq!(status, 202, "batch {n}: {body}");
                assert_eq!(body["accepted"], count, "batch {n}: {body}");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a sender task");
    }
    total
}

/// What a client saw while sending with retries.
#[derive(Debug, Default, Clone)]
pub struct ClientTally {
    /// Batches answered 202.
    pub acknowledged: usize,
    /// 503 answers (each retried).
    pub unavailable: usize,
    /// Requests that failed without an answer (each retried).
    pub no_answer: usize,
}

/// Posts one batch until it is acknowledged (202), retrying 503s and connection errors
/// like a well-behaved client, for at most `patience`. `address` is asked again before
/// every try (a load balancer may have moved on to another instance). Returns whether it was acknowledged.
pub async fn post_until_acknowledged(
    http: &reqwest::Client,
    address: impl Fn() -> String,
    items: &[Value],
    patience: std::time::Duration,
    tally: &Mutex<ClientTally>,
) -> bool {
    let deadline = std::time::Instant::now() + patience;
    let body = serde_json::json!({ "embeddings": items });
    while std::time::Instant::now() < deadline {
        let sent = http
            .post(format!("{}/aggregate/", address()))
            .timeout(std::time::Duration::from_secs(60))
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 202 => {
                tally.lock().unwrap().acknowledged += 1;
                return true;
            }
            Ok(r) if r.status() == 503 => {
                assert!(r.headers().contains_key("retry-after"), "503 without Retry-After");
                tally.lock().unwrap().unavailable += 1;
            }
            Ok(r) => panic!("unexpected answer {}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(_) => tally.lock().unwrap().no_answer += 1,
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}
