//! `embedjoin bench`: measures the whole pipeline on this machine.
//!
//! In process (the default), it starts the real pipeline (router, shards, state store,
//! bulk writer, sink) from the settings plus the command-line overrides, hands it
//! pre-generated batches from `--concurrency` tasks, then shuts it down, which drains
//! everything: the clock runs from the first batch to the end of the drain. With `--http`
//! it posts the same batches as JSON to a running server and reads that server's
//! `/metrics` instead.
//!
//! Invariants:
//! - Generation happens before the clock starts ([`load`]); the timed loop only stamps
//!   arrival times and submits.
//! - Every in-process run uses a fresh Redis key prefix (`embedjoin-bench-<random>:`), so
//!   runs never see each other's partials; after the run its own keys are removed (dead
//!   letters excepted), and nothing outside it is read or deleted. Its partial TTL is
//!   capped at an hour; an interrupted run leaves keys only under its own prefix
//!   (`redis-cli --scan --pattern 'embedjoin-bench-*'` lists them, on each master of a
//!   cluster).
//! - A run whose indexed plus dead-lettered documents fall short of the items sent is
//!   reported loudly, and the command then exits non-zero.

pub mod cpu;
pub mod http;
pub mod load;
pub mod pace;
pub mod redis_nodes;
pub mod report;
pub mod scrape;

use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinSet;

use crate::config::{PartSettings, Settings, SinkBackend, StateBackend};
use crate::sink::SinkClient;
use crate::Pipeline;
use load::{LoadSpec, Order};
use report::{Latency, Paced, RunShape, Summary};

use cpu::CpuCost;
use scrape::Scrape;

/// Request body formats for `--http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BodyFormat {
    Json,
    Msgpack,
}

impl BodyFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            BodyFormat::Json => "application/json",
            BodyFormat::Msgpack => "application/msgpack",
        }
    }
}

/// The options of `embedjoin bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct BenchArgs {
    /// Items to generate; each gets every configured part.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub entities: u32,
    /// Dimension of each part, in order (e.g. 384,512). Replaces the configured parts'
    /// dims and keeps their names; more values add parts PART_3, PART_4...; fewer drop the
    /// last configured parts.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub dims: Vec<u16>,
    /// Parts per batch (one router submission, or one HTTP request).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// interleaved: an item's parts side by side (they meet in memory); split: every first
    /// part, then every second part (they meet in Redis, unless the whole run is shorter
    /// than shards.flush_interval); shuffled: random.
    #[arg(long, value_enum, default_value_t = Order::Interleaved)]
    pub order: Order,
    /// Share of parts sent twice (0.0 to 1.0), each copy at a random later position.
    #[arg(long, default_value_t = 0.0, value_parser = ratio)]
    pub duplicates: f64,
    /// Concurrent senders (without --rate).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Paced load: offer N embeddings per second, open loop (each batch is sent when it is
    /// due, whether or not earlier ones were answered), and report the latency of each part
    /// to its document indexed. Without it the senders go as fast as they are taken.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "sweep")]
    pub rate: Option<u32>,
    /// State store URL (redis://host:port); overrides redis.url (and clears
    /// redis.cluster_nodes). With --http, the Redis the server uses, read only for its CPU,
    /// commands and bytes.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// A Redis Cluster as the state store: its seed URLs, comma-separated
    /// (redis://host:port,redis://host:port,...); sets redis.cluster_nodes. Redis's figures
    /// are then summed over the masters, and each master's share is shown. With --http, the
    /// cluster the server uses, its masters read only for their CPU, commands and bytes.
    #[arg(long, value_name = "SEEDS", value_delimiter = ',', conflicts_with = "redis")]
    pub redis_cluster: Vec<String>,
    /// Where documents go: `null` (discarded, no I/O) or an Elasticsearch base URL;
    /// overrides the configured sink.
    #[arg(long, value_name = "null|file|URL", value_parser = SinkArg::parse, conflicts_with = "http")]
    pub sink: Option<SinkArg>,
    /// Elasticsearch index; overrides elasticsearch.index.
    #[arg(long, value_name = "NAME", conflicts_with = "http")]
    pub index: Option<String>,
    /// Shard actors; overrides shards.count.
    #[arg(long, value_name = "N", conflicts_with = "http", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub shards: Option<u32>,
    /// Seed of the generated load: the same seed sends the same parts in the same order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Drive a running server at this base URL (POST {URL}/aggregate/, GET {URL}/metrics)
    /// instead of an in-process pipeline.
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// With --http: the server's process id on this machine, to read its CPU time
    /// (/proc/PID/stat) before and after, for CPU per embedding.
    #[arg(long, value_name = "PID", requires = "http")]
    pub pid: Option<u32>,
    /// With --http: count what the server indexed in this index (`{URL}/{INDEX}`, e.g.
    /// http://127.0.0.1:9201/embeddings, `_count` after `_refresh`) instead of reading its
    /// `/metrics`: for a server that has none, such as the Python service it replaces.
    #[arg(long, value_name = "URL/INDEX", requires = "http")]
    pub indexed: Option<String>,
    /// With --http: the request body format, json or msgpack (vectors as little-endian bytes).
    #[arg(long, value_enum, default_value_t = BodyFormat::Json)]
    pub format: BodyFormat,
    /// Print one JSON line instead of the table (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// A re-embedding run: index every item first (not measured), then measure sending a
    /// new copy of this part type (e.g. EMBEDDINGS_TEXT) for every item, each an update of
    /// its document (state.late_parts = "update"). In-process only.
    #[arg(long, value_name = "TYPE", conflicts_with_all = ["http", "rate", "sweep"])]
    pub reembed: Option<String>,
    /// Run once per value and print one row each: key=v1,v2,... with key one of shards,
    /// flush_interval, bulk_max_docs, requests_in_flight, batch_size, concurrency, max_dirty.
    #[arg(long, value_name = "KEY=V1,V2,...", value_parser = Sweep::from_str)]
    pub sweep: Option<Sweep>,
}

const AFTER_HELP: &str = "\
Figures: embeddings/s and documents/s over the wall time (first part sent to last document \
acknowledged, drain included); vector MB/s counts the f32 payload (4 bytes x dims per part), \
JSON MB/s the request bodies (--http); Redis merges and bulk requests per indexed document; \
last part -> indexed latency p50/p99/max (per document); with --rate, each part -> indexed \
(per part, from when it was due); CPU per embedding of this process (of the server with \
--http --pid) and of Redis, Redis commands and bytes per embedding (with --redis-cluster, summed \
over the masters, and per master its share of the commands and its CPU); peak RSS (VmHWM of this \
process, in-process only).

Examples:
  embedjoin bench --redis redis://127.0.0.1:6379 --sink null --order split
  embedjoin bench --redis redis://127.0.0.1:6379 --sink null --order split --rate 10000
  embedjoin bench --redis redis://127.0.0.1:6379 --sink null --sweep shards=1,2,4,8
  embedjoin bench --redis-cluster redis://127.0.0.1:7001,redis://127.0.0.1:7002 --sink null --order split
  embedjoin bench --http http://127.0.0.1:8080 --entities 5000
  embedjoin bench --http http://127.0.0.1:8080 --pid SERVER_PID --redis redis://127.0.0.1:6379 --rate 5000";

/// `--sink`: discard, or an Elasticsearch base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkArg {
    Null,
    /// NDJSON files in a scratch directory of the run.
    File,
    Url(String),
}

impl SinkArg {
    fn parse(s: &str) -> Result<SinkArg, String> {
        match s {
            "null" => Ok(SinkArg::Null),
            "file" => Ok(SinkArg::File),
            url if url.starts_with("http://") || url.starts_with("https://") => Ok(SinkArg::Url(url.to_owned())),
            other => Err(format!("`{other}` is neither `null` nor an http(s):// URL")),
        }
    }
}

fn ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("`{s}` is not a ratio between 0.0 and 1.0")),
    }
}

/// A setting that `--sweep` varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepKey {
    Shards,
    FlushInterval,
    BulkMaxDocs,
    RequestsInFlight,
    BatchSize,
    Concurrency,
    MaxDirty,
}

impl SweepKey {
    const ALL: [(&'static str, SweepKey); 7] = [
        ("shards", SweepKey::Shards),
        ("flush_interval", SweepKey::FlushInterval),
        ("bulk_max_docs", SweepKey::BulkMaxDocs),
        ("requests_in_flight", SweepKey::RequestsInFlight),
        ("batch_size", SweepKey::BatchSize),
        ("concurrency", SweepKey::Concurrency),
        ("max_dirty", SweepKey::MaxDirty),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, k)| *k == self).expect("listed").0
    }

    /// Whether the key configures the pipeline, which `--http` cannot reach.
    fn needs_in_process(self) -> bool {
        !matches!(self, SweepKey::BatchSize | SweepKey::Concurrency)
    }

    fn check(self, value: &str) -> Result<(), String> {
        match self {
            SweepKey::FlushInterval => match humantime::parse_duration(value) {
                Ok(d) if !d.is_zero() => Ok(()),
                _ => Err(format!("`{value}` is not a duration such as 50ms")),
            },
            _ => match value.parse::<u32>() {
                Ok(n) if n > 0 => Ok(()),
                _ => Err(format!("`{value}` is not a whole number above 0")),
            },
        }
    }

    /// Sets `value` (already checked) in the bench options or the settings.
    fn apply(self, value: &str, args: &mut BenchArgs, settings: &mut Settings) {
        let n = || value.parse::<u32>().expect("checked");
        match self {
            SweepKey::Shards => args.shards = Some(n()),
            SweepKey::BatchSize => args.batch_size = n(),
            SweepKey::Concurrency => args.concurrency = n(),
            SweepKey::FlushInterval => {
                settings.shards.flush_interval = humantime::parse_duration(value).expect("checked")
            }
            SweepKey::BulkMaxDocs => settings.elasticsearch.bulk_max_docs = n() as usize,
            SweepKey::RequestsInFlight => settings.elasticsearch.requests_in_flight = n() as usize,
            SweepKey::MaxDirty => settings.shards.max_dirty = n() as usize,
        }
    }
}

/// `--sweep key=v1,v2,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sweep {
    pub key: SweepKey,
    pub values: Vec<String>,
}

impl FromStr for Sweep {
    type Err = String;

    fn from_str(s: &str) -> Result<Sweep, String> {
        let names = || SweepKey::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        let (key, values) =
            s.split_once('=').ok_or_else(|| format!("expected key=v1,v2,... with key one of {}", names()))?;
        let key = SweepKey::ALL
            .iter()
            .find(|(n, _)| *n == key.trim())
            .map(|(_, k)| *k)
            .ok_or_else(|| format!("`{key}` cannot be swept; use one of {}", names()))?;
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect();
        if values.is_empty() {
            return Err("no values to sweep".into());
        }
        for v in &values {
            key.check(v)?;
        }
        Ok(Sweep { key, values })
    }
}

/// Runs `embedjoin bench` with `settings` (loaded from the config) under `args`, and prints
/// the report on stdout. Fails, after printing, if a run lost documents.
pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    let Some(sweep) = args.sweep.clone() else {
        let summary = run_once(&settings, &args, None).await?;
        if args.json {
            println!("{}", summary.json_line());
        } else {
            print!("{}", summary.table());
        }
        return match summary.incomplete_warning() {
            Some(warning) => {
                eprintln!("\n{warning}\n");
                bail!("the run lost documents")
            }
            None => Ok(()),
        };
    };
    if args.http.is_some() && sweep.key.needs_in_process() {
        bail!(
            "--sweep {} configures the pipeline, which --http does not reach; sweep batch_size or concurrency, or restart the server per value",
            sweep.key.name()
        );
    }
    if !args.json {
        println!("{}", report::sweep_header(sweep.key.name()));
    }
    let mut runs = Vec::new();
    for value in &sweep.values {
        let summary = run_once(&settings, &args, Some((sweep.key, value))).await?;
        if !args.json {
            println!("{}", report::sweep_row(value, &summary));
        }
        runs.push(serde_json::json!({ "value": value, "summary": summary }));
    }
    let lost = runs.iter().filter(|r| r["summary"]["complete"] == false).count();
    if args.json {
        println!("{}", serde_json::json!({ "sweep": sweep.key.name(), "runs": runs }));
    }
    if lost > 0 {
        eprintln!(
            "\nWARNING: INCOMPLETE RUNS: {lost} of {} runs indexed fewer documents than items sent; their rows undercount the work.\n",
            runs.len()
        );
        bail!("{lost} runs lost documents");
    }
    Ok(())
}

/// One run: the settings and options with `sweep` applied, then in process or over HTTP.
async fn run_once(base: &Settings, args: &BenchArgs, sweep: Option<(SweepKey, &str)>) -> anyhow::Result<Summary> {
    let mut args = args.clone();
    let mut settings = base.clone();
    if let Some((key, value)) = sweep {
        key.apply(value, &mut args, &mut settings);
    }
    apply_overrides(&args, &mut settings)?;
    let label = sweep.map(|(k, v)| format!("{}={v} ", k.name()));
    match &args.http {
        Some(url) => over_http(url, &settings, &args, label).await,
        None => in_process(&settings, &args, label).await,
    }
}

/// Applies the command-line overrides to the settings, and validates the result.
pub fn apply_overrides(args: &BenchArgs, settings: &mut Settings) -> anyhow::Result<()> {
    if !args.dims.is_empty() {
        settings.parts = parts_with_dims(&settings.parts, &args.dims);
    }
    if let Some(url) = &args.redis {
        settings.state.backend = StateBackend::Redis;
        settings.redis.url = url.clone();
        settings.redis.cluster_nodes.clear();
    }
    if !args.redis_cluster.is_empty() {
        settings.state.backend = StateBackend::Redis;
        settings.redis.cluster_nodes = args.redis_cluster.iter().map(|s| s.trim().to_owned()).collect();
    }
    // A run never writes into the service's own files: embedded store and file sink go to
    // a scratch directory of the run.
    let scratch = std::env::temp_dir().join(format!("embedjoin-bench-{:08x}", rand::random::<u32>()));
    settings.embedded.path = scratch.join("state.db");
    settings.file.dir = scratch.join("out");
    match &args.sink {
        Some(SinkArg::Null) => settings.sink.backend = SinkBackend::Null,
        Some(SinkArg::File) => settings.sink.backend = SinkBackend::File,
        Some(SinkArg::Url(url)) => {
            settings.sink.backend = SinkBackend::Elasticsearch;
            settings.elasticsearch.url = url.clone();
        }
        None => {}
    }
    if let Some(index) = &args.index {
        settings.elasticsearch.index = index.clone();
    }
    if let Some(shards) = args.shards {
        settings.shards.count = shards as usize;
    }
    settings.redis.key_prefix = format!("embedjoin-bench-{:016x}:", rand::random::<u64>());
    settings.redis.partial_ttl = settings.redis.partial_ttl.min(Duration::from_secs(3600));
    settings.validate().context("invalid settings for the bench")?;
    Ok(())
}

/// The configured parts with `dims` applied: names kept, extra parts added, the rest dropped.
fn parts_with_dims(parts: &[PartSettings], dims: &[u16]) -> Vec<PartSettings> {
    dims.iter()
        .enumerate()
        .map(|(i, &d)| match parts.get(i) {
            Some(p) => PartSettings { dims: d as usize, ..p.clone() },
            None => PartSettings {
                type_name: format!("PART_{}", i + 1),
                field: format!("part_{}", i + 1),
                dims: d as usize,
            },
        })
        .collect()
}

fn load_spec(settings: &Settings, args: &BenchArgs, id_prefix: String) -> LoadSpec {
    LoadSpec {
        entities: args.entities as usize,
        parts: settings.parts.clone(),
        batch_size: args.batch_size as usize,
        order: args.order,
        duplicates: args.duplicates,
        seed: args.seed,
        id_prefix,
    }
}

fn shape(mode: &'static str, settings: &Settings, args: &BenchArgs) -> RunShape {
    RunShape {
        mode,
        order: args.order,
        entities: args.entities as usize,
        dims: settings.parts.iter().map(|p| p.dims).collect(),
        batch_size: args.batch_size as usize,
        concurrency: args.concurrency as usize,
        shards: (mode == "in-process").then(|| settings.shard_count()),
    }
}

async fn in_process(settings: &Settings, args: &BenchArgs, label: Option<String>) -> anyhow::Result<Summary> {
    const ID_PREFIX: &str = "bench-";
    let spec = load_spec(settings, args, ID_PREFIX.into());
    let reembed = match &args.reembed {
        Some(name) => Some(
            (settings.parts.iter().position(|p| &p.type_name == name))
                .with_context(|| format!("--reembed {name}: not a configured part type"))?,
        ),
        None => None,
    };
    let mut batches = spec.part_batches();
    // Paced with the null sink: the bench sees what the sink acknowledges, and when.
    let index_log = (args.rate.is_some() && settings.sink.backend == SinkBackend::Null)
        .then(|| pace::IndexLog::new(ID_PREFIX, args.entities as usize));
    let pipeline = match &index_log {
        Some(log) => Pipeline::start_with_sink(settings, SinkClient::Observed(log.observer())).await?,
        None => Pipeline::start(settings).await?,
    };
    let metrics = pipeline.metrics.clone();
    // Redis's memory before any record: a re-embedding run's records are made in its set-up.
    let memory_before = cpu::redis_reading(settings).await;
    if let Some(slot) = reembed {
        // Every item indexed first; then the measured run: new copies of one part type.
        index_all(&pipeline, batches, args.concurrency, args.entities as u64).await?;
        batches = reembedding_batches(&spec, slot);
    }
    let parts_sent: u64 = batches.iter().map(|b| b.len() as u64).sum();
    let vector_bytes: u64 = batches.iter().flatten().map(|p| p.vector.len() as u64 * 4).sum();
    let load_bytes: u64 =
        batches.iter().flatten().map(|p| (p.vector.capacity() * 4 + p.id.capacity() + size_of_val(p)) as u64).sum();
    reset_peak_rss();
    let updated_before = updated(&metrics);
    let (cpu_before, redis_before) = (cpu::process_seconds(), cpu::redis_reading(settings).await);
    let progress = Progress::new(args, parts_sent, label);
    let watcher = {
        let (metrics, progress) = (metrics.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                progress.done(metrics.documents_indexed.get() + metrics.dead_letters.get());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let submit = {
        let (router, metrics, progress) = (pipeline.router.clone(), metrics.clone(), progress.clone());
        move |mut batch: Vec<crate::model::Part>| {
            let (router, metrics, progress) = (router.clone(), metrics.clone(), progress.clone());
            async move {
                // Arrival is now, as ingress would stamp it, not generation time.
                let now = Instant::now();
                for part in &mut batch {
                    part.received_at = now;
                }
                let n = batch.len() as u64;
                router.submit(batch).await?;
                metrics.parts_received.inc_by(n);
                progress.sent(n);
                Ok::<_, anyhow::Error>(())
            }
        }
    };
    let started = Instant::now();
    let mut senders = JoinSet::new();
    // Paced: (item, due) of every part sent, and how late the worst batch left.
    let mut due_parts = Vec::new();
    let mut behind = Duration::ZERO;
    // Paced: parts sent before the last batch left, and when it left.
    let (mut before_last, mut sending) = (0u64, Duration::ZERO);
    match args.rate {
        None => {
            let queue = Arc::new(Mutex::new(batches.into_iter()));
            for _ in 0..args.concurrency {
                let (queue, submit) = (queue.clone(), submit.clone());
                senders.spawn(async move {
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                        let Some(batch) = next else {
                            return Ok::<_, anyhow::Error>(());
                        };
                        submit(batch).await?;
                    }
                });
            }
        }
        Some(rate) => {
            let items = spec.sequence();
            let schedule = pace::schedule(batches.iter().map(Vec::len), f64::from(rate));
            let mut items = items.chunks(spec.batch_size);
            for (batch, offset) in batches.into_iter().zip(schedule) {
                let due = started + offset;
                tokio::time::sleep_until(due.into()).await;
                behind = behind.max(due.elapsed());
                due_parts.extend(items.next().unwrap_or_default().iter().map(|s| (s.entity, due)));
                before_last = due_parts.len() as u64 - batch.len() as u64;
                sending = started.elapsed();
                senders.spawn(submit(batch));
            }
        }
    }
    while let Some(done) = senders.join_next().await {
        done.context("a sender task failed")??;
    }
    let submitted = started.elapsed();
    pipeline.shutdown().await;
    let wall = started.elapsed();
    let (cpu_after, redis_after) = (cpu::process_seconds(), cpu::redis_reading(settings).await);
    let records = match settings.state.backend {
        StateBackend::Redis => cpu::records(settings).await,
        StateBackend::Embedded => None,
    };
    watcher.abort();
    progress.finish();
    if let Err(e) = clean_up(settings).await {
        eprintln!("note: cannot remove this run's keys under `{}`: {e:#}", settings.redis.key_prefix);
    }

    let totals = Scrape::parse(&metrics.render());
    let latency = Latency::from_hdr(&metrics.part_to_indexed_us.lock().unwrap_or_else(|e| e.into_inner()));
    let counts = totals.counts(parts_sent, totals.parts_received as u64, vector_bytes, None);
    let embeddings = counts.parts_accepted;
    let mut summary = Summary::new(
        shape("in-process", settings, args),
        counts,
        wall.as_secs_f64(),
        submitted.as_secs_f64(),
        latency,
        peak_rss(),
        Some(load_bytes),
    );
    if reembed.is_some() {
        let n = updated(&metrics) - updated_before;
        summary.updated = Some(n);
        summary.updated_per_s = Some(n as f64 / wall.as_secs_f64().max(1e-9));
    }
    let cost =
        CpuCost::between(Some((cpu_before, cpu_after)), (redis_before.as_ref(), redis_after.as_ref()), embeddings);
    summary.cpu = Some(cost.with_records(records, (memory_before.as_ref(), redis_after.as_ref())));
    summary.paced = args.rate.map(|rate| {
        let (each_part, not_indexed) = match &index_log {
            Some(log) => {
                let (h, never) = log.part_latencies(&due_parts);
                (Latency::from_hdr(&h), never)
            }
            None => (None, 0),
        };
        paced(rate, before_last, sending, behind, each_part, not_indexed)
    });
    Ok(summary)
}

/// Documents updated so far (`documents_ended{end="updated"}`).
fn updated(metrics: &crate::metrics::Metrics) -> u64 {
    metrics.documents_ended.get_or_create(&crate::metrics::EndLabels { end: "updated" }).get()
}

/// Sends every batch and waits until every item is indexed and its completion recorded:
/// the set-up of a re-embedding run, not measured.
async fn index_all(
    pipeline: &Pipeline,
    batches: Vec<Vec<crate::model::Part>>,
    concurrency: u32,
    items: u64,
) -> anyhow::Result<()> {
    let queue = Arc::new(Mutex::new(batches.into_iter()));
    let mut senders = JoinSet::new();
    for _ in 0..concurrency {
        let (queue, router) = (queue.clone(), pipeline.router.clone());
        senders.spawn(async move {
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some(batch) = next else { return Ok::<_, anyhow::Error>(()) };
                router.submit(batch).await?;
            }
        });
    }
    while let Some(done) = senders.join_next().await {
        done.context("a sender task failed")??;
    }
    let metrics = &pipeline.metrics;
    let deadline = Instant::now() + Duration::from_secs(3600);
    while metrics.documents_indexed.get() + metrics.dead_letters.get() < items {
        anyhow::ensure!(Instant::now() < deadline, "the items were not all indexed within an hour");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pipeline.router.flush().await?; // the completions in memory are recorded by then
    Ok(())
}

/// New copies of one part type for every item, in batches, stamped now.
fn reembedding_batches(spec: &LoadSpec, slot: usize) -> Vec<Vec<crate::model::Part>> {
    let parts: Vec<crate::model::Part> = spec.part_batches().into_iter().flatten().filter(|p| p.slot == slot).collect();
    parts.chunks(spec.batch_size).map(<[_]>::to_vec).collect()
}

/// The figures of a paced run; `parts` were sent before the last batch left, `sending`
/// after the start.
fn paced(
    rate: u32,
    parts: u64,
    sending: Duration,
    behind: Duration,
    each_part: Option<Latency>,
    parts_not_indexed: u64,
) -> Paced {
    Paced {
        offered_per_s: f64::from(rate),
        sent_per_s: parts as f64 / sending.as_secs_f64().max(1e-9),
        max_behind_ms: behind.as_secs_f64() * 1000.0,
        each_part,
        parts_not_indexed,
    }
}

async fn over_http(url: &str, settings: &Settings, args: &BenchArgs, label: Option<String>) -> anyhow::Result<Summary> {
    // A fresh id prefix per run: the server may still hold partials of an earlier run.
    let spec = load_spec(settings, args, format!("bench-{:08x}-", rand::random::<u32>()));
    let vector_bytes: u64 = spec.sequence().iter().map(|s| spec.parts[s.slot as usize].dims as u64 * 4).sum();
    let batches = match args.format {
        BodyFormat::Json => spec.json_batches(),
        BodyFormat::Msgpack => spec.msgpack_batches(),
    };
    let parts: u64 = batches.iter().map(|(_, n)| *n as u64).sum();
    let progress = Progress::new(args, parts, label);
    // Redis is read only when named: the server's own config is not ours to guess.
    let read_redis = || async {
        if args.redis.is_some() || !args.redis_cluster.is_empty() {
            cpu::redis_reading(settings).await
        } else {
            None
        }
    };
    let server = |pid: Option<u32>| pid.and_then(cpu::pid_seconds);
    let (server_before, redis_before) = (server(args.pid), read_redis().await);
    let indexed = match &args.indexed {
        Some(index) => http::Indexed::Count(index.trim_end_matches('/').to_owned()),
        None => http::Indexed::Metrics,
    };
    let outcome = http::run(
        url,
        batches,
        args.format.content_type(),
        args.concurrency as usize,
        args.rate,
        (args.entities as usize, &indexed),
        &progress,
    )
    .await;
    // The server may still write to Redis after its last document is indexed (completion
    // records are written off the shards' path): read once Redis has stopped moving.
    let mut redis_after = read_redis().await;
    let settle = Instant::now();
    while let Some(last) = redis_after.as_ref().filter(|_| settle.elapsed() < SETTLE).map(|r| r.total.commands) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        redis_after = read_redis().await;
        if redis_after.as_ref().is_none_or(|now| now.total.commands == last) {
            break;
        }
    }
    let server_after = server(args.pid);
    progress.finish();
    let mut run = outcome?;
    run.counts.vector_bytes = vector_bytes;
    let embeddings = run.counts.parts_accepted;
    let mut summary = Summary::new(
        shape("http", settings, args),
        run.counts,
        run.wall.as_secs_f64(),
        run.submitted.as_secs_f64(),
        run.latency,
        None,
        None,
    );
    let server_cpu = server_before.zip(server_after);
    if args.pid.is_some() && server_cpu.is_none() {
        eprintln!("note: cannot read the CPU time of process {:?} from /proc", args.pid);
    }
    if redis_before.is_some() || server_cpu.is_some() {
        summary.cpu = Some(CpuCost::between(server_cpu, (redis_before.as_ref(), redis_after.as_ref()), embeddings));
    }
    if let (Some(rate), Some((before_last, sending, behind))) = (args.rate, run.paced) {
        summary.paced = Some(paced(rate, before_last, sending, behind, None, 0));
    }
    Ok(summary)
}

/// Longest an `--http` run waits for the server's Redis commands to stop after its last
/// document is indexed, before reading Redis's and the server's CPU.
const SETTLE: Duration = Duration::from_secs(5);

/// The progress bar on stderr: documents finished out of items, and parts sent. Hidden
/// with `--json` or when stderr is not a terminal.
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    sent: Arc<AtomicU64>,
    parts: u64,
}

impl Progress {
    fn new(args: &BenchArgs, parts: u64, label: Option<String>) -> Progress {
        let visible = !args.json && std::io::stderr().is_terminal();
        let bar = visible.then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(u64::from(args.entities)), ProgressDrawTarget::stderr_with_hz(10));
            bar.set_style(
                ProgressStyle::with_template("{prefix}[{elapsed_precise}] {wide_bar} {pos}/{len} documents; {msg}")
                    .expect("a valid template"),
            );
            bar.set_prefix(label.unwrap_or_default());
            bar
        });
        Progress { bar, sent: Arc::new(AtomicU64::new(0)), parts }
    }

    /// `n` more parts were handed in.
    pub fn sent(&self, n: u64) {
        let sent = self.sent.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("parts sent {sent}/{}", self.parts));
        }
    }

    /// `n` documents are indexed or dead-lettered so far.
    pub fn done(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(n);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Removes what the run left under its own fresh key prefix (markers, records, and the
/// orphan partials that late `--duplicates` copies start), so repeated runs do not pile up
/// keys: on the node, or on every master of the cluster (SCAN is per node, and there an
/// UNLINK takes the keys of one slot). Dead letters are kept, for inspection. Nothing
/// outside the prefix is touched.
async fn clean_up(settings: &Settings) -> anyhow::Result<()> {
    if settings.state.backend != StateBackend::Redis {
        return Ok(());
    }
    let prefix = &settings.redis.key_prefix;
    debug_assert!(prefix.starts_with("embedjoin-bench-"), "only a bench prefix");
    let dead_letters = format!("{prefix}{}", settings.redis.dead_letter_key);
    let pattern = format!("{}*", redis_nodes::glob_escape(prefix));
    let cluster = redis_nodes::is_cluster(&settings.redis);
    let mut kept = 0u64;
    for mut node in redis_nodes::connect(&settings.redis).await? {
        let keys = redis_nodes::scan(&mut node.conn, &pattern).await?;
        let mut doomed: Vec<&str> = keys.iter().map(String::as_str).filter(|k| *k != dead_letters).collect();
        doomed.sort_unstable();
        doomed.dedup(); // SCAN may list a key twice
        let mut pipe = redis::pipe();
        for group in redis_nodes::by_slot(doomed, cluster) {
            pipe.cmd("UNLINK").arg(group).ignore();
        }
        if !pipe.is_empty() {
            pipe.query_async::<()>(&mut node.conn).await.with_context(|| format!("UNLINK on {}", node.address))?;
        }
        if keys.contains(&dead_letters) {
            kept += redis::cmd("LLEN").arg(&dead_letters).query_async::<u64>(&mut node.conn).await.unwrap_or(0);
        }
    }
    if kept > 0 {
        eprintln!("note: {kept} dead letters of this run are kept in the Redis list `{dead_letters}`.");
    }
    Ok(())
}

/// Peak resident memory of this process (VmHWM), on Linux.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux), so each run of a sweep gets its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.entities, a.batch_size, a.concurrency, a.order), (20_000, 100, 8, Order::Interleaved));
        assert_eq!(a.duplicates, 0.0);
        assert!(a.sweep.is_none() && a.http.is_none() && !a.json);
    }

    #[test]
    fn bad_options_are_refused_by_name() {
        for bad in [
            &["--duplicates", "1.5"][..],
            &["--sink", "somewhere"],
            &["--sweep", "colour=red"],
            &["--sweep", "shards=0"],
            &["--sweep", "flush_interval=soon"],
            &["--dims", "0"],
            &["--http", "http://x", "--shards", "2"],
            &["--rate", "0"],
            &["--rate", "fast"],
            &["--rate", "1000", "--sweep", "shards=1,2"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_rate_paces_in_process_or_over_http_and_redis_may_be_read_over_http() {
        assert_eq!(parse(&["--rate", "12000"]).unwrap().rate, Some(12_000));
        assert_eq!(parse(&[]).unwrap().rate, None);
        let a = parse(&["--http", "http://x", "--rate", "500", "--redis", "redis://127.0.0.1:6400"]).unwrap();
        assert_eq!((a.rate, a.redis.as_deref()), (Some(500), Some("redis://127.0.0.1:6400")));
        assert_eq!(parse(&["--http", "http://x", "--pid", "42"]).unwrap().pid, Some(42));
        assert!(parse(&["--pid", "42"]).is_err(), "--pid is for --http");
    }

    #[test]
    fn a_cluster_is_named_by_its_seeds_in_process_or_over_http() {
        let seeds = "redis://127.0.0.1:7001,redis://127.0.0.1:7002, redis://127.0.0.1:7003";
        let args = parse(&["--redis-cluster", seeds]).unwrap();
        let mut s = Settings::defaults();
        s.redis.cluster_nodes = vec!["redis://elsewhere:1".into()];
        apply_overrides(&args, &mut s).unwrap();
        assert_eq!(s.state.backend, StateBackend::Redis);
        assert_eq!(
            s.redis.cluster_nodes,
            ["redis://127.0.0.1:7001", "redis://127.0.0.1:7002", "redis://127.0.0.1:7003"]
        );
        let a = parse(&["--http", "http://x", "--redis-cluster", seeds]).unwrap();
        assert_eq!(a.redis_cluster.len(), 3);
        assert!(parse(&["--redis", "redis://a:1", "--redis-cluster", seeds]).is_err(), "one or the other");
        // --redis names one node, whatever the config says of a cluster.
        let args = parse(&["--redis", "redis://127.0.0.1:6400"]).unwrap();
        apply_overrides(&args, &mut s).unwrap();
        assert!(s.redis.cluster_nodes.is_empty());
    }

    #[test]
    fn paced_figures_use_the_time_until_the_last_batch_left() {
        let p = paced(8000, 39_900, Duration::from_millis(4_987), Duration::from_micros(1500), None, 0);
        assert_eq!(p.offered_per_s, 8000.0);
        assert!((p.sent_per_s - 8000.8).abs() < 0.1, "{p:?}");
        assert_eq!(p.max_behind_ms, 1.5);
    }

    #[test]
    fn the_sink_takes_null_file_or_a_url() {
        assert!(matches!(parse(&["--sink", "file"]).unwrap().sink, Some(SinkArg::File)));
        assert!(matches!(parse(&["--sink", "null"]).unwrap().sink, Some(SinkArg::Null)));
        assert!(matches!(parse(&["--sink", "http://es:9200"]).unwrap().sink, Some(SinkArg::Url(_))));
    }

    #[test]
    fn a_sweep_names_a_key_and_its_values() {
        let a = parse(&["--sweep", "flush_interval=10ms, 50ms,200ms"]).unwrap();
        let sweep = a.sweep.unwrap();
        assert_eq!(sweep.key, SweepKey::FlushInterval);
        assert_eq!(sweep.values, ["10ms", "50ms", "200ms"]);
    }

    #[test]
    fn overrides_reach_the_settings() {
        let mut args = parse(&[
            "--dims",
            "8,16,4",
            "--redis",
            "redis://127.0.0.1:6400",
            "--sink",
            "null",
            "--shards",
            "3",
            "--index",
            "bench",
        ])
        .unwrap();
        let mut s = Settings::defaults();
        SweepKey::FlushInterval.apply("20ms", &mut args, &mut s);
        SweepKey::BatchSize.apply("7", &mut args, &mut s);
        apply_overrides(&args, &mut s).unwrap();
        let parts: Vec<_> = s.parts.iter().map(|p| (p.type_name.as_str(), p.dims)).collect();
        assert_eq!(parts, [("EMBEDDINGS_TEXT", 8), ("EMBEDDINGS_IMAGE", 16), ("PART_3", 4)]);
        assert_eq!(s.redis.url, "redis://127.0.0.1:6400");
        assert_eq!(s.sink.backend, SinkBackend::Null);
        assert_eq!((s.shards.count, s.elasticsearch.index.as_str()), (3, "bench"));
        assert_eq!(s.shards.flush_interval, Duration::from_millis(20));
        assert_eq!(args.batch_size, 7);
        assert!(s.redis.key_prefix.starts_with("embedjoin-bench-"));
        assert!(s.redis.partial_ttl <= Duration::from_secs(3600));
        // Fewer values than parts keep only the first parts.
        assert_eq!(parts_with_dims(&s.parts, &[5]).len(), 1);
    }

    #[test]
    fn each_run_gets_its_own_key_prefix() {
        let args = parse(&[]).unwrap();
        let (mut a, mut b) = (Settings::defaults(), Settings::defaults());
        apply_overrides(&args, &mut a).unwrap();
        apply_overrides(&args, &mut b).unwrap();
        assert_ne!(a.redis.key_prefix, b.redis.key_prefix);
    }

    /// Runs the real pipeline against the Redis in `EMBEDJOIN_TEST_REDIS_URL` (skipped
    /// without it): every item indexed, and the split order completes each through Redis.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_in_process_run_indexes_every_item() {
        let Ok(url) = std::env::var("EMBEDJOIN_TEST_REDIS_URL") else {
            eprintln!("skipped: set EMBEDJOIN_TEST_REDIS_URL to run it");
            return;
        };
        let args = parse(&[
            "--redis",
            &url,
            "--sink",
            "null",
            "--entities",
            "500",
            "--dims",
            "4,6",
            "--order",
            "split",
            "--batch-size",
            "50",
            "--json",
        ])
        .unwrap();
        // A flush per batch: the run is shorter than a flush interval, and split parts
        // must still meet in Redis rather than in memory.
        let mut settings = Settings::defaults();
        settings.shards.max_dirty = 1;
        let s = run_once(&settings, &args, None).await.unwrap();
        assert!(s.complete, "{s:?}");
        assert_eq!(s.documents_indexed, 500);
        assert_eq!(s.parts_accepted, 1000);
        assert_eq!(s.completed_in_store + s.completed_in_memory, 500);
        assert_eq!(s.completed_in_store, 500, "{s:?}");
        assert_eq!(s.redis_merges, 1000, "{s:?}");
        assert!(s.latency.is_some() && s.peak_rss_bytes.is_some());
    }

    /// Runs the real pipeline against the Redis Cluster whose seeds are in
    /// `EMBEDJOIN_TEST_REDIS_CLUSTER` (comma-separated, as `scripts/redis-cluster 3` prints
    /// them; skipped without it): each master carries its share of the commands, the records
    /// are counted on every master, and no key of the run is left on any.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_run_spreads_its_commands_over_the_masters_and_leaves_no_key() {
        let Ok(seeds) = std::env::var("EMBEDJOIN_TEST_REDIS_CLUSTER") else {
            eprintln!("skipped: set EMBEDJOIN_TEST_REDIS_CLUSTER to run it");
            return;
        };
        let args = parse(&[
            "--redis-cluster",
            &seeds,
            "--sink",
            "null",
            "--entities",
            "3000",
            "--dims",
            "4,6",
            "--order",
            "split",
            "--batch-size",
            "50",
            "--json",
        ])
        .unwrap();
        let mut settings = Settings::defaults();
        settings.shards.max_dirty = 1;
        apply_overrides(&args, &mut settings).unwrap();
        let s = in_process(&settings, &args, None).await.unwrap();
        assert!(s.complete && s.completed_in_store == 3000, "{s:?}");
        let cpu = s.cpu.unwrap();
        assert_eq!(cpu.redis_records, Some(3000), "every record found, whichever master holds it");
        let masters = cpu.redis_masters.unwrap();
        let even = 100.0 / masters.len() as f64;
        assert!(masters.len() >= 3, "{masters:?}");
        for m in &masters {
            assert!((m.command_share_percent - even).abs() < 5.0, "{masters:?}");
            assert!(m.redis_us_per_embedding > 0.0, "{masters:?}");
        }
        let pattern = format!("{}*", settings.redis.key_prefix);
        for mut node in redis_nodes::connect(&settings.redis).await.unwrap() {
            let left = redis_nodes::scan(&mut node.conn, &pattern).await.unwrap();
            assert!(left.is_empty(), "{} keeps {left:?}", node.address);
        }
    }
}
