//! `--http`: drives a running embedjoin over its HTTP API with the generated batches, and
//! reads the server's own `/metrics` to know what it did.
//!
//! The server's counters are cumulative and may count other traffic, so every figure is
//! the difference of a scrape before the run and one after. A run ends when the indexed
//! plus dead-lettered documents reach the items sent, or when they stop moving for
//! [`STALL`] (then the clock stops at the last change, and the run is flagged incomplete).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use tokio::task::JoinSet;

use super::report::{Counts, Latency};
use super::scrape::Scrape;
use super::Progress;

/// How long the indexed count may stay still before the run is declared over.
pub const STALL: Duration = Duration::from_secs(5);

/// How often `/metrics` is read while waiting.
const POLL: Duration = Duration::from_millis(25);

/// What one HTTP run measured.
pub struct HttpRun {
    pub counts: Counts,
    pub latency: Option<Latency>,
    pub wall: Duration,
    pub submitted: Duration,
    /// Paced: parts posted before the last request left, when it left, and how late the
    /// latest request left after it was due.
    pub paced: Option<(u64, Duration, Duration)>,
}

/// Where a run learns what the server indexed: its `/metrics`, or, for a server without
/// them (the Python service embedjoin replaces), the search engine's `_count` of an index
/// (`{URL}/{INDEX}`): indexed documents only, no latency or bulk figures.
#[derive(Debug, Clone)]
pub enum Indexed {
    Metrics,
    Count(String),
}

async fn read(client: &reqwest::Client, base: &str, indexed: &Indexed) -> anyhow::Result<Scrape> {
    match indexed {
        Indexed::Metrics => scrape(client, base).await,
        Indexed::Count(index) => {
            let refresh = format!("{index}/_refresh");
            client.post(&refresh).send().await.with_context(|| format!("cannot refresh {index}"))?;
            let url = format!("{index}/_count");
            let answer: serde_json::Value = client.get(&url).send().await?.json().await?;
            let count = answer["count"].as_f64().with_context(|| format!("{url} answered {answer}"))?;
            Ok(Scrape { documents_indexed: count, ..Scrape::default() })
        }
    }
}

async fn scrape(client: &reqwest::Client, base: &str) -> anyhow::Result<Scrape> {
    let url = format!("{base}/metrics");
    let response = client.get(&url).send().await.with_context(|| format!("cannot read {url}"))?;
    if !response.status().is_success() {
        bail!("{url} answered {}", response.status());
    }
    Ok(Scrape::parse(&response.text().await?))
}

/// Posts every batch, `concurrency` at a time (or each when it is due, at `rate` parts per
/// second), then waits for the server to index `expected_documents`, as `indexed` says.
pub async fn run(
    base: &str,
    batches: Vec<(Bytes, usize)>,
    content_type: &'static str,
    concurrency: usize,
    rate: Option<u32>,
    (expected_documents, indexed): (usize, &Indexed),
    progress: &Progress,
) -> anyhow::Result<HttpRun> {
    let base = base.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let before = read(&client, &base, indexed).await?;
    let json_bytes: u64 = batches.iter().map(|(b, _)| b.len() as u64).sum();
    let parts_sent: u64 = batches.iter().map(|(_, n)| *n as u64).sum();
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let url = format!("{base}/aggregate/");
    let send = {
        let (client, accepted, progress) = (client.clone(), accepted.clone(), progress.clone());
        move |body: Bytes, count: usize| {
            let (client, url, accepted, progress) = (client.clone(), url.clone(), accepted.clone(), progress.clone());
            async move {
                let taken = post(&client, &url, content_type, body, count).await?;
                accepted.fetch_add(taken, std::sync::atomic::Ordering::Relaxed);
                progress.sent(count as u64);
                Ok::<_, anyhow::Error>(())
            }
        }
    };
    let started = Instant::now();
    let mut senders = JoinSet::new();
    let mut paced = None;
    match rate {
        None => {
            let queue = Arc::new(Mutex::new(batches.into_iter()));
            for _ in 0..concurrency.max(1) {
                let (queue, send) = (queue.clone(), send.clone());
                senders.spawn(async move {
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                        let Some((body, count)) = next else {
                            return Ok::<_, anyhow::Error>(());
                        };
                        send(body, count).await?;
                    }
                });
            }
        }
        Some(rate) => {
            // Open loop: each request leaves when due, on a connection of its own if the
            // earlier ones are still waiting for their answers.
            let schedule = super::pace::schedule(batches.iter().map(|(_, n)| *n), f64::from(rate));
            let (mut posted, mut behind, mut last) = (0u64, Duration::ZERO, (0u64, Duration::ZERO));
            for ((body, count), offset) in batches.into_iter().zip(schedule) {
                let due = started + offset;
                tokio::time::sleep_until(due.into()).await;
                behind = behind.max(due.elapsed());
                last = (posted, started.elapsed());
                posted += count as u64;
                senders.spawn(send(body, count));
            }
            paced = Some((last.0, last.1, behind));
        }
    }
    while let Some(done) = senders.join_next().await {
        done??;
    }
    let submitted = started.elapsed();
    // Wait for the server to index what it took; the clock stops at the last progress.
    let mut last = read(&client, &base, indexed).await?;
    let mut last_change = Instant::now();
    let target = before.done() + expected_documents as f64;
    loop {
        progress.done((last.done() - before.done()) as u64);
        if last.done() >= target || last_change.elapsed() >= STALL {
            break;
        }
        tokio::time::sleep(POLL).await;
        let now = read(&client, &base, indexed).await?;
        if now.done() != last.done() {
            last_change = Instant::now();
        }
        last = now;
    }
    let wall = last_change.duration_since(started);
    let d = last.since(&before);
    // vector_bytes is filled by the caller, which knows the dims.
    let counts = d.counts(parts_sent, accepted.load(std::sync::atomic::Ordering::Relaxed), 0, Some(json_bytes));
    Ok(HttpRun { counts, latency: Latency::from_buckets(&d.latency_buckets), wall, submitted, paced })
}

/// Posts one body until the server takes it; returns the items it accepted. A 503
/// (saturated or shutting down) is retried after its Retry-After; anything else but 202
/// (or the Python service's 200, which takes the whole batch) stops the run, since the
/// figures would not mean what they say.
async fn post(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Bytes,
    count: usize,
) -> anyhow::Result<u64> {
    for _ in 0..600 {
        let response = client
            .post(url)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .with_context(|| format!("cannot post to {url}"))?;
        let status = response.status().as_u16();
        if status == 503 {
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(Duration::from_millis(100), Duration::from_secs);
            tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
            continue;
        }
        let text = response.text().await.unwrap_or_default();
        if status == 200 {
            return Ok(count as u64);
        }
        if status != 202 {
            bail!("{url} answered {status}: {}", text.chars().take(300).collect::<String>());
        }
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        return Ok(answer["accepted"].as_u64().unwrap_or(0));
    }
    bail!("{url} kept answering 503")
}
