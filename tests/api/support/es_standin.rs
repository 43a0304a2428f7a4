//! A strict, in-process Elasticsearch 8.x stand-in for the integration tests.
//!
//! It follows `shared/ES_BULK_CONTRACT.md`: the wire shapes, status codes and error types are
//! the ones a real Elasticsearch 8.17 answers with, and where the real server rejects a
//! request, so does the stand-in. The contract tests (`es_standin_contract.rs`) run against
//! a real 8.17.0 too (`scripts/test` starts one), which keeps that true. It serves only what
//! the service and its tests use: no index templates, `_settings`, `_source` or health. Production code never knows about it: it is just an HTTP
//! server on `127.0.0.1:PORT` that the official client (or any HTTP client) talks to.
//!
//! The HTTP/1.1 server is hand-written (httparse for the request head) so that faults such as
//! "drop the connection without answering" can be injected; see [`Faults`].
//!
//! Known simplifications (see the report in the test module docs):
//! * one shard per index, `_seq_no` counted per index, `_primary_term` always 1;
//! * a write becomes visible to `_count` only after `_refresh` (or `?refresh=true|wait_for`
//!   on the write); there is no periodic refresh;
//! * `_count` understands `match_all`, `ids`, `term`, `terms`, `exists` and `bool`, comparing
//!   source values exactly (no analysis);
//! * mapping checks are exact for `dense_vector`; for other field types only the obvious
//!   mismatches are rejected (objects into concrete fields, non-numbers into numbers, ...).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The Elasticsearch version the stand-in reports in `GET /`.
pub const ES_VERSION: &str = "8.17.0";
/// `http.max_content_length` default.
pub const DEFAULT_MAX_CONTENT_LENGTH: usize = 100 * 1024 * 1024;
/// Longest `_id` Elasticsearch accepts, in bytes.
pub const MAX_ID_BYTES: usize = 512;
/// Most `dense_vector` dimensions (8.11+).
pub const MAX_DIMS: usize = 4096;

const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_REQUEST_LOG: usize = 100_000;
const CLUSTER_NAME: &str = "embedjoin-es-standin";
const NODE_NAME: &str = "es-standin-0";
const NEWLINE_REASON: &str = "The bulk request must be terminated by a newline [\\n]";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Public handle
// ---------------------------------------------------------------------------------------------

/// Counters kept by the stand-in. Snapshot with [`EsStandin::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every HTTP request whose head and body were read (any endpoint).
    pub requests: u64,
    /// `_bulk` requests received (body read), whatever happened to them afterwards.
    pub bulk_requests: u64,
    /// `_bulk` requests answered with a whole-request error (injected or a real validation error).
    pub bulk_requests_failed: u64,
    /// Bulk items (actions) parsed from `_bulk` requests that got that far.
    pub items_received: u64,
    /// Items that changed the store (created, updated, deleted).
    pub items_applied: u64,
    /// Items that did not fail but changed nothing (update `noop`, delete `not_found`).
    pub items_unchanged: u64,
    /// Failed items by HTTP status (400, 404, 409, 429, ...).
    pub items_failed: BTreeMap<u16, u64>,
    /// Connections closed without an answer (injected drops).
    pub dropped_connections: u64,
    /// TCP connections accepted.
    pub connections_accepted: u64,
    /// `_bulk` requests currently being handled (waiting included).
    pub bulk_in_flight: u64,
    /// Highest `bulk_in_flight` seen.
    pub max_bulk_in_flight: u64,
    /// `_bulk` requests currently held by [`Faults::pause`].
    pub bulk_paused: u64,
    /// Requests for an endpoint the stand-in does not implement (answered 400 like unknown URLs).
    pub unhandled_requests: u64,
}

impl Stats {
    /// Failed items with this status.
    pub fn failed_with(&self, status: u16) -> u64 {
        self.items_failed.get(&status).copied().unwrap_or(0)
    }
    /// All failed items.
    pub fn items_failed_total(&self) -> u64 {
        self.items_failed.values().sum()
    }
}

/// One HTTP request as the stand-in saw it. See [`EsStandin::requests`].
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// Path without the query string, as sent (not percent-decoded).
    pub path: String,
    /// Raw query string ("" when none).
    pub query: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Body bytes on the wire (compressed size when `Content-Encoding` was used).
    pub body_bytes: usize,
    /// Body bytes after decompression.
    pub decoded_body_bytes: usize,
    /// Number of bulk actions, for `_bulk` requests that were parsed.
    pub bulk_items: Option<usize>,
    /// Status answered; `None` when the connection was dropped without an answer.
    pub status: Option<u16>,
}

impl RequestRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
    pub fn is_bulk(&self) -> bool {
        self.path.trim_end_matches('/').ends_with("/_bulk")
    }
}

/// How an injected connection drop behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropMode {
    /// Close the connection before applying anything.
    BeforeApply,
    /// Apply every item, then close the connection without answering.
    AfterApply,
}

/// The stand-in server. Dropping it stops the server and closes every connection.
pub struct EsStandin {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl EsStandin {
    /// Binds `127.0.0.1:0` and spawns the server task on the current tokio runtime.
    pub async fn start() -> EsStandin {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await.expect("es-standin: bind 127.0.0.1:0")
    }

    /// Binds `addr` (e.g. a fixed port, for a stand-in run as a process by a benchmark).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<EsStandin> {
        let shared = Arc::new(Shared::new());
        let listener = bind_listener(addr)?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(shared.clone(), listener));
        Ok(EsStandin { shared, addr, server: Mutex::new(Some(task)) })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fault injection, settable at any time.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Stops listening and closes every open connection (clients then get "connection
    /// refused"); the stored data is kept. See [`EsStandin::restart`].
    pub fn stop(&self) {
        if let Some(task) = lock(&self.server).take() {
            task.abort();
        }
    }

    /// Listens again on the same port after [`EsStandin::stop`] (no-op when running).
    pub async fn restart(&self) {
        let mut server = lock(&self.server);
        if server.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let listener = bind_listener(self.addr).expect("es-standin: rebind the same port");
        *server = Some(tokio::spawn(accept_loop(self.shared.clone(), listener)));
    }

    /// `http.max_content_length` (default 100 MB); larger bodies get 413.
    pub fn set_max_content_length(&self, bytes: usize) {
        self.shared.max_content_length.store(bytes, Ordering::SeqCst);
    }

    /// Whether responses are gzip-compressed when the client accepts gzip. Elasticsearch does
    /// (`http.compression` is on for plain HTTP); the stand-in defaults to off to save CPU in
    /// tests, since every client here (reqwest with `gzip`) decompresses transparently anyway.
    pub fn set_response_compression(&self, on: bool) {
        self.shared.compress_responses.store(on, Ordering::SeqCst);
    }

    /// `action.auto_create_index` (default true): whether a write to a missing index creates it.
    pub fn set_auto_create_index(&self, on: bool) {
        self.shared.auto_create_index.store(on, Ordering::SeqCst);
    }

    /// Whether painless scripts run (default true): off, the stand-in refuses every script
    /// as a cluster without painless does, in `_bulk` updates and in the execute API.
    pub fn set_painless(&self, on: bool) {
        lock(&self.shared.state).painless = on;
    }

    /// A stored document's `_source` (realtime).
    pub fn doc(&self, index: &str, id: &str) -> Option<Value> {
        let st = lock(&self.shared.state);
        st.indices.get(index)?.docs.get(id).map(|d| (*d.source).clone())
    }

    /// Every stored document of an index, sorted by id.
    pub fn docs(&self, index: &str) -> Vec<(String, Value)> {
        let st = lock(&self.shared.state);
        let mut out: Vec<(String, Value)> = match st.indices.get(index) {
            Some(ix) => ix.docs.iter().map(|(k, d)| (k.clone(), (*d.source).clone())).collect(),
            None => Vec::new(),
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Stored ids of an index, sorted.
    pub fn ids(&self, index: &str) -> Vec<String> {
        let st = lock(&self.shared.state);
        let mut out: Vec<String> =
            st.indices.get(index).map(|ix| ix.docs.keys().cloned().collect()).unwrap_or_default();
        out.sort();
        out
    }

    /// Number of stored documents (realtime, unlike `_count`); 0 when the index is missing.
    pub fn doc_count(&self, index: &str) -> usize {
        let st = lock(&self.shared.state);
        st.indices.get(index).map(|ix| ix.docs.len()).unwrap_or(0)
    }

    /// Number of documents `_count` would see now (as of the last refresh).
    pub fn searchable_count(&self, index: &str) -> usize {
        let st = lock(&self.shared.state);
        st.indices.get(index).map(|ix| ix.searchable.len()).unwrap_or(0)
    }

    /// A document's `_version`: how many times it was written (index/update) since created.
    pub fn version(&self, index: &str, id: &str) -> Option<u64> {
        let st = lock(&self.shared.state);
        st.indices.get(index)?.docs.get(id).map(|d| d.version)
    }

    /// A document's `_seq_no`.
    pub fn seq_no(&self, index: &str, id: &str) -> Option<u64> {
        let st = lock(&self.shared.state);
        st.indices.get(index)?.docs.get(id).map(|d| d.seq_no)
    }

    pub fn stats(&self) -> Stats {
        lock(&self.shared.state).stats.clone()
    }

    /// The index's mappings object (`{"properties":{...}}`), as `GET /{index}/_mapping` shows it
    /// under `{index}.mappings`.
    pub fn mapping(&self, index: &str) -> Option<Value> {
        let st = lock(&self.shared.state);
        st.indices.get(index).map(|ix| ix.mappings.clone())
    }

    /// Names of existing indices, sorted.
    pub fn indices(&self) -> Vec<String> {
        lock(&self.shared.state).indices.keys().cloned().collect()
    }

    pub fn index_exists(&self, index: &str) -> bool {
        lock(&self.shared.state).indices.contains_key(index)
    }

    /// Creates an index directly, with the same checks as `PUT /{index}` (body like
    /// `{"mappings":{"properties":{..}}}`). Err carries the error JSON.
    pub fn create_index(&self, index: &str, body: Value) -> Result<(), Value> {
        let r = {
            let mut st = lock(&self.shared.state);
            st.create_index(index, Some(&body))
        };
        self.shared.notify();
        r.map(|_| ()).map_err(|resp| resp.json_body())
    }

    /// Deletes an index directly; true if it existed.
    pub fn delete_index(&self, index: &str) -> bool {
        let existed = lock(&self.shared.state).indices.remove(index).is_some();
        self.shared.notify();
        existed
    }

    /// Makes every write so far visible to `_count` (like `POST /{index}/_refresh`).
    pub fn refresh(&self, index: &str) {
        if let Some(ix) = lock(&self.shared.state).indices.get_mut(index) {
            ix.refresh();
        }
        self.shared.notify();
    }

    /// The requests received so far (method, path, headers, status...), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.state).requests.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.state).requests.clear();
    }

    /// Waits until the index holds at least `n` documents (realtime); false on timeout.
    pub async fn wait_for_docs(&self, index: &str, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |es| es.doc_count(index) >= n).await
    }

    /// Waits until `cond` holds; it is re-checked after every change of the stand-in's state or
    /// counters (no polling). False if it still does not hold at the timeout.
    pub async fn wait_until<F>(&self, timeout: Duration, mut cond: F) -> bool
    where
        F: FnMut(&EsStandin) -> bool,
    {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return cond(self),
            }
        }
    }
}

impl Drop for EsStandin {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.server).take() {
            task.abort();
        }
        // Let requests held by pause() go (their connections are being closed anyway).
        self.shared.faults.paused.send_replace(false);
    }
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// Fault injection. All off by default; every setter takes effect for the next request.
/// Whole-request faults and drops are decided in this order for each `_bulk` request:
/// `reject_next_bulk`, `drop_next_bulk`, `request_503_ratio`, `request_429_ratio`,
/// `drop_ratio`. Item faults (`reject_id`, `reject_next_items`, `item_429_ratio`, in that order)
/// are decided per item; a rejected item is not applied.
pub struct Faults {
    inner: Mutex<FaultState>,
    paused: watch::Sender<bool>,
}

struct FaultState {
    item_429_ratio: f64,
    request_503_ratio: f64,
    request_429_ratio: f64,
    drop_ratio: f64,
    latency: Duration,
    next_bulk_rejections: VecDeque<u16>,
    next_item_rejections: VecDeque<u16>,
    id_rejections: HashMap<String, VecDeque<u16>>,
    next_drops: VecDeque<DropMode>,
    unavailable: bool,
    rng: Rng,
}

impl FaultState {
    fn new() -> Self {
        FaultState {
            item_429_ratio: 0.0,
            request_503_ratio: 0.0,
            request_429_ratio: 0.0,
            drop_ratio: 0.0,
            latency: Duration::ZERO,
            next_bulk_rejections: VecDeque::new(),
            next_item_rejections: VecDeque::new(),
            id_rejections: HashMap::new(),
            next_drops: VecDeque::new(),
            unavailable: false,
            rng: Rng::from_time(),
        }
    }
}

enum RequestFault {
    None,
    Reject(u16),
    Drop(DropMode),
}

fn check_ratio(name: &str, r: f64) -> f64 {
    assert!((0.0..=1.0).contains(&r), "es-standin: {name} must be within [0, 1], got {r}");
    r
}

impl Faults {
    fn new() -> Self {
        Faults { inner: Mutex::new(FaultState::new()), paused: watch::Sender::new(false) }
    }

    /// Fraction of bulk items (drawn per item) that fail with 429 `es_rejected_execution_exception`
    /// and are not applied.
    pub fn set_item_429_ratio(&self, ratio: f64) {
        lock(&self.inner).item_429_ratio = check_ratio("item_429_ratio", ratio);
    }
    /// Fraction of `_bulk` requests answered 503 `unavailable_shards_exception`, nothing applied.
    pub fn set_request_503_ratio(&self, ratio: f64) {
        lock(&self.inner).request_503_ratio = check_ratio("request_503_ratio", ratio);
    }
    /// Fraction of `_bulk` requests answered 429 `es_rejected_execution_exception`, nothing applied.
    pub fn set_request_429_ratio(&self, ratio: f64) {
        lock(&self.inner).request_429_ratio = check_ratio("request_429_ratio", ratio);
    }
    /// Fraction of `_bulk` requests whose connection is dropped without an answer: half of them
    /// before anything is applied, half after every item was applied.
    pub fn set_drop_ratio(&self, ratio: f64) {
        lock(&self.inner).drop_ratio = check_ratio("drop_ratio", ratio);
    }
    /// Delay before each `_bulk` request is handled (the request is applied after the delay even
    /// if the client gave up meanwhile, as a real cluster would).
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.inner).latency = latency;
    }
    /// Seeds the random draws of the ratios (they are seeded from the clock otherwise).
    pub fn set_seed(&self, seed: u64) {
        lock(&self.inner).rng = Rng(seed);
    }
    /// The next `n` `_bulk` requests get a whole-request error with this status (429 ->
    /// `es_rejected_execution_exception`, 503 -> `unavailable_shards_exception`, 500, ...).
    pub fn reject_next_bulk(&self, n: usize, status: u16) {
        let mut f = lock(&self.inner);
        f.next_bulk_rejections.extend(std::iter::repeat_n(status, n));
    }
    /// The next `n` bulk items (counted across requests) fail with this status and are not applied.
    pub fn reject_next_items(&self, n: usize, status: u16) {
        let mut f = lock(&self.inner);
        f.next_item_rejections.extend(std::iter::repeat_n(status, n));
    }
    /// The next `times` bulk items with this `_id` fail with this status and are not applied.
    pub fn reject_id(&self, id: &str, status: u16, times: usize) {
        let mut f = lock(&self.inner);
        f.id_rejections.entry(id.to_owned()).or_default().extend(std::iter::repeat_n(status, times));
    }
    /// The next `n` `_bulk` requests get their connection dropped without an answer.
    pub fn drop_next_bulk(&self, n: usize, mode: DropMode) {
        let mut f = lock(&self.inner);
        f.next_drops.extend(std::iter::repeat_n(mode, n));
    }
    /// Every request, on any endpoint, gets 503 `cluster_block_exception` while on.
    pub fn set_unavailable(&self, on: bool) {
        lock(&self.inner).unavailable = on;
    }
    /// Holds `_bulk` requests (after their body was read) until [`Faults::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }
    /// Everything off again (and resumed).
    pub fn reset(&self) {
        let mut f = lock(&self.inner);
        let rng = f.rng.clone();
        *f = FaultState::new();
        f.rng = rng;
        drop(f);
        self.resume();
    }

    fn latency(&self) -> Duration {
        lock(&self.inner).latency
    }
    fn unavailable(&self) -> bool {
        lock(&self.inner).unavailable
    }

    fn decide_request(&self) -> RequestFault {
        let mut f = lock(&self.inner);
        if let Some(status) = f.next_bulk_rejections.pop_front() {
            return RequestFault::Reject(status);
        }
        if let Some(mode) = f.next_drops.pop_front() {
            return RequestFault::Drop(mode);
        }
        let (r503, r429, rdrop) = (f.request_503_ratio, f.request_429_ratio, f.drop_ratio);
        if f.rng.chance(r503) {
            return RequestFault::Reject(503);
        }
        if f.rng.chance(r429) {
            return RequestFault::Reject(429);
        }
        if f.rng.chance(rdrop) {
            let mode = if f.rng.chance(0.5) { DropMode::BeforeApply } else { DropMode::AfterApply };
            return RequestFault::Drop(mode);
        }
        RequestFault::None
    }

    fn decide_items(&self, ids: &[Option<&str>]) -> Vec<Option<u16>> {
        let mut f = lock(&self.inner);
        let ratio = f.item_429_ratio;
        ids.iter()
            .map(|id| {
                if let Some(id) = id {
                    if let Some(q) = f.id_rejections.get_mut(*id) {
                        if let Some(status) = q.pop_front() {
                            return Some(status);
                        }
                    }
                }
                if let Some(status) = f.next_item_rejections.pop_front() {
                    return Some(status);
                }
                if f.rng.chance(ratio) {
                    return Some(429);
                }
                None
            })
            .collect()
    }
}

#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn from_time() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        Rng(nanos ^ ((COUNTER.fetch_add(1, Ordering::Relaxed) as u64) << 32) ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            false
        } else if p >= 1.0 {
            true
        } else {
            self.next_f64() < p
        }
    }
    /// 20-character URL-safe id, like Elasticsearch's auto-generated ids.
    fn auto_id(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..20).map(|_| ALPHABET[(self.next_u64() % 64) as usize] as char).collect()
    }
    fn uuid(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..22).map(|_| ALPHABET[(self.next_u64() % 64) as usize] as char).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

struct Shared {
    state: Mutex<State>,
    faults: Faults,
    /// Bumped after every change of the state or counters; `wait_until` listens to it.
    changed: watch::Sender<u64>,
    max_content_length: AtomicUsize,
    compress_responses: AtomicBool,
    auto_create_index: AtomicBool,
}

impl Shared {
    fn new() -> Self {
        Shared {
            state: Mutex::new(State::new()),
            faults: Faults::new(),
            changed: watch::Sender::new(0),
            max_content_length: AtomicUsize::new(DEFAULT_MAX_CONTENT_LENGTH),
            compress_responses: AtomicBool::new(false),
            auto_create_index: AtomicBool::new(true),
        }
    }
    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
    fn with_stats(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut lock(&self.state).stats);
        self.notify();
    }
}

struct State {
    indices: BTreeMap<String, IndexData>,
    stats: Stats,
    requests: Vec<RequestRecord>,
    rng: Rng,
    /// Whether painless scripts run (a cluster without the module, or with scripts
    /// disabled, refuses them).
    painless: bool,
}

struct Doc {
    source: Arc<Value>,
    version: u64,
    seq_no: u64,
}

struct IndexData {
    uuid: String,
    creation_date: u128,
    /// Flat index settings without the `index.` prefix.
    settings: BTreeMap<String, Value>,
    mappings: Value,
    docs: HashMap<String, Doc>,
    /// `_version` of deleted documents (Elasticsearch keeps them for `index.gc_deletes`).
    tombstones: HashMap<String, u64>,
    /// What `_count` sees: the documents as of the last refresh.
    searchable: HashMap<String, Arc<Value>>,
    dirty: HashSet<String>,
    next_seq_no: u64,
}

impl IndexData {
    fn refresh(&mut self) {
        for id in self.dirty.drain() {
            match self.docs.get(&id) {
                Some(d) => {
                    self.searchable.insert(id, d.source.clone());
                }
                None => {
                    self.searchable.remove(&id);
                }
            }
        }
    }

    /// Stores a document; returns (version, seq_no, created).
    fn put(&mut self, id: &str, source: Value, external_version: Option<u64>) -> (u64, u64, bool) {
        let seq_no = self.next_seq_no;
        self.next_seq_no += 1;
        let (mut version, created) = match self.docs.get(id) {
            Some(d) => (d.version + 1, false),
            None => (self.tombstones.get(id).map(|v| v + 1).unwrap_or(1), true),
        };
        if let Some(v) = external_version {
            version = v;
        }
        self.tombstones.remove(id);
        self.docs.insert(id.to_owned(), Doc { source: Arc::new(source), version, seq_no });
        self.dirty.insert(id.to_owned());
        (version, seq_no, created)
    }

    /// Deletes a document; returns (version, seq_no, found).
    fn delete(&mut self, id: &str, external_version: Option<u64>) -> (u64, u64, bool) {
        let seq_no = self.next_seq_no;
        self.next_seq_no += 1;
        let (mut version, found) = match self.docs.remove(id) {
            Some(d) => (d.version + 1, true),
            None => (self.tombstones.get(id).map(|v| v + 1).unwrap_or(1), false),
        };
        if let Some(v) = external_version {
            version = v;
        }
        self.tombstones.insert(id.to_owned(), version);
        if found {
            self.dirty.insert(id.to_owned());
        }
        (version, seq_no, found)
    }

    fn settings_json(&self, name: &str) -> Value {
        let mut index = Map::new();
        index.insert("number_of_shards".into(), json!("1"));
        index.insert("number_of_replicas".into(), json!("1"));
        for (k, v) in &self.settings {
            insert_dotted(&mut index, k, v.clone());
        }
        index.insert("provided_name".into(), json!(name));
        index.insert("creation_date".into(), json!(self.creation_date.to_string()));
        index.insert("uuid".into(), json!(self.uuid));
        index.insert("version".into(), json!({"created": "8512000"}));
        json!({ "index": index })
    }
}

fn insert_dotted(map: &mut Map<String, Value>, key: &str, value: Value) {
    match key.split_once('.') {
        Some((head, rest)) => {
            let child = map.entry(head.to_owned()).or_insert_with(|| json!({}));
            if !child.is_object() {
                *child = json!({});
            }
            insert_dotted(child.as_object_mut().unwrap(), rest, value);
        }
        None => {
            map.insert(key.to_owned(), value);
        }
    }
}

impl State {
    fn new() -> Self {
        State {
            indices: BTreeMap::new(),
            stats: Stats::default(),
            requests: Vec::new(),
            rng: Rng::from_time(),
            painless: true,
        }
    }

    /// `PUT /{index}` (and auto-creation with `body == None`).
    fn create_index(&mut self, name: &str, body: Option<&Value>) -> Result<Value, Response> {
        if let Err(reason) = validate_index_name(name) {
            return Err(Response::es_error(
                400,
                "invalid_index_name_exception",
                &reason,
                extra(&[("index_uuid", json!("_na_")), ("index", json!(name))]),
            ));
        }
        if let Some(existing) = self.indices.get(name) {
            return Err(Response::es_error(
                400,
                "resource_already_exists_exception",
                &format!("index [{}/{}] already exists", name, existing.uuid),
                extra(&[("index_uuid", json!(existing.uuid)), ("index", json!(name))]),
            ));
        }
        let empty = json!({});
        let body = body.unwrap_or(&empty);
        let body = match body {
            Value::Object(m) => m,
            Value::Null => empty.as_object().unwrap(),
            other => {
                return Err(Response::es_error(
                    400,
                    "parse_exception",
                    &format!("Failed to derive xcontent from [{}]", preview(other)),
                    Map::new(),
                ))
            }
        };
        for key in body.keys() {
            if !matches!(key.as_str(), "settings" | "mappings" | "aliases") {
                return Err(Response::es_error(
                    400,
                    "parse_exception",
                    &format!("unknown key [{key}] for create index"),
                    Map::new(),
                ));
            }
        }
        let mut settings = BTreeMap::new();
        let mut mappings = json!({});
        if let Some(s) = body.get("settings") {
            let flat = flatten_settings(s)
                .map_err(|r| Response::es_error(400, "illegal_argument_exception", &r, Map::new()))?;
            settings.extend(flat);
        }
        if let Some(m) = body.get("mappings") {
            // Checked before the mapping is parsed, hence not a mapper_parsing_exception.
            if m.as_object().is_some_and(|o| o.len() == 1 && o.get("_doc").is_some_and(Value::is_object)) {
                return Err(Response::es_error(
                    400,
                    "illegal_argument_exception",
                    "The mapping definition cannot be nested under a type [_doc] unless include_type_name is set to true.",
                    Map::new(),
                ));
            }
            let m = normalize_mappings(m).map_err(mapping_error)?;
            mappings = merge_mappings(&mappings, &m)
                .map_err(|r| Response::es_error(400, "illegal_argument_exception", &r, Map::new()))?;
        }
        for key in settings.keys() {
            validate_setting(key).map_err(|r| Response::es_error(400, "illegal_argument_exception", &r, Map::new()))?;
        }
        let uuid = self.rng.uuid();
        self.indices.insert(
            name.to_owned(),
            IndexData {
                uuid,
                creation_date: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
                settings,
                mappings,
                docs: HashMap::new(),
                tombstones: HashMap::new(),
                searchable: HashMap::new(),
                dirty: HashSet::new(),
                next_seq_no: 0,
            },
        );
        Ok(json!({"acknowledged": true, "shards_acknowledged": true, "index": name}))
    }

    fn record(&mut self, rec: RequestRecord) {
        if self.requests.len() < MAX_REQUEST_LOG {
            self.requests.push(rec);
        }
    }
}

fn mapping_error(reason: String) -> Response {
    let mut e = Map::new();
    e.insert("caused_by".into(), json!({"type": "mapper_parsing_exception", "reason": reason}));
    Response::es_error(400, "mapper_parsing_exception", &format!("Failed to parse mapping: {reason}"), e)
}

fn flatten_settings(v: &Value) -> Result<BTreeMap<String, Value>, String> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, child, out);
                }
            }
            Value::String(s) => {
                out.insert(prefix.to_owned(), json!(s));
            }
            Value::Null => {}
            other => {
                out.insert(prefix.to_owned(), json!(other.to_string()));
            }
        }
    }
    if !v.is_object() {
        return Err(format!("malformed settings section, should include an inner object: [{}]", preview(v)));
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    Ok(out.into_iter().map(|(k, v)| (k.strip_prefix("index.").map(str::to_owned).unwrap_or(k), v)).collect())
}

fn validate_setting(key: &str) -> Result<(), String> {
    const EXACT: &[&str] = &[
        "number_of_shards",
        "number_of_replicas",
        "refresh_interval",
        "codec",
        "max_result_window",
        "max_inner_result_window",
        "auto_expand_replicas",
        "hidden",
        "default_pipeline",
        "final_pipeline",
        "priority",
        "max_ngram_diff",
        "max_shingle_diff",
        "max_refresh_listeners",
        "max_terms_count",
        "max_regex_length",
        "max_docvalue_fields_search",
        "max_script_fields",
        "gc_deletes",
        "number_of_routing_shards",
        "mode",
        "load_fixed_bitset_filters_eagerly",
        "routing_partition_size",
        "max_slices_per_scroll",
        "max_rescore_window",
    ];
    const PREFIXES: &[&str] = &[
        "mapping.",
        "analysis.",
        "routing.",
        "blocks.",
        "translog.",
        "sort.",
        "similarity.",
        "lifecycle.",
        "store.",
        "merge.",
        "search.",
        "indexing.",
        "write.",
        "shard.",
        "unassigned.",
        "query.",
        "highlight.",
        "soft_deletes.",
        "requests.",
        "time_series.",
        "allocation.",
    ];
    if EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p)) {
        Ok(())
    } else {
        Err(format!(
            "unknown setting [index.{key}] please check that any required plugins are installed, or check the breaking changes documentation for removed settings"
        ))
    }
}

fn validate_index_name(name: &str) -> Result<(), String> {
    const BAD: &[char] = &['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#'];
    if name.is_empty() {
        return Err("Invalid index name [], must not be empty".into());
    }
    if name.contains(BAD) {
        return Err(format!(
            "Invalid index name [{name}], must not contain the following characters [ , \", *, \\, <, |, ,, >, /, ?]"
        ));
    }
    if name.contains(':') {
        return Err(format!("Invalid index name [{name}], must not contain ':'"));
    }
    if name.starts_with(['_', '-', '+']) {
        return Err(format!("Invalid index name [{name}], must not start with '_', '-', or '+'"));
    }
    if name == "." || name == ".." {
        return Err(format!("Invalid index name [{name}], must not be '.' or '..'"));
    }
    if name.len() > 255 {
        return Err(format!("Invalid index name [{name}], index name is too long, ({} > 255)", name.len()));
    }
    if name.to_lowercase() != name {
        return Err(format!("Invalid index name [{name}], must be lowercase"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------------------------

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    // Connections live in this set: aborting this task drops the set, which aborts them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    shared.with_stats(|s| s.connections_accepted += 1);
                    conns.spawn(serve_connection(shared.clone(), stream));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

struct Request {
    method: String,
    raw_path: String,
    raw_query: String,
    segments: Vec<String>,
    params: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    wire_body_len: usize,
    started: Instant,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

enum Outcome {
    Respond(Response),
    Drop,
}

struct Head {
    method: String,
    target: String,
    minor_version: u8,
    headers: Vec<(String, String)>,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut tmp = [0u8; 64 * 1024];
        let n = self.stream.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Ok(None) on a clean EOF between requests.
    async fn read_head(&mut self) -> Result<Option<Head>, Option<Response>> {
        loop {
            if !self.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 128];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let head = Head {
                            method: req.method.unwrap_or("").to_owned(),
                            target: req.path.unwrap_or("/").to_owned(),
                            minor_version: req.version.unwrap_or(1),
                            headers: req
                                .headers
                                .iter()
                                .map(|h| {
                                    (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).trim().to_owned())
                                })
                                .collect(),
                        };
                        self.buf.drain(..n);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) => {
                        if self.buf.len() > MAX_HEAD_BYTES {
                            return Err(Some(Response::es_error(
                                400,
                                "too_long_http_header_exception",
                                "HTTP header is larger than the allowed bytes",
                                Map::new(),
                            )));
                        }
                    }
                    Err(e) => {
                        return Err(Some(Response::es_error(
                            400,
                            "illegal_argument_exception",
                            &format!("invalid HTTP request: {e}"),
                            Map::new(),
                        )))
                    }
                }
            }
            match self.fill().await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    }

    async fn take_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    async fn discard_exact(&mut self, mut n: usize) -> std::io::Result<()> {
        loop {
            let k = n.min(self.buf.len());
            self.buf.drain(..k);
            n -= k;
            if n == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn take_line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).take(pos).collect();
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "chunk line too long"));
            }
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads a chunked body; Ok(Err(total)) when it exceeded `limit` (the rest is discarded).
    async fn read_chunked(&mut self, limit: usize) -> std::io::Result<Result<Vec<u8>, usize>> {
        let mut body = Vec::new();
        let mut total = 0usize;
        loop {
            let line = self.take_line().await?;
            let line = String::from_utf8_lossy(&line);
            let size_str = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_str, 16)
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    if self.take_line().await?.is_empty() {
                        break;
                    }
                }
                break;
            }
            total = total.saturating_add(size);
            if total > limit {
                body.clear();
                self.discard_exact(size).await?;
            } else {
                let chunk = self.take_exact(size).await?;
                body.extend_from_slice(&chunk);
            }
            let crlf = self.take_exact(2).await?;
            if crlf != b"\r\n" {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "missing CRLF after chunk"));
            }
        }
        Ok(if total > limit { Err(total) } else { Ok(body) })
    }

    async fn write_response(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut conn = Conn { stream, buf: Vec::with_capacity(16 * 1024) };
    loop {
        let head = match conn.read_head().await {
            Ok(Some(h)) => h,
            Ok(None) | Err(None) => return,
            Err(Some(resp)) => {
                let bytes = render(resp, None, &shared, true);
                let _ = conn.write_response(&bytes).await;
                return;
            }
        };
        let started = Instant::now();
        let hdr = |name: &str| head.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let connection = hdr("connection").unwrap_or_default().to_ascii_lowercase();
        let mut keep_alive =
            if head.minor_version == 0 { connection.contains("keep-alive") } else { !connection.contains("close") };
        let limit = shared.max_content_length.load(Ordering::SeqCst);
        let chunked = hdr("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        let expect_continue = hdr("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));

        // Body framing.
        let too_large = |n: usize| {
            Response::es_error(
                413,
                "content_too_long_exception",
                &format!("request body is too large: [{n}] bytes, http.max_content_length is [{limit}] bytes"),
                Map::new(),
            )
        };
        let wire_body: Vec<u8> = if chunked {
            if expect_continue && conn.write_response(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                return;
            }
            match conn.read_chunked(limit).await {
                Ok(Ok(b)) => b,
                Ok(Err(total)) => {
                    let bytes = render(too_large(total), None, &shared, true);
                    let _ = conn.write_response(&bytes).await;
                    return;
                }
                Err(_) => {
                    let resp = Response::es_error(
                        400,
                        "illegal_argument_exception",
                        "malformed chunked request body",
                        Map::new(),
                    );
                    let _ = conn.write_response(&render(resp, None, &shared, true)).await;
                    return;
                }
            }
        } else {
            let cls: Vec<String> =
                head.headers.iter().filter(|(k, _)| k == "content-length").map(|(_, v)| v.clone()).collect();
            let len = match cls.first().map(|v| v.parse::<usize>()) {
                None => 0,
                Some(Ok(n)) if cls.iter().all(|v| *v == cls[0]) => n,
                _ => {
                    let resp = Response::es_error(
                        400,
                        "illegal_argument_exception",
                        "invalid Content-Length header",
                        Map::new(),
                    );
                    let _ = conn.write_response(&render(resp, None, &shared, true)).await;
                    return;
                }
            };
            if len > limit {
                // Without "100-continue" the client sends the body anyway: read it (and throw it
                // away) so that it sees the 413 instead of a connection reset.
                if !expect_continue && conn.discard_exact(len).await.is_err() {
                    return;
                }
                let bytes = render(too_large(len), None, &shared, true);
                let _ = conn.write_response(&bytes).await;
                return;
            }
            if len > 0 && expect_continue && conn.write_response(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                return;
            }
            match conn.take_exact(len).await {
                Ok(b) => b,
                Err(_) => return,
            }
        };

        let (raw_path, raw_query) = match head.target.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (head.target.clone(), String::new()),
        };
        let mut record = RequestRecord {
            method: head.method.clone(),
            path: raw_path.clone(),
            query: raw_query.clone(),
            headers: head.headers.clone(),
            body_bytes: wire_body.len(),
            decoded_body_bytes: wire_body.len(),
            bulk_items: None,
            status: None,
        };

        // Content-Encoding.
        let encoding = hdr("content-encoding").unwrap_or_default().to_ascii_lowercase();
        let body = match decode_body(&encoding, wire_body, limit) {
            Ok(b) => b,
            Err(None) => {
                finish_record(&shared, record);
                return;
            }
            Err(Some(resp)) => {
                record.status = Some(resp.status);
                let close = resp.status == 413;
                let bytes = render(resp, None, &shared, false);
                finish_record(&shared, record);
                if conn.write_response(&bytes).await.is_err() || close {
                    return;
                }
                continue;
            }
        };
        record.decoded_body_bytes = body.len();

        let req = Request {
            method: head.method.clone(),
            segments: raw_path.split('/').filter(|s| !s.is_empty()).map(|s| pct_decode(s, false)).collect(),
            params: parse_query(&raw_query),
            raw_path,
            raw_query,
            headers: head.headers.clone(),
            body,
            wire_body_len: record.body_bytes,
            started,
        };
        shared.with_stats(|s| s.requests += 1);

        let outcome = dispatch(&shared, &req, &mut record).await;
        match outcome {
            Outcome::Drop => {
                record.status = None;
                finish_record(&shared, record);
                shared.with_stats(|s| s.dropped_connections += 1);
                // Closing the socket without a byte of answer.
                return;
            }
            Outcome::Respond(resp) => {
                record.status = Some(resp.status);
                if resp.close {
                    keep_alive = false;
                }
                let bytes = render(resp, Some(&req), &shared, !keep_alive);
                finish_record(&shared, record);
                if conn.write_response(&bytes).await.is_err() || !keep_alive {
                    return;
                }
            }
        }
    }
}

fn finish_record(shared: &Shared, record: RequestRecord) {
    lock(&shared.state).record(record);
    shared.notify();
}

/// The decoded body, or the answer to send; `Err(None)`: a body that does not decompress,
/// which Elasticsearch answers by closing the connection with no response.
fn decode_body(encoding: &str, body: Vec<u8>, limit: usize) -> Result<Vec<u8>, Option<Response>> {
    let encoding = encoding.trim();
    let decoded = match encoding {
        "" | "identity" => return Ok(body),
        "gzip" | "x-gzip" => {
            let mut out = Vec::new();
            let res = flate2::read::MultiGzDecoder::new(&body[..]).take(limit as u64 + 1).read_to_end(&mut out);
            res.map(|_| out)
        }
        "deflate" => {
            let mut out = Vec::new();
            let res = flate2::read::ZlibDecoder::new(&body[..]).take(limit as u64 + 1).read_to_end(&mut out);
            res.map(|_| out)
        }
        other => {
            return Err(Some(Response::es_error(
                400,
                "illegal_argument_exception",
                &format!("unsupported Content-Encoding [{other}]"),
                Map::new(),
            )))
        }
    };
    match decoded {
        Ok(out) if out.len() > limit => Err(Some(Response::es_error(
            413,
            "content_too_long_exception",
            &format!(
                "request body is too large once decompressed: more than [{limit}] bytes (http.max_content_length)"
            ),
            Map::new(),
        ))),
        Ok(out) => Ok(out),
        Err(_) => Err(None),
    }
}

fn pct_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (pct_decode(k, true), pct_decode(v, true)),
            None => (pct_decode(p, true), String::new()),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

struct Response {
    status: u16,
    body: Option<Value>,
    /// Whether `filter_path` applies (Elasticsearch does not filter error responses).
    filterable: bool,
    close: bool,
}

impl Response {
    fn json(status: u16, body: Value) -> Self {
        Response { status, body: Some(body), filterable: true, close: false }
    }
    fn empty(status: u16) -> Self {
        Response { status, body: None, filterable: false, close: false }
    }
    /// `{"error":{"root_cause":[..],"type":..,"reason":..},"status":N}`
    fn es_error(status: u16, typ: &str, reason: &str, extra: Map<String, Value>) -> Self {
        let mut err = Map::new();
        err.insert("type".into(), json!(typ));
        err.insert("reason".into(), json!(reason));
        err.extend(extra);
        Self::from_error_object(status, Value::Object(err))
    }
    /// Wraps an error object (`{"type","reason",...,"caused_by"?}`) in the top-level error shape.
    fn from_error_object(status: u16, err: Value) -> Self {
        let mut err = match err {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("type".into(), json!("exception"));
                m.insert("reason".into(), other);
                m
            }
        };
        let mut root = err.clone();
        root.remove("caused_by");
        let mut top = Map::new();
        top.insert("root_cause".into(), json!([Value::Object(root)]));
        // root_cause first, as Elasticsearch writes it.
        let type_ = err.remove("type").unwrap_or(json!("exception"));
        let reason = err.remove("reason").unwrap_or(Value::Null);
        top.insert("type".into(), type_);
        top.insert("reason".into(), reason);
        top.extend(err);
        Response {
            status,
            body: Some(json!({"error": Value::Object(top), "status": status})),
            filterable: false,
            close: false,
        }
    }
    /// The older flat shape some REST-layer errors use: `{"error":"...","status":N}`.
    fn flat_error(status: u16, msg: &str) -> Self {
        Response { status, body: Some(json!({"error": msg, "status": status})), filterable: false, close: false }
    }
    fn json_body(&self) -> Value {
        self.body.clone().unwrap_or(Value::Null)
    }
}

fn extra(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

fn index_not_found(index: &str, resource_type: &str) -> Response {
    Response::es_error(
        404,
        "index_not_found_exception",
        &format!("no such index [{index}]"),
        index_not_found_extra(index, resource_type),
    )
}

fn index_not_found_extra(index: &str, resource_type: &str) -> Map<String, Value> {
    extra(&[
        ("resource.type", json!(resource_type)),
        ("resource.id", json!(index)),
        ("index_uuid", json!("_na_")),
        ("index", json!(index)),
    ])
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        409 => "Conflict",
        413 => "Request Entity Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn render(resp: Response, req: Option<&Request>, shared: &Shared, close: bool) -> Vec<u8> {
    let head_only = req.is_some_and(|r| r.is_head());
    let (status, filterable, resp_close) = (resp.status, resp.filterable, resp.close);
    let mut body: Vec<u8> = match (resp.body, head_only) {
        (Some(mut v), false) => {
            if let Some(fp) = req.and_then(|r| r.param("filter_path")) {
                if filterable && !fp.is_empty() {
                    v = apply_path_filter(&v, &PathFilter::parse(fp), true);
                }
            }
            let pretty = req.and_then(|r| r.param("pretty")).is_some_and(|p| p != "false");
            if pretty {
                let mut b = serde_json::to_vec_pretty(&v).unwrap_or_default();
                b.push(b'\n');
                b
            } else {
                serde_json::to_vec(&v).unwrap_or_default()
            }
        }
        _ => Vec::new(),
    };
    let content_type = match req.and_then(|r| r.header("accept")) {
        Some(a) if a.contains("application/vnd.elasticsearch+json") => {
            "application/vnd.elasticsearch+json;compatible-with=8"
        }
        _ => "application/json",
    };
    let mut gzip = false;
    if !body.is_empty() && shared.compress_responses.load(Ordering::SeqCst) {
        if let Some(ae) = req.and_then(|r| r.header("accept-encoding")) {
            if ae.split(',').any(|e| e.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("gzip")) {
                let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                if enc.write_all(&body).is_ok() {
                    if let Ok(compressed) = enc.finish() {
                        body = compressed;
                        gzip = true;
                    }
                }
            }
        }
    }
    let mut out = Vec::with_capacity(body.len() + 256);
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", status, reason_phrase(status)).as_bytes());
    out.extend_from_slice(b"X-elastic-product: Elasticsearch\r\n");
    out.extend_from_slice(format!("content-type: {content_type}\r\n").as_bytes());
    if gzip {
        out.extend_from_slice(b"content-encoding: gzip\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if close || resp_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

// ---------------------------------------------------------------------------------------------
// filter_path / _source filtering
// ---------------------------------------------------------------------------------------------

struct PathFilter {
    include: Vec<Vec<String>>,
    exclude: Vec<Vec<String>>,
}

impl PathFilter {
    fn parse(spec: &str) -> Self {
        let mut include = Vec::new();
        let mut exclude = Vec::new();
        for p in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.strip_prefix('-') {
                Some(rest) => exclude.push(rest.split('.').map(str::to_owned).collect()),
                None => include.push(p.split('.').map(str::to_owned).collect()),
            }
        }
        PathFilter { include, exclude }
    }
    fn from_lists(include: &[String], exclude: &[String]) -> Self {
        PathFilter {
            include: include
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.split('.').map(str::to_owned).collect())
                .collect(),
            exclude: exclude
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.split('.').map(str::to_owned).collect())
                .collect(),
        }
    }
}

fn glob(pattern: &str, text: &str) -> bool {
    fn rec(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') => (0..=t.len()).any(|i| rec(&p[1..], &t[i..])),
            Some(c) => t.first() == Some(c) && rec(&p[1..], &t[1..]),
        }
    }
    rec(pattern.as_bytes(), text.as_bytes())
}

/// One step down the filter automaton: (key fully matched by some filter, states for children).
fn filter_step(filters: &[Vec<String>], states: &[(usize, usize)], key: &str) -> (bool, Vec<(usize, usize)>) {
    let mut full = false;
    let mut next = Vec::new();
    for &(f, i) in states {
        let segs = &filters[f];
        if segs[i] == "**" {
            next.push((f, i));
            if i + 1 == segs.len() {
                full = true;
            } else if glob(&segs[i + 1], key) {
                if i + 2 == segs.len() {
                    full = true;
                } else {
                    next.push((f, i + 2));
                }
            }
        } else if glob(&segs[i], key) {
            if i + 1 == segs.len() {
                full = true;
            } else {
                next.push((f, i + 1));
            }
        }
    }
    (full, next)
}

fn filter_include(v: &Value, filters: &[Vec<String>], states: &[(usize, usize)]) -> Option<Value> {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, child) in m {
                let (full, next) = filter_step(filters, states, k);
                if full {
                    out.insert(k.clone(), child.clone());
                } else if !next.is_empty() {
                    if let Some(c) = filter_include(child, filters, &next) {
                        out.insert(k.clone(), c);
                    }
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        Value::Array(a) => {
            // Elements that keep nothing are left out, so positions are lost (as in Elasticsearch).
            let items: Vec<Value> = a.iter().filter_map(|e| filter_include(e, filters, states)).collect();
            (!items.is_empty()).then_some(Value::Array(items))
        }
        _ => None,
    }
}

fn filter_exclude(v: &mut Value, filters: &[Vec<String>], states: &[(usize, usize)]) {
    match v {
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let (full, next) = filter_step(filters, states, &k);
                if full {
                    m.remove(&k);
                } else if !next.is_empty() {
                    if let Some(child) = m.get_mut(&k) {
                        filter_exclude(child, filters, &next);
                    }
                }
            }
        }
        Value::Array(a) => {
            for e in a.iter_mut() {
                filter_exclude(e, filters, states);
            }
        }
        _ => {}
    }
}

fn apply_path_filter(v: &Value, f: &PathFilter, empty_object_when_nothing: bool) -> Value {
    let mut out = if f.include.is_empty() {
        v.clone()
    } else {
        let states: Vec<(usize, usize)> = (0..f.include.len()).map(|i| (i, 0)).collect();
        match filter_include(v, &f.include, &states) {
            Some(x) => x,
            None if empty_object_when_nothing => json!({}),
            None => json!({}),
        }
    };
    if !f.exclude.is_empty() {
        let states: Vec<(usize, usize)> = (0..f.exclude.len()).map(|i| (i, 0)).collect();
        filter_exclude(&mut out, &f.exclude, &states);
    }
    out
}

/// `_source`, `_source_includes`, `_source_excludes` request parameters.
#[derive(Clone)]
enum SourceFilter {
    All,
    Nothing,
    Filter(Vec<String>, Vec<String>),
}

impl SourceFilter {
    fn from_params(req: &Request) -> Result<Self, Response> {
        let split = |s: &str| s.split(',').map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect::<Vec<_>>();
        let mut includes = Vec::new();
        let mut excludes = Vec::new();
        if let Some(s) = req.param("_source") {
            match s {
                "" | "true" => {}
                "false" => return Ok(SourceFilter::Nothing),
                other => includes = split(other),
            }
        }
        if let Some(s) = req.param("_source_includes") {
            includes.extend(split(s));
        }
        if let Some(s) = req.param("_source_excludes") {
            excludes.extend(split(s));
        }
        Ok(if includes.is_empty() && excludes.is_empty() {
            SourceFilter::All
        } else {
            SourceFilter::Filter(includes, excludes)
        })
    }
    fn apply(&self, source: &Value) -> Option<Value> {
        match self {
            SourceFilter::All => Some(source.clone()),
            SourceFilter::Nothing => None,
            SourceFilter::Filter(i, e) => Some(apply_path_filter(source, &PathFilter::from_lists(i, e), true)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

enum RouteKind {
    Root,
    Bulk(Option<String>),
    Refresh(Option<String>),
    Mget(Option<String>),
    Count(Option<String>),
    Index(String),
    Mapping(Option<String>),
    Doc(String, String),
    DocAutoId(String),
    Create(String, String),
    PainlessExecute,
}

const GLOBAL_PARAMS: &[&str] = &["pretty", "human", "error_trace", "filter_path"];
const P_NONE: &[&str] = &[];
const P_BULK: &[&str] = &[
    "refresh",
    "timeout",
    "wait_for_active_shards",
    "pipeline",
    "routing",
    "require_alias",
    "require_data_stream",
    "_source",
    "_source_includes",
    "_source_excludes",
    "list_executed_pipelines",
    "include_source_on_error",
];
const P_MULTI: &[&str] = &["ignore_unavailable", "allow_no_indices", "expand_wildcards"];
const P_INDEX_GET: &[&str] = &[
    "ignore_unavailable",
    "allow_no_indices",
    "expand_wildcards",
    "local",
    "flat_settings",
    "include_defaults",
    "master_timeout",
    "features",
];
const P_INDEX_PUT: &[&str] = &["timeout", "master_timeout", "wait_for_active_shards"];
const P_INDEX_DELETE: &[&str] =
    &["timeout", "master_timeout", "ignore_unavailable", "allow_no_indices", "expand_wildcards"];
const P_MAPPING_GET: &[&str] =
    &["ignore_unavailable", "allow_no_indices", "expand_wildcards", "local", "master_timeout"];
const P_MAPPING_PUT: &[&str] =
    &["timeout", "master_timeout", "ignore_unavailable", "allow_no_indices", "expand_wildcards", "write_index_only"];
const P_DOC_GET: &[&str] = &[
    "realtime",
    "refresh",
    "routing",
    "preference",
    "_source",
    "_source_includes",
    "_source_excludes",
    "stored_fields",
    "version",
    "version_type",
];
const P_DOC_WRITE: &[&str] = &[
    "refresh",
    "timeout",
    "wait_for_active_shards",
    "pipeline",
    "routing",
    "op_type",
    "if_seq_no",
    "if_primary_term",
    "version",
    "version_type",
    "require_alias",
    "require_data_stream",
];
const P_DOC_DELETE: &[&str] = &[
    "refresh",
    "timeout",
    "wait_for_active_shards",
    "routing",
    "if_seq_no",
    "if_primary_term",
    "version",
    "version_type",
];
const P_MGET: &[&str] = &[
    "realtime",
    "refresh",
    "routing",
    "preference",
    "_source",
    "_source_includes",
    "_source_excludes",
    "stored_fields",
];
const P_COUNT: &[&str] = &[
    "ignore_unavailable",
    "allow_no_indices",
    "expand_wildcards",
    "min_score",
    "preference",
    "routing",
    "q",
    "analyzer",
    "analyze_wildcard",
    "default_operator",
    "df",
    "lenient",
    "terminate_after",
    "ignore_throttled",
];

fn route(req: &Request) -> Result<(RouteKind, &'static [&'static str]), Response> {
    use RouteKind::*;
    let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let m = req.method.as_str();
    let own = |x: &str| x.to_owned();
    let (kind, methods, params): (RouteKind, &[&str], &'static [&'static str]) = match s.as_slice() {
        [] => (Root, &["GET", "HEAD"], P_NONE),
        ["_bulk"] => (Bulk(None), &["POST", "PUT"], P_BULK),
        ["_refresh"] => (Refresh(None), &["GET", "POST"], P_MULTI),
        ["_mget"] => (Mget(None), &["GET", "POST"], P_MGET),
        ["_count"] => (Count(None), &["GET", "POST"], P_COUNT),
        ["_mapping"] => (Mapping(None), &["GET"], P_MAPPING_GET),
        ["_scripts", "painless", "_execute"] => (PainlessExecute, &["GET", "POST"], P_NONE),
        [first, ..] if first.starts_with('_') => return Err(no_handler(req)),
        [idx] => {
            let p = match m {
                "PUT" => P_INDEX_PUT,
                "DELETE" => P_INDEX_DELETE,
                _ => P_INDEX_GET,
            };
            (Index(own(idx)), &["GET", "HEAD", "PUT", "DELETE"], p)
        }
        [idx, "_bulk"] => (Bulk(Some(own(idx))), &["POST", "PUT"], P_BULK),
        [idx, "_refresh"] => (Refresh(Some(own(idx))), &["GET", "POST"], P_MULTI),
        [idx, "_mget"] => (Mget(Some(own(idx))), &["GET", "POST"], P_MGET),
        [idx, "_count"] => (Count(Some(own(idx))), &["GET", "POST"], P_COUNT),
        [idx, "_mapping"] => {
            (Mapping(Some(own(idx))), &["GET", "PUT", "POST"], if m == "GET" { P_MAPPING_GET } else { P_MAPPING_PUT })
        }
        [idx, "_doc"] => (DocAutoId(own(idx)), &["POST"], P_DOC_WRITE),
        [idx, "_doc", id] => {
            let p = match m {
                "GET" | "HEAD" => P_DOC_GET,
                "DELETE" => P_DOC_DELETE,
                _ => P_DOC_WRITE,
            };
            (Doc(own(idx), own(id)), &["GET", "HEAD", "PUT", "POST", "DELETE"], p)
        }
        [idx, "_create", id] => (Create(own(idx), own(id)), &["PUT", "POST"], P_DOC_WRITE),
        // Elasticsearch's router has a POST-only `/{index}/{type}` route (7.x compatibility),
        // so any other method on an unknown two-segment path is a 405, and POST finds no handler.
        [_, _] if m != "POST" => {
            return Err(Response::flat_error(
                405,
                &format!("Incorrect HTTP method for uri [{}] and method [{m}], allowed: [POST]", uri(req)),
            ))
        }
        _ => return Err(no_handler(req)),
    };
    if !methods.contains(&m) {
        let mut allowed: Vec<&str> = methods.to_vec();
        allowed.sort();
        return Err(Response::flat_error(
            405,
            &format!(
                "Incorrect HTTP method for uri [{}] and method [{}], allowed: [{}]",
                uri(req),
                m,
                allowed.join(", ")
            ),
        ));
    }
    Ok((kind, params))
}

fn uri(req: &Request) -> String {
    if req.raw_query.is_empty() {
        req.raw_path.clone()
    } else {
        format!("{}?{}", req.raw_path, req.raw_query)
    }
}

fn no_handler(req: &Request) -> Response {
    Response::flat_error(400, &format!("no handler found for uri [{}] and method [{}]", uri(req), req.method))
}

fn check_params(req: &Request, known: &[&str]) -> Result<(), Response> {
    let mut unknown: Vec<String> = Vec::new();
    for (k, _) in &req.params {
        if !known.contains(&k.as_str()) && !GLOBAL_PARAMS.contains(&k.as_str()) && !unknown.contains(k) {
            unknown.push(k.clone());
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    let list = unknown.iter().map(|u| format!("[{u}]")).collect::<Vec<_>>().join(", ");
    let noun = if unknown.len() == 1 { "parameter" } else { "parameters" };
    Err(Response::es_error(
        400,
        "illegal_argument_exception",
        &format!("request [{}] contains unrecognized {noun}: {list}", req.raw_path),
        Map::new(),
    ))
}

fn bad_request(reason: &str) -> Response {
    Response::es_error(400, "illegal_argument_exception", reason, Map::new())
}

fn check_media_types(req: &Request) -> Result<(), Response> {
    let compat = |v: &str| -> Option<Option<String>> {
        let lower = v.to_ascii_lowercase();
        if !lower.contains("application/vnd.elasticsearch+") {
            return None;
        }
        Some(
            lower
                .split(';')
                .skip(1)
                .find_map(|p| p.trim().strip_prefix("compatible-with=").map(|x| x.trim().to_owned())),
        )
    };
    let accept_v = req.header("accept").and_then(compat);
    let ct_v = req.header("content-type").and_then(compat);
    for (name, v) in [("Accept", &accept_v), ("Content-Type", &ct_v)] {
        if let Some(ver) = v {
            let ok = matches!(ver.as_deref(), Some("7") | Some("8"));
            if !ok {
                return Err(Response::es_error(
                    400,
                    "media_type_header_exception",
                    &format!("Invalid media-type value on headers [{name}]"),
                    extra(&[(
                        "caused_by",
                        json!({"type": "status_exception", "reason": format!(
                            "A compatible version is required on both Content-Type and Accept headers if either one has requested a compatible version. Accept={}, Content-Type={}",
                            req.header("accept").unwrap_or("null"), req.header("content-type").unwrap_or("null"))}),
                    )]),
                ));
            }
        }
    }
    if let (Some(Some(a)), Some(Some(c))) = (&accept_v, &ct_v) {
        if a != c {
            return Err(Response::es_error(
                400,
                "media_type_header_exception",
                "Invalid media-type value on headers [Accept, Content-Type]",
                Map::new(),
            ));
        }
    }
    if !req.body.is_empty() {
        match req.header("content-type") {
            None => return Err(Response::flat_error(406, "Content-Type header is missing")),
            Some(ct) => {
                let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                let ok = matches!(
                    mime.as_str(),
                    "application/json"
                        | "application/x-ndjson"
                        | "application/vnd.elasticsearch+json"
                        | "application/vnd.elasticsearch+x-ndjson"
                );
                if !ok {
                    return Err(Response::flat_error(406, &format!("Content-Type header [{ct}] is not supported")));
                }
            }
        }
    }
    Ok(())
}

fn parse_bool_param(req: &Request, name: &str, default: bool) -> Result<bool, Response> {
    match req.param(name) {
        None => Ok(default),
        Some("") | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => {
            Err(bad_request(&format!("Failed to parse value [{other}] as only [true] or [false] are allowed.")))
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RefreshPolicy {
    None,
    Immediate,
    WaitFor,
}

fn parse_refresh(req: &Request) -> Result<RefreshPolicy, Response> {
    match req.param("refresh") {
        None | Some("false") => Ok(RefreshPolicy::None),
        Some("") | Some("true") => Ok(RefreshPolicy::Immediate),
        Some("wait_for") => Ok(RefreshPolicy::WaitFor),
        Some(other) => Err(bad_request(&format!("Unknown value for refresh: [{other}]."))),
    }
}

fn check_time_param(req: &Request, name: &str) -> Result<(), Response> {
    let Some(v) = req.param(name) else { return Ok(()) };
    let ok = v == "-1" || v == "0" || {
        let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &v[digits.len()..];
        !digits.is_empty()
            && digits.parse::<f64>().is_ok()
            && matches!(unit, "nanos" | "micros" | "ms" | "s" | "m" | "h" | "d")
    };
    if ok {
        Ok(())
    } else {
        Err(Response::es_error(
            400,
            "parse_exception",
            &format!(
                "failed to parse setting [{name}] with value [{v}] as a time value: unit is missing or unrecognized"
            ),
            Map::new(),
        ))
    }
}

fn check_write_params(req: &Request) -> Result<RefreshPolicy, Response> {
    check_time_param(req, "timeout")?;
    if let Some(w) = req.param("wait_for_active_shards") {
        if w != "all" && w.parse::<u32>().is_err() {
            return Err(bad_request(&format!("Illegal value for wait_for_active_shards: [{w}]")));
        }
    }
    parse_refresh(req)
}

fn parse_body_json(req: &Request) -> Result<Option<Value>, Response> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice::<Value>(&req.body).map(Some).map_err(|e| {
        Response::es_error(
            400,
            "x_content_parse_exception",
            &format!("[{}:{}] {}", e.line(), e.column(), json_error_text(&e)),
            Map::new(),
        )
    })
}

fn json_error_text(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(pos) => s[..pos].to_owned(),
        None => s,
    }
}

/// Resolves an index expression (`a,b`, wildcards, `_all`) to existing indices.
fn resolve_indices(st: &State, expr: Option<&str>, req: &Request) -> Result<Vec<String>, Response> {
    let ignore_unavailable = parse_bool_param(req, "ignore_unavailable", false)?;
    let allow_no_indices = parse_bool_param(req, "allow_no_indices", true)?;
    let expr = expr.unwrap_or("_all");
    let mut out: Vec<String> = Vec::new();
    for part in expr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(excluded) = part.strip_prefix('-') {
            out.retain(|n| !glob(excluded, n));
            continue;
        }
        if part == "_all" || part.contains('*') {
            let pattern = if part == "_all" { "*" } else { part };
            for name in st.indices.keys() {
                if glob(pattern, name) && !out.contains(name) {
                    out.push(name.clone());
                }
            }
        } else if st.indices.contains_key(part) {
            if !out.iter().any(|n| n == part) {
                out.push(part.to_owned());
            }
        } else if !ignore_unavailable {
            return Err(index_not_found(part, "index_or_alias"));
        }
    }
    if out.is_empty() && !allow_no_indices {
        return Err(index_not_found(expr, "index_or_alias"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

async fn dispatch(shared: &Arc<Shared>, req: &Request, record: &mut RequestRecord) -> Outcome {
    if shared.faults.unavailable() {
        return Outcome::Respond(Response::es_error(
            503,
            "cluster_block_exception",
            "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered / initialized];",
            Map::new(),
        ));
    }
    if let Err(r) = check_media_types(req) {
        return Outcome::Respond(r);
    }
    let (kind, params) = match route(req) {
        Ok(r) => r,
        Err(resp) => {
            if resp.status == 400 {
                shared.with_stats(|s| s.unhandled_requests += 1);
            }
            return Outcome::Respond(resp);
        }
    };
    if let Err(r) = check_params(req, params) {
        return Outcome::Respond(r);
    }
    if let RouteKind::Bulk(index) = &kind {
        return handle_bulk(shared, req, index.as_deref(), record).await;
    }
    let resp = {
        let mut st = lock(&shared.state);
        let auto_create = shared.auto_create_index.load(Ordering::SeqCst);
        handle_sync(&mut st, req, kind, auto_create).unwrap_or_else(|e| e)
    };
    shared.notify();
    Outcome::Respond(resp)
}

fn cluster_info() -> Value {
    json!({
        "name": NODE_NAME,
        "cluster_name": CLUSTER_NAME,
        "cluster_uuid": "e2YxT0NlQ3Ktc3RhbmRpbg",
        "version": {
            "number": ES_VERSION,
            "build_flavor": "default",
            "build_type": "docker",
            "build_hash": "1a77947f34deddb41af25e6f0ddb8e830159c179",
            "build_date": "2024-08-05T10:05:34.233336849Z",
            "build_snapshot": false,
            "lucene_version": "9.12.0",
            "minimum_wire_compatibility_version": "7.17.0",
            "minimum_index_compatibility_version": "7.0.0"
        },
        "tagline": "You Know, for Search"
    })
}

fn shards_ok(n: usize) -> Value {
    json!({"total": n * 2, "successful": n, "failed": 0})
}

fn handle_sync(st: &mut State, req: &Request, kind: RouteKind, auto_create: bool) -> Result<Response, Response> {
    use RouteKind::*;
    let m = req.method.as_str();
    match kind {
        Root => Ok(if req.is_head() { Response::empty(200) } else { Response::json(200, cluster_info()) }),
        PainlessExecute => painless_execute(st, req),
        Index(name) => match m {
            "HEAD" => {
                let ok = resolve_indices(st, Some(&name), req).map(|v| !v.is_empty()).unwrap_or(false);
                Ok(Response::empty(if ok { 200 } else { 404 }))
            }
            "GET" => {
                let names = resolve_indices(st, Some(&name), req)?;
                let mut out = Map::new();
                for n in names {
                    let ix = &st.indices[&n];
                    out.insert(
                        n.clone(),
                        json!({"aliases": {}, "mappings": ix.mappings, "settings": ix.settings_json(&n)}),
                    );
                }
                Ok(Response::json(200, Value::Object(out)))
            }
            "PUT" => {
                check_time_param(req, "timeout")?;
                check_time_param(req, "master_timeout")?;
                let body = parse_body_json(req)?;
                st.create_index(&name, body.as_ref()).map(|v| Response::json(200, v))
            }
            "DELETE" => {
                let names = resolve_indices(st, Some(&name), req)?;
                for n in names {
                    st.indices.remove(&n);
                }
                Ok(Response::json(200, json!({"acknowledged": true})))
            }
            _ => unreachable!(),
        },
        Mapping(expr) => {
            if m == "GET" {
                let names = resolve_indices(st, expr.as_deref(), req)?;
                let mut out = Map::new();
                for n in names {
                    out.insert(n.clone(), json!({"mappings": st.indices[&n].mappings}));
                }
                return Ok(Response::json(200, Value::Object(out)));
            }
            let names = resolve_indices(st, expr.as_deref(), req)?;
            let body = parse_body_json(req)?.ok_or_else(|| {
                Response::es_error(
                    400,
                    "action_request_validation_exception",
                    "Validation Failed: 1: mapping source is missing;",
                    Map::new(),
                )
            })?;
            let update = normalize_mappings(&body)
                .map_err(|r| Response::es_error(400, "mapper_parsing_exception", &r, Map::new()))?;
            // Check every index first, then apply: all or nothing.
            let mut merged = Vec::new();
            for n in &names {
                let mm = merge_mappings(&st.indices[n].mappings, &update).map_err(|r| bad_request(&r))?;
                merged.push((n.clone(), mm));
            }
            for (n, mm) in merged {
                st.indices.get_mut(&n).unwrap().mappings = mm;
            }
            Ok(Response::json(200, json!({"acknowledged": true})))
        }
        Refresh(expr) => {
            let names = resolve_indices(st, expr.as_deref(), req)?;
            for n in &names {
                st.indices.get_mut(n).unwrap().refresh();
            }
            Ok(Response::json(200, json!({"_shards": shards_ok(names.len())})))
        }
        Count(expr) => handle_count(st, req, expr.as_deref()),
        Mget(expr) => handle_mget(st, req, expr.as_deref()),
        Doc(index, id) => match m {
            "GET" | "HEAD" => handle_get(st, req, &index, &id, false),
            "DELETE" => handle_single_write(st, req, OpType::Delete, &index, Some(id), auto_create),
            _ => {
                let op = match req.param("op_type") {
                    None | Some("index") => OpType::Index,
                    Some("create") => OpType::Create,
                    Some(other) => {
                        return Err(bad_request(&format!("opType must be 'create' or 'index', found: [{other}]")))
                    }
                };
                handle_single_write(st, req, op, &index, Some(id), auto_create)
            }
        },
        DocAutoId(index) => handle_single_write(st, req, OpType::Index, &index, None, auto_create),
        Create(index, id) => handle_single_write(st, req, OpType::Create, &index, Some(id), auto_create),
        Bulk(_) => unreachable!("handled asynchronously"),
    }
}

fn doc_json(index: &str, id: &str, doc: Option<&Doc>, filter: &SourceFilter) -> Value {
    match doc {
        Some(d) => {
            let mut m = Map::new();
            m.insert("_index".into(), json!(index));
            m.insert("_id".into(), json!(id));
            m.insert("_version".into(), json!(d.version));
            m.insert("_seq_no".into(), json!(d.seq_no));
            m.insert("_primary_term".into(), json!(1));
            m.insert("found".into(), json!(true));
            if let Some(src) = filter.apply(&d.source) {
                m.insert("_source".into(), src);
            }
            Value::Object(m)
        }
        None => json!({"_index": index, "_id": id, "found": false}),
    }
}

fn handle_get(st: &mut State, req: &Request, index: &str, id: &str, source_only: bool) -> Result<Response, Response> {
    let filter = SourceFilter::from_params(req)?;
    let realtime = parse_bool_param(req, "realtime", true)?;
    if parse_bool_param(req, "refresh", false)? {
        if let Some(ix) = st.indices.get_mut(index) {
            ix.refresh();
        }
    }
    let Some(ix) = st.indices.get(index) else {
        if req.is_head() {
            return Ok(Response::empty(404));
        }
        return Err(index_not_found(index, "index_expression"));
    };
    let doc = if realtime {
        ix.docs.get(id)
    } else {
        // Non-realtime reads see the last refresh.
        ix.searchable.get(id).and_then(|_| ix.docs.get(id))
    };
    if req.is_head() {
        return Ok(Response::empty(if doc.is_some() { 200 } else { 404 }));
    }
    if source_only {
        return match doc {
            Some(d) => Ok(Response::json(200, filter.apply(&d.source).unwrap_or(json!({})))),
            None => Err(Response::es_error(
                404,
                "resource_not_found_exception",
                &format!("Document not found [{index}]/[{id}]"),
                Map::new(),
            )),
        };
    }
    let status = if doc.is_some() { 200 } else { 404 };
    Ok(Response::json(status, doc_json(index, id, doc, &filter)))
}

fn handle_mget(st: &mut State, req: &Request, path_index: Option<&str>) -> Result<Response, Response> {
    let filter = SourceFilter::from_params(req)?;
    if parse_bool_param(req, "refresh", false)? {
        for ix in st.indices.values_mut() {
            ix.refresh();
        }
    }
    let body = parse_body_json(req)?.ok_or_else(|| {
        Response::es_error(400, "parse_exception", "request body or source parameter is required", Map::new())
    })?;
    let Some(obj) = body.as_object() else {
        return Err(Response::es_error(400, "parse_exception", "Failed to derive xcontent", Map::new()));
    };
    let mut wanted: Vec<(Option<String>, Value, SourceFilter)> = Vec::new();
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("ids", Value::Array(ids)) => {
                for id in ids {
                    wanted.push((None, id.clone(), filter.clone()));
                }
            }
            ("docs", Value::Array(docs)) => {
                for d in docs {
                    let Some(d) = d.as_object() else {
                        return Err(Response::es_error(
                            400,
                            "x_content_parse_exception",
                            "[1:10] docs array element should include an object",
                            Map::new(),
                        ));
                    };
                    let mut f = filter.clone();
                    for key in d.keys() {
                        if !matches!(
                            key.as_str(),
                            "_index" | "_id" | "routing" | "_source" | "stored_fields" | "version" | "version_type"
                        ) {
                            return Err(Response::es_error(
                                400,
                                "parsing_exception",
                                &format!("Unknown key for a VALUE_STRING in [{key}]."),
                                Map::new(),
                            ));
                        }
                    }
                    if let Some(s) = d.get("_source") {
                        f = match s {
                            Value::Bool(false) => SourceFilter::Nothing,
                            Value::Bool(true) => SourceFilter::All,
                            Value::String(s) => SourceFilter::Filter(vec![s.clone()], vec![]),
                            Value::Array(a) => SourceFilter::Filter(
                                a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
                                vec![],
                            ),
                            _ => f,
                        };
                    }
                    wanted.push((
                        d.get("_index").and_then(|i| i.as_str()).map(str::to_owned),
                        d.get("_id").cloned().unwrap_or(Value::Null),
                        f,
                    ));
                }
            }
            ("ids", _) | ("docs", _) => {
                return Err(Response::es_error(
                    400,
                    "parsing_exception",
                    &format!("{k} array element should include an object"),
                    Map::new(),
                ))
            }
            (other, _) => {
                return Err(Response::es_error(
                    400,
                    "parsing_exception",
                    &format!("unknown key [{other}] for a START_ARRAY, expected [docs] or [ids]"),
                    Map::new(),
                ))
            }
        }
    }
    if wanted.is_empty() {
        return Err(Response::es_error(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: no documents to get;",
            Map::new(),
        ));
    }
    let mut errors = Vec::new();
    for (i, (index, id, _)) in wanted.iter().enumerate() {
        if index.is_none() && path_index.is_none() {
            errors.push(format!("index is missing for doc {i}"));
        }
        if !(id.is_string() || id.is_number()) {
            errors.push(format!("id is missing for doc {i}"));
        }
    }
    if !errors.is_empty() {
        return Err(validation_failed(&errors));
    }
    if let Some(pi) = path_index {
        if !st.indices.contains_key(pi) && wanted.iter().all(|(i, _, _)| i.is_none()) {
            return Err(index_not_found(pi, "index_expression"));
        }
    }
    let docs: Vec<Value> = wanted
        .iter()
        .map(|(index, id, f)| {
            let index = index.as_deref().or(path_index).unwrap();
            let id = match id {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            match st.indices.get(index) {
                Some(ix) => doc_json(index, &id, ix.docs.get(&id), f),
                None => json!({
                    "_index": index, "_id": id,
                    "error": {
                        "root_cause": [{"type": "index_not_found_exception", "reason": format!("no such index [{index}]"),
                                        "resource.type": "index_expression", "resource.id": index, "index_uuid": "_na_", "index": index}],
                        "type": "index_not_found_exception", "reason": format!("no such index [{index}]"),
                        "resource.type": "index_expression", "resource.id": index, "index_uuid": "_na_", "index": index
                    }
                }),
            }
        })
        .collect();
    Ok(Response::json(200, json!({ "docs": docs })))
}

fn validation_failed(errors: &[String]) -> Response {
    let mut reason = String::from("Validation Failed: ");
    for (i, e) in errors.iter().enumerate() {
        reason.push_str(&format!("{}: {};", i + 1, e));
    }
    Response::es_error(400, "action_request_validation_exception", &reason, Map::new())
}

fn handle_count(st: &mut State, req: &Request, expr: Option<&str>) -> Result<Response, Response> {
    for p in ["q", "min_score", "terminate_after", "analyzer", "df", "default_operator"] {
        if req.param(p).is_some() {
            return Err(bad_request(&format!(
                "es-standin: the [{p}] parameter of _count is not supported by the stand-in"
            )));
        }
    }
    let names = resolve_indices(st, expr, req)?;
    let body = parse_body_json(req)?;
    let query = match &body {
        None => json!({"match_all": {}}),
        Some(Value::Object(o)) => {
            for k in o.keys() {
                if k != "query" {
                    return Err(Response::es_error(
                        400,
                        "parsing_exception",
                        &format!("request does not support [{k}]"),
                        Map::new(),
                    ));
                }
            }
            o.get("query").cloned().unwrap_or(json!({"match_all": {}}))
        }
        Some(_) => {
            return Err(Response::es_error(400, "parsing_exception", "request body must be an object", Map::new()))
        }
    };
    let mut count = 0usize;
    for n in &names {
        for (id, src) in &st.indices[n].searchable {
            if query_matches(&query, id, src)
                .map_err(|r| Response::es_error(400, "parsing_exception", &r, Map::new()))?
            {
                count += 1;
            }
        }
    }
    let shards = names.len();
    Ok(Response::json(
        200,
        json!({"count": count, "_shards": {"total": shards, "successful": shards, "skipped": 0, "failed": 0}}),
    ))
}

/// A small query evaluator for `_count`: exact comparisons on `_source` values.
fn query_matches(q: &Value, id: &str, src: &Value) -> Result<bool, String> {
    let Some(obj) = q.as_object().filter(|o| o.len() == 1) else {
        return Err(format!("query malformed, expected a single query object: {}", preview(q)));
    };
    let (name, body) = obj.iter().next().unwrap();
    let field_values = |field: &str| -> Vec<Value> {
        let field = field.strip_suffix(".keyword").unwrap_or(field);
        let mut out = Vec::new();
        collect_path(src, &field.split('.').collect::<Vec<_>>(), &mut out);
        out
    };
    match name.as_str() {
        "match_all" => Ok(true),
        "match_none" => Ok(false),
        "ids" => {
            let values = body.get("values").and_then(|v| v.as_array()).ok_or("[ids] requires [values]")?;
            Ok(values.iter().any(|v| v.as_str() == Some(id)))
        }
        "exists" => {
            let field = body.get("field").and_then(|f| f.as_str()).ok_or("[exists] requires [field]")?;
            Ok(field_values(field).iter().any(|v| !v.is_null()))
        }
        "term" | "terms" => {
            let o = body.as_object().ok_or(format!("[{name}] query malformed"))?;
            let (field, spec) = o.iter().find(|(k, _)| *k != "boost").ok_or(format!("[{name}] query requires a field"))?;
            let wanted: Vec<Value> = match (name.as_str(), spec) {
                ("term", Value::Object(so)) => vec![so.get("value").cloned().ok_or("[term] requires [value]")?],
                ("term", v) => vec![v.clone()],
                ("terms", Value::Array(a)) => a.clone(),
                _ => return Err(format!("[{name}] query malformed")),
            };
            if field == "_id" {
                return Ok(wanted.iter().any(|w| w.as_str() == Some(id)));
            }
            let have = field_values(field);
            Ok(have.iter().any(|h| wanted.iter().any(|w| loose_eq(h, w))))
        }
        "bool" => {
            let o = body.as_object().ok_or("[bool] query malformed")?;
            let list = |k: &str| -> Vec<Value> {
                match o.get(k) {
                    Some(Value::Array(a)) => a.clone(),
                    Some(v @ Value::Object(_)) => vec![v.clone()],
                    _ => Vec::new(),
                }
            };
            for k in o.keys() {
                if !matches!(k.as_str(), "must" | "filter" | "should" | "must_not" | "minimum_should_match" | "boost") {
                    return Err(format!("[bool] query does not support [{k}]"));
                }
            }
            for c in list("must").iter().chain(list("filter").iter()) {
                if !query_matches(c, id, src)? {
                    return Ok(false);
                }
            }
            for c in list("must_not") {
                if query_matches(&c, id, src)? {
                    return Ok(false);
                }
            }
            let should = list("should");
            if !should.is_empty() {
                let required = match o.get("minimum_should_match") {
                    Some(v) => v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(1) as usize,
                    None if list("must").is_empty() && list("filter").is_empty() => 1,
                    None => 0,
                };
                let mut hits = 0;
                for c in &should {
                    if query_matches(c, id, src)? {
                        hits += 1;
                    }
                }
                return Ok(hits >= required);
            }
            Ok(true)
        }
        other => Err(format!("es-standin: query [{other}] is not supported by the stand-in (match_all, ids, exists, term, terms, bool are)")),
    }
}

fn collect_path(v: &Value, path: &[&str], out: &mut Vec<Value>) {
    if path.is_empty() {
        match v {
            Value::Array(a) => out.extend(a.iter().cloned()),
            other => out.push(other.clone()),
        }
        return;
    }
    match v {
        Value::Object(m) => {
            if let Some(child) = m.get(path[0]) {
                collect_path(child, &path[1..], out);
            }
            // Dotted keys in the source ("a.b": ..).
            for i in 2..=path.len() {
                let key = path[..i].join(".");
                if let Some(child) = m.get(&key) {
                    collect_path(child, &path[i..], out);
                }
            }
        }
        Value::Array(a) => {
            for e in a {
                collect_path(e, path, out);
            }
        }
        _ => {}
    }
}

fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::String(s), Value::Number(n)) | (Value::Number(n), Value::String(s)) => {
            s.parse::<f64>().ok() == n.as_f64()
        }
        (Value::String(s), Value::Bool(b)) | (Value::Bool(b), Value::String(s)) => s == &b.to_string(),
        _ => a == b,
    }
}

fn preview(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.len() > 100 {
        let mut end = 100;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------------
// _bulk
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpType {
    Index,
    Create,
    Update,
    Delete,
}

impl OpType {
    fn name(self) -> &'static str {
        match self {
            OpType::Index => "index",
            OpType::Create => "create",
            OpType::Update => "update",
            OpType::Delete => "delete",
        }
    }
}

struct UpdateSpec {
    doc: Option<Map<String, Value>>,
    doc_as_upsert: bool,
    upsert: Option<Value>,
    /// The `script` object, when the update has one.
    script: Option<Value>,
    scripted_upsert: bool,
    detect_noop: bool,
}

struct BulkOp {
    op: OpType,
    index: Option<String>,
    id: Option<String>,
    if_seq_no: Option<i64>,
    if_primary_term: Option<i64>,
    version: Option<i64>,
    version_type: Option<String>,
    require_alias: bool,
    source: Option<Vec<u8>>,
    update: Option<UpdateSpec>,
}

impl BulkOp {
    fn new(op: OpType) -> Self {
        BulkOp {
            op,
            index: None,
            id: None,
            if_seq_no: None,
            if_primary_term: None,
            version: None,
            version_type: None,
            require_alias: false,
            source: None,
            update: None,
        }
    }
    fn external_version(&self) -> bool {
        matches!(self.version_type.as_deref(), Some("external") | Some("external_gte"))
    }
}

fn token_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "VALUE_NULL",
        Value::Bool(_) => "VALUE_BOOLEAN",
        Value::Number(_) => "VALUE_NUMBER",
        Value::String(_) => "VALUE_STRING",
        Value::Array(_) => "START_ARRAY",
        Value::Object(_) => "START_OBJECT",
    }
}

fn x_content_parse(e: &serde_json::Error) -> Response {
    if e.is_eof() {
        // Jackson's end-of-input is a distinct exception in Elasticsearch.
        return Response::es_error(
            400,
            "x_content_e_o_f_exception",
            &format!("[{}:{}] Unexpected end of file", e.line(), e.column()),
            Map::new(),
        );
    }
    Response::es_error(
        400,
        "x_content_parse_exception",
        &format!("[{}:{}] {}", e.line(), e.column(), json_error_text(e)),
        Map::new(),
    )
}

/// Parses the NDJSON body the way Elasticsearch's BulkRequestParser does: any structural
/// problem fails the whole request.
fn parse_bulk(body: &[u8]) -> Result<Vec<BulkOp>, Response> {
    if body.is_empty() {
        return Err(Response::es_error(400, "parse_exception", "request body is required", Map::new()));
    }
    if body.last() != Some(&b'\n') {
        return Err(bad_request(NEWLINE_REASON));
    }
    let lines: Vec<&[u8]> = body[..body.len() - 1].split(|b| *b == b'\n').collect();
    let mut ops = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line_no = i + 1;
        let line = lines[i];
        i += 1;
        let malformed = |msg: String| bad_request(&format!("Malformed action/metadata line [{line_no}], {msg}"));
        if line.iter().all(u8::is_ascii_whitespace) {
            return Err(malformed("expected START_OBJECT or END_OBJECT but found [null]".into()));
        }
        let v: Value = serde_json::from_slice(line).map_err(|e| x_content_parse(&e))?;
        let obj = match v {
            Value::Object(o) => o,
            other => {
                return Err(malformed(format!(
                    "expected START_OBJECT or END_OBJECT but found [{}]",
                    token_name(&other)
                )))
            }
        };
        if obj.is_empty() {
            return Err(malformed("expected FIELD_NAME but found [END_OBJECT]".into()));
        }
        if obj.len() > 1 {
            return Err(malformed("expected END_OBJECT but found [FIELD_NAME]".into()));
        }
        let (action, meta) = obj.into_iter().next().unwrap();
        let op = match action.as_str() {
            "index" => OpType::Index,
            "create" => OpType::Create,
            "update" => OpType::Update,
            "delete" => OpType::Delete,
            other => {
                return Err(malformed(format!(
                    "expected field [create], [delete], [index] or [update] but found [{other}]"
                )))
            }
        };
        let meta = match meta {
            Value::Object(m) => m,
            other => return Err(malformed(format!("expected START_OBJECT but found [{}]", token_name(&other)))),
        };
        let mut bop = BulkOp::new(op);
        for (k, val) in &meta {
            let simple = |val: &Value| -> Result<Option<String>, Response> {
                match val {
                    Value::String(s) => Ok(Some(s.clone())),
                    Value::Number(n) => Ok(Some(n.to_string())),
                    Value::Bool(b) => Ok(Some(b.to_string())),
                    Value::Null => Ok(None),
                    other => Err(bad_request(&format!(
                        "Malformed action/metadata line [{line_no}], expected a simple value for field [{k}] but found [{}]",
                        token_name(other)
                    ))),
                }
            };
            let long = |val: &Value| -> Result<Option<i64>, Response> {
                match simple(val)? {
                    None => Ok(None),
                    Some(s) => s.parse::<i64>().map(Some).map_err(|_| {
                        Response::es_error(
                            400,
                            "x_content_parse_exception",
                            &format!("[{line_no}:1] failed to parse field [{k}]: For input string: \"{s}\""),
                            Map::new(),
                        )
                    }),
                }
            };
            match k.as_str() {
                "_index" => bop.index = simple(val)?,
                "_id" => bop.id = simple(val)?,
                "routing"
                | "pipeline"
                | "require_data_stream"
                | "list_executed_pipelines"
                | "retry_on_conflict"
                | "op_type" => {
                    simple(val)?;
                }
                "require_alias" => bop.require_alias = simple(val)?.as_deref() == Some("true"),
                "if_seq_no" => bop.if_seq_no = long(val)?,
                "if_primary_term" => bop.if_primary_term = long(val)?,
                "version" => bop.version = long(val)?,
                "version_type" => {
                    let vt = simple(val)?;
                    if let Some(vt) = &vt {
                        if !matches!(vt.as_str(), "internal" | "external" | "external_gte") {
                            return Err(bad_request(&format!("No version type match [{vt}]")));
                        }
                    }
                    bop.version_type = vt;
                }
                "_source" | "dynamic_templates" => {}
                _ => {
                    return Err(bad_request(&format!(
                        "Action/metadata line [{line_no}] contains an unknown parameter [{k}]"
                    )))
                }
            }
        }
        if op != OpType::Delete {
            if i >= lines.len() {
                // Real Elasticsearch silently ignores a trailing action without its source line;
                // the stand-in refuses it so that such a bug cannot go unnoticed.
                return Err(bad_request(&format!(
                    "es-standin: the [{action}] action on line [{line_no}] has no source line (real Elasticsearch would silently ignore it)"
                )));
            }
            let src = lines[i];
            i += 1;
            if op == OpType::Update {
                bop.update = Some(parse_update(src)?);
            } else {
                bop.source = Some(src.to_vec());
            }
        }
        ops.push(bop);
    }
    Ok(ops)
}

fn parse_update(src: &[u8]) -> Result<UpdateSpec, Response> {
    let v: Value = serde_json::from_slice(src).map_err(|e| x_content_parse(&e))?;
    let Value::Object(o) = v else {
        return Err(Response::es_error(
            400,
            "x_content_parse_exception",
            &format!("[1:1] [UpdateRequest] Expected START_OBJECT but was: {}", token_name(&v)),
            Map::new(),
        ));
    };
    let mut spec = UpdateSpec {
        doc: None,
        doc_as_upsert: false,
        upsert: None,
        script: None,
        scripted_upsert: false,
        detect_noop: true,
    };
    let field_err = |k: &str| {
        Response::es_error(
            400,
            "x_content_parse_exception",
            &format!("[1:2] [UpdateRequest] failed to parse field [{k}]"),
            Map::new(),
        )
    };
    let as_bool = |k: &str, v: &Value| -> Result<bool, Response> {
        match v {
            Value::Bool(b) => Ok(*b),
            Value::String(s) if s == "true" => Ok(true),
            Value::String(s) if s == "false" => Ok(false),
            _ => Err(field_err(k)),
        }
    };
    for (k, v) in &o {
        match k.as_str() {
            "doc" => match v {
                Value::Object(m) => spec.doc = Some(m.clone()),
                _ => return Err(field_err(k)),
            },
            "upsert" => match v {
                Value::Object(_) => spec.upsert = Some(v.clone()),
                _ => return Err(field_err(k)),
            },
            "doc_as_upsert" => spec.doc_as_upsert = as_bool(k, v)?,
            "detect_noop" => spec.detect_noop = as_bool(k, v)?,
            "scripted_upsert" => spec.scripted_upsert = as_bool(k, v)?,
            "script" => spec.script = Some(v.clone()),
            "_source" => {}
            other => {
                return Err(Response::es_error(
                    400,
                    "x_content_parse_exception",
                    &format!("[1:2] [UpdateRequest] unknown field [{other}]"),
                    Map::new(),
                ))
            }
        }
    }
    Ok(spec)
}

/// BulkRequest.validate(): every item is validated up front and any error fails the whole
/// request with 400 `action_request_validation_exception`.
fn validate_ops(ops: &[BulkOp], path_index: Option<&str>) -> Result<(), Response> {
    let mut errors: Vec<String> = Vec::new();
    if ops.is_empty() {
        errors.push("no requests added".into());
    }
    for op in ops {
        if op.index.is_none() && path_index.is_none() {
            errors.push("index is missing".into());
        }
        let internal_version = op.version.is_some() && !op.external_version();
        match op.op {
            OpType::Index | OpType::Create => {
                if op.id.as_deref().is_some_and(|id| id.trim().is_empty()) {
                    errors.push("if _id is specified it must not be empty".into());
                }
                if op.op == OpType::Create && op.external_version() {
                    errors.push("create operations only support internal versioning. use index instead".into());
                }
            }
            OpType::Update => {
                if op.id.as_deref().is_none_or(|id| id.is_empty()) {
                    errors.push("id is missing".into());
                }
                let spec = op.update.as_ref().unwrap();
                if spec.doc.is_none() && spec.script.is_none() {
                    errors.push("script or doc is missing".into());
                }
                if op.version.is_some() {
                    errors.push("can't provide version in update request".into());
                }
            }
            OpType::Delete => {
                if op.id.as_deref().is_none_or(|id| id.is_empty()) {
                    errors.push("id is missing".into());
                }
            }
        }
        if internal_version && op.op != OpType::Update {
            errors.push(
                "internal versioning can not be used for optimistic concurrency control. Please use `if_seq_no` and `if_primary_term` instead"
                    .into(),
            );
        }
        if let Some(id) = &op.id {
            if id.len() > MAX_ID_BYTES {
                errors.push(format!(
                    "id [{id}] is too long, must be no longer than {MAX_ID_BYTES} bytes but was: {}",
                    id.len()
                ));
            }
        }
        match (op.if_seq_no, op.if_primary_term) {
            (Some(s), _) if s < 0 => errors.push(format!("sequence number must be non negative, got [{s}]")),
            (Some(_), None) | (Some(_), Some(0)) => errors.push("ifSeqNo is set, but primary term is [0]".into()),
            (None, Some(t)) => errors.push(format!("ifSeqNo is unassigned, but primary term is [{t}]")),
            _ => {}
        }
        if op.if_seq_no.is_some() && op.version.is_some() {
            errors.push("compare and write operations can not use versioning".into());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(validation_failed(&errors))
    }
}

struct ItemResult {
    op: OpType,
    index: String,
    status: u16,
    /// Item body without `status`.
    body: Map<String, Value>,
    failed: bool,
    /// Whether the store changed (false for failures, update `noop`, delete `not_found`).
    applied: bool,
}

fn item_failed(op: &BulkOp, index: &str, id: Option<&str>, status: u16, error: Value) -> ItemResult {
    let mut body = Map::new();
    body.insert("_index".into(), json!(index));
    body.insert("_id".into(), id.map(|i| json!(i)).unwrap_or(Value::Null));
    body.insert("error".into(), error);
    ItemResult { op: op.op, index: index.to_owned(), status, body, failed: true, applied: false }
}

#[allow(clippy::too_many_arguments)]
fn item_ok(
    op: OpType,
    index: &str,
    id: &str,
    version: u64,
    result: &str,
    seq_no: u64,
    status: u16,
    applied: bool,
) -> ItemResult {
    let mut body = Map::new();
    body.insert("_index".into(), json!(index));
    body.insert("_id".into(), json!(id));
    body.insert("_version".into(), json!(version));
    body.insert("result".into(), json!(result));
    let shards = if result == "noop" { json!({"total": 0, "successful": 0, "failed": 0}) } else { shards_ok(1) };
    body.insert("_shards".into(), shards);
    body.insert("_seq_no".into(), json!(seq_no));
    body.insert("_primary_term".into(), json!(1));
    ItemResult { op, index: index.to_owned(), status, body, failed: false, applied }
}

fn injected_error(status: u16, index: &str) -> Value {
    match status {
        429 => json!({
            "type": "es_rejected_execution_exception",
            "reason": "rejected execution of coordinating operation [coordinating_and_primary_bytes=104857600, replica_bytes=0, all_bytes=104857600, coordinating_operation_bytes=1048576, max_coordinating_and_primary_bytes=107374182]"
        }),
        503 => json!({
            "type": "unavailable_shards_exception",
            "reason": format!("[{index}][0] primary shard is not active Timeout: [1m], request: [BulkShardRequest [[{index}][0]] containing [1] requests]")
        }),
        500 => json!({"type": "illegal_state_exception", "reason": "es-standin: injected internal error"}),
        409 => {
            json!({"type": "version_conflict_engine_exception", "reason": "es-standin: injected version conflict", "index": index})
        }
        404 => {
            json!({"type": "index_not_found_exception", "reason": format!("no such index [{index}]"), "index": index})
        }
        400 => json!({"type": "illegal_argument_exception", "reason": "es-standin: injected bad request"}),
        other => {
            json!({"type": "status_exception", "reason": format!("es-standin: injected failure with status [{other}]")})
        }
    }
}

fn conflict(ix: &IndexData, index: &str, reason: String) -> Value {
    json!({"type": "version_conflict_engine_exception", "reason": reason, "index_uuid": ix.uuid, "shard": "0", "index": index})
}

/// `if_seq_no`/`if_primary_term` and external versions.
fn check_concurrency(ix: &IndexData, index: &str, id: &str, op: &BulkOp) -> Result<Option<u64>, Value> {
    if let (Some(seq), Some(term)) = (op.if_seq_no, op.if_primary_term) {
        match ix.docs.get(id) {
            None => {
                return Err(conflict(
                    ix,
                    index,
                    format!("[{id}]: version conflict, required seqNo [{seq}], primary term [{term}]. but no document was found"),
                ))
            }
            Some(d) if d.seq_no as i64 != seq || term != 1 => {
                return Err(conflict(
                    ix,
                    index,
                    format!(
                        "[{id}]: version conflict, required seqNo [{seq}], primary term [{term}]. current document has seqNo [{}] and primary term [1]",
                        d.seq_no
                    ),
                ))
            }
            _ => {}
        }
    }
    if op.external_version() {
        let v = op.version.unwrap_or(0);
        if v < 0 {
            return Err(
                json!({"type": "illegal_argument_exception", "reason": format!("illegal version value [{v}] for version type [EXTERNAL]")}),
            );
        }
        let v = v as u64;
        let current = ix.docs.get(id).map(|d| d.version).or_else(|| ix.tombstones.get(id).copied());
        if let Some(c) = current {
            let gte = op.version_type.as_deref() == Some("external_gte");
            if (!gte && v <= c) || (gte && v < c) {
                let how = if gte { "higher than" } else { "higher or equal to" };
                return Err(conflict(
                    ix,
                    index,
                    format!("[{id}]: version conflict, current version [{c}] is {how} the one provided [{v}]"),
                ));
            }
        }
        return Ok(Some(v));
    }
    Ok(None)
}

fn parse_source(raw: &[u8]) -> Result<Value, Value> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(
            json!({"type": "document_parsing_exception", "reason": "[1:1] Malformed content, must start with an object"}),
        ),
        Err(e) => {
            let inner = format!("[{}:{}] {}", e.line(), e.column(), json_error_text(&e));
            Err(json!({
                "type": "document_parsing_exception",
                "reason": format!("[{}:{}] failed to parse: {}", e.line(), e.column(), json_error_text(&e)),
                "caused_by": {"type": "x_content_parse_exception", "reason": inner}
            }))
        }
    }
}

fn deep_merge(target: &mut Value, patch: &Map<String, Value>) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in patch {
        if let (Some(Value::Object(_)), Value::Object(p)) = (t.get(k), v) {
            deep_merge(t.get_mut(k).unwrap(), p);
        } else {
            t.insert(k.clone(), v.clone());
        }
    }
}

/// Applies one bulk item. `injected` is a fault decided beforehand (the item is then not applied).
fn apply_op(
    st: &mut State,
    op: &BulkOp,
    default_index: Option<&str>,
    auto_create: bool,
    injected: Option<u16>,
) -> ItemResult {
    let painless = st.painless;
    let index = op.index.as_deref().or(default_index).expect("validated: index present").to_owned();
    if let Some(status) = injected {
        return item_failed(op, &index, op.id.as_deref(), status, injected_error(status, &index));
    }
    if let Err(reason) = validate_index_name(&index) {
        return item_failed(
            op,
            &index,
            op.id.as_deref(),
            400,
            json!({"type": "invalid_index_name_exception", "reason": reason, "index_uuid": "_na_", "index": index}),
        );
    }
    if op.require_alias {
        let reason =
            format!("no such index [{index}] and [require_alias] request flag is [true] and [{index}] is not an alias");
        let mut e = index_not_found_extra(&index, "index_or_alias");
        e.insert("type".into(), json!("index_not_found_exception"));
        e.insert("reason".into(), json!(reason));
        return item_failed(op, &index, op.id.as_deref(), 404, Value::Object(e));
    }
    if !st.indices.contains_key(&index) {
        let may_create = auto_create
            && match op.op {
                OpType::Delete => false,
                OpType::Update => op.update.as_ref().is_some_and(|u| u.doc_as_upsert || u.upsert.is_some()),
                _ => true,
            };
        if !may_create {
            let mut e = index_not_found_extra(&index, "index_or_alias");
            e.insert("type".into(), json!("index_not_found_exception"));
            e.insert("reason".into(), json!(format!("no such index [{index}]")));
            return item_failed(op, &index, op.id.as_deref(), 404, Value::Object(e));
        }
        if let Err(resp) = st.create_index(&index, None) {
            let err = resp.json_body()["error"].clone();
            return item_failed(op, &index, op.id.as_deref(), resp.status, err);
        }
    }
    let auto_id = if op.id.is_none() { Some(st.rng.auto_id()) } else { None };
    let ix = st.indices.get_mut(&index).unwrap();
    match op.op {
        OpType::Index | OpType::Create => {
            let id = op.id.clone().or(auto_id).unwrap();
            let raw = op.source.as_deref().unwrap_or(b"");
            let source = match parse_source(raw) {
                Ok(v) => v,
                Err(e) => return item_failed(op, &index, Some(&id), 400, e),
            };
            let new_mappings = match check_mapping(&ix.mappings, &source, &id, raw) {
                Ok(m) => m,
                Err(e) => return item_failed(op, &index, Some(&id), 400, e),
            };
            if op.op == OpType::Create {
                if let Some(d) = ix.docs.get(&id) {
                    let reason =
                        format!("[{id}]: version conflict, document already exists (current version [{}])", d.version);
                    let e = conflict(ix, &index, reason);
                    return item_failed(op, &index, Some(&id), 409, e);
                }
            }
            let ext = match check_concurrency(ix, &index, &id, op) {
                Ok(v) => v,
                Err(e) => {
                    let status = if e["type"] == "version_conflict_engine_exception" { 409 } else { 400 };
                    return item_failed(op, &index, Some(&id), status, e);
                }
            };
            if let Some(m) = new_mappings {
                ix.mappings = m;
            }
            let (version, seq_no, created) = ix.put(&id, source, ext);
            let (result, status) = if created { ("created", 201) } else { ("updated", 200) };
            item_ok(op.op, &index, &id, version, result, seq_no, status, true)
        }
        OpType::Update => {
            let id = op.id.clone().unwrap();
            let spec = op.update.as_ref().unwrap();
            if let Err(e) = check_concurrency(ix, &index, &id, op) {
                return item_failed(op, &index, Some(&id), 409, e);
            }
            if let Some(script) = &spec.script {
                if !painless {
                    let e = json!({
                        "type": "illegal_argument_exception",
                        "reason": "failed to execute script",
                        "caused_by": {"type": "illegal_argument_exception", "reason": "script_lang not supported [painless]"}
                    });
                    return item_failed(op, &index, Some(&id), 400, e);
                }
                let params = match merge_script_params(script) {
                    Ok(params) => params,
                    Err(e) => return item_failed(op, &index, Some(&id), 400, e),
                };
                let (current, existed) = match ix.docs.get(&id) {
                    Some(d) => (d.source.as_object().cloned().unwrap_or_default(), true),
                    None if spec.scripted_upsert && spec.upsert.is_some() => {
                        (spec.upsert.as_ref().and_then(Value::as_object).cloned().unwrap_or_default(), false)
                    }
                    None => match &spec.upsert {
                        // Without scripted_upsert, the upsert document goes in as it is.
                        Some(u) => {
                            let (version, seq_no, _) = ix.put(&id, u.clone(), None);
                            return item_ok(op.op, &index, &id, version, "created", seq_no, 201, true);
                        }
                        None => {
                            let e = json!({
                                "type": "document_missing_exception",
                                "reason": format!("[{id}]: document missing"),
                                "index_uuid": ix.uuid, "shard": "0", "index": index
                            });
                            return item_failed(op, &index, Some(&id), 404, e);
                        }
                    },
                };
                let Some(merged) = run_merge_script(current, &params) else {
                    let d = ix.docs.get(&id).expect("a noop needs a document");
                    return item_ok(op.op, &index, &id, d.version, "noop", d.seq_no, 200, false);
                };
                let new_source = Value::Object(merged);
                let raw = serde_json::to_vec(&new_source).unwrap_or_default();
                match check_mapping(&ix.mappings, &new_source, &id, &raw) {
                    Ok(Some(m)) => ix.mappings = m,
                    Ok(None) => {}
                    Err(e) => return item_failed(op, &index, Some(&id), 400, e),
                }
                let (version, seq_no, _) = ix.put(&id, new_source, None);
                let (result, status) = if existed { ("updated", 200) } else { ("created", 201) };
                return item_ok(op.op, &index, &id, version, result, seq_no, status, true);
            }
            let doc = spec.doc.clone().unwrap_or_default();
            let (new_source, existed) = match ix.docs.get(&id) {
                Some(d) => {
                    let mut merged = (*d.source).clone();
                    deep_merge(&mut merged, &doc);
                    if spec.detect_noop && merged == *d.source {
                        return item_ok(op.op, &index, &id, d.version, "noop", d.seq_no, 200, false);
                    }
                    (merged, true)
                }
                None => {
                    if spec.doc_as_upsert {
                        (Value::Object(doc), false)
                    } else if let Some(u) = &spec.upsert {
                        (u.clone(), false)
                    } else {
                        let e = json!({
                            "type": "document_missing_exception",
                            "reason": format!("[{id}]: document missing"),
                            "index_uuid": ix.uuid, "shard": "0", "index": index
                        });
                        return item_failed(op, &index, Some(&id), 404, e);
                    }
                }
            };
            let raw = serde_json::to_vec(&new_source).unwrap_or_default();
            let new_mappings = match check_mapping(&ix.mappings, &new_source, &id, &raw) {
                Ok(m) => m,
                Err(e) => return item_failed(op, &index, Some(&id), 400, e),
            };
            if let Some(m) = new_mappings {
                ix.mappings = m;
            }
            let (version, seq_no, _) = ix.put(&id, new_source, None);
            let (result, status) = if existed { ("updated", 200) } else { ("created", 201) };
            item_ok(op.op, &index, &id, version, result, seq_no, status, true)
        }
        OpType::Delete => {
            let id = op.id.clone().unwrap();
            let ext = match check_concurrency(ix, &index, &id, op) {
                Ok(v) => v,
                Err(e) => return item_failed(op, &index, Some(&id), 409, e),
            };
            let (version, seq_no, found) = ix.delete(&id, ext);
            if found {
                item_ok(op.op, &index, &id, version, "deleted", seq_no, 200, true)
            } else {
                item_ok(op.op, &index, &id, version, "not_found", seq_no, 404, false)
            }
        }
    }
}

/// `POST /_scripts/painless/_execute`: the stand-in evaluates only `params.x + 1` (the
/// probe embedjoin runs at start) and refuses anything else; with painless off it answers
/// as Elasticsearch without the module does.
fn painless_execute(st: &State, req: &Request) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(&req.body).map_err(|e| x_content_parse(&e))?;
    if !st.painless {
        return Err(Response::es_error(
            400,
            "illegal_argument_exception",
            "must specify lang for stored script",
            Map::new(),
        ));
    }
    let script = &body["script"];
    match (script["source"].as_str(), script["params"]["x"].as_i64()) {
        (Some("params.x + 1"), Some(x)) => Ok(Response::json(200, json!({"result": (x + 1).to_string()}))),
        _ => Err(Response::es_error(
            400,
            "illegal_argument_exception",
            "es-standin: the execute API runs only `params.x + 1`",
            Map::new(),
        )),
    }
}

/// The params of an update's script, if it is embedjoin's guarded merge: the only script the
/// stand-in runs (it has no painless). Any other script is refused, as an engine refuses a
/// script it cannot compile.
fn merge_script_params(script: &Value) -> Result<Map<String, Value>, Value> {
    let refuse =
        |reason: &str| json!({"type": "illegal_argument_exception", "reason": format!("es-standin: {reason}")});
    let lang = script.get("lang").and_then(Value::as_str).unwrap_or("painless");
    if lang != "painless" {
        return Err(refuse(&format!("script_lang not supported [{lang}]")));
    }
    if script.get("source").and_then(Value::as_str) != Some(embedjoin::sink::encode::MERGE_SCRIPT) {
        return Err(refuse("the stand-in runs only embedjoin's merge script"));
    }
    let params = script.get("params").and_then(Value::as_object).cloned().unwrap_or_default();
    if !params.get("d").is_some_and(|d| d["_parts"].is_object()) || !params.get("fields").is_some_and(Value::is_object)
    {
        return Err(json!({
            "type": "script_exception",
            "reason": "runtime error",
            "caused_by": {"type": "null_pointer_exception", "reason": "params.d._parts or params.fields is missing"}
        }));
    }
    Ok(params)
}

/// What [`embedjoin::sink::encode::MERGE_SCRIPT`] does to a document's source, in Rust:
/// `None` for a `noop`.
fn run_merge_script(mut src: Map<String, Value>, params: &Map<String, Value>) -> Option<Map<String, Value>> {
    let (d, fields) = (params["d"].as_object().expect("checked"), params["fields"].as_object().expect("checked"));
    let fresh = src.is_empty();
    let mut have = src.get("_parts").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut applied = 0;
    for (t, s) in d["_parts"].as_object().expect("checked") {
        let newer = match have.get(t) {
            None => true,
            Some(h) => h.as_f64().unwrap_or(f64::NAN) < s.as_f64().unwrap_or(f64::NAN),
        };
        if !newer {
            continue;
        }
        let field = fields.get(t).and_then(Value::as_str).unwrap_or_default();
        src.insert(field.to_owned(), d.get(field).cloned().unwrap_or(Value::Null));
        have.insert(t.clone(), s.clone());
        applied += 1;
        if let Some(Value::Array(missing)) = src.get_mut("missing_parts") {
            missing.retain(|x| x.as_str() != Some(t));
        }
    }
    if fresh || applied == fields.len() {
        return Some(d.clone());
    }
    if applied == 0 {
        return None;
    }
    src.insert("_parts".into(), Value::Object(have));
    if matches!(src.get("missing_parts"), Some(Value::Array(m)) if m.is_empty()) {
        src.remove("missing_parts");
        src.remove("incomplete");
    }
    let vector_fields: HashSet<&str> = fields.values().filter_map(Value::as_str).collect();
    for (k, v) in d {
        let marker = k == "incomplete" || k == "missing_parts";
        if !vector_fields.contains(k.as_str()) && k != "_parts" && !marker {
            src.insert(k.clone(), v.clone());
        }
    }
    Some(src)
}

struct InFlightGuard(Arc<Shared>);
impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.with_stats(|s| s.bulk_in_flight = s.bulk_in_flight.saturating_sub(1));
    }
}

struct PausedGuard(Arc<Shared>);
impl Drop for PausedGuard {
    fn drop(&mut self) {
        self.0.with_stats(|s| s.bulk_paused = s.bulk_paused.saturating_sub(1));
    }
}

async fn handle_bulk(
    shared: &Arc<Shared>,
    req: &Request,
    path_index: Option<&str>,
    record: &mut RequestRecord,
) -> Outcome {
    let refresh = match check_write_params(req).and_then(|r| parse_bool_param(req, "require_alias", false).map(|_| r)) {
        Ok(r) => r,
        Err(resp) => return Outcome::Respond(resp),
    };
    let default_require_alias = req.param("require_alias").is_some_and(|v| v.is_empty() || v == "true");
    shared.with_stats(|s| {
        s.bulk_requests += 1;
        s.bulk_in_flight += 1;
        s.max_bulk_in_flight = s.max_bulk_in_flight.max(s.bulk_in_flight);
    });
    let _in_flight = InFlightGuard(shared.clone());

    if shared.faults.is_paused() {
        shared.with_stats(|s| s.bulk_paused += 1);
        let _paused = PausedGuard(shared.clone());
        let mut rx = shared.faults.paused.subscribe();
        let _ = rx.wait_for(|p| !*p).await;
    }
    let latency = shared.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let mut drop_after = false;
    match shared.faults.decide_request() {
        RequestFault::Reject(status) => {
            shared.with_stats(|s| s.bulk_requests_failed += 1);
            let err = injected_error(status, path_index.unwrap_or("_all"));
            return Outcome::Respond(Response::from_error_object(status, err));
        }
        RequestFault::Drop(DropMode::BeforeApply) => return Outcome::Drop,
        RequestFault::Drop(DropMode::AfterApply) => drop_after = true,
        RequestFault::None => {}
    }

    let ops = match parse_bulk(&req.body).and_then(|ops| validate_ops(&ops, path_index).map(|_| ops)) {
        Ok(mut ops) => {
            if default_require_alias {
                for op in &mut ops {
                    op.require_alias = true;
                }
            }
            ops
        }
        Err(resp) => {
            shared.with_stats(|s| s.bulk_requests_failed += 1);
            return Outcome::Respond(resp);
        }
    };
    record.bulk_items = Some(ops.len());
    let injected = {
        let ids: Vec<Option<&str>> = ops.iter().map(|o| o.id.as_deref()).collect();
        shared.faults.decide_items(&ids)
    };
    let auto_create = shared.auto_create_index.load(Ordering::SeqCst);

    let (items, errors) = {
        let mut st = lock(&shared.state);
        let mut touched: Vec<String> = Vec::new();
        let mut items = Vec::with_capacity(ops.len());
        let mut errors = false;
        for (op, inj) in ops.iter().zip(injected) {
            let r = apply_op(&mut st, op, path_index, auto_create, inj);
            st.stats.items_received += 1;
            if r.failed {
                errors = true;
                *st.stats.items_failed.entry(r.status).or_insert(0) += 1;
            } else if r.applied {
                st.stats.items_applied += 1;
            } else {
                st.stats.items_unchanged += 1;
            }
            if !r.failed && !touched.contains(&r.index) {
                touched.push(r.index.clone());
            }
            let mut body = r.body;
            if refresh == RefreshPolicy::Immediate && !r.failed && r.applied {
                body.insert("forced_refresh".into(), json!(true));
            }
            body.insert("status".into(), json!(r.status));
            let mut item = Map::new();
            item.insert(r.op.name().into(), Value::Object(body));
            items.push(Value::Object(item));
        }
        if refresh != RefreshPolicy::None {
            for name in &touched {
                if let Some(ix) = st.indices.get_mut(name) {
                    ix.refresh();
                }
            }
        }
        (items, errors)
    };
    shared.notify();
    if drop_after {
        return Outcome::Drop;
    }
    let took = req.started.elapsed().as_millis() as u64;
    Outcome::Respond(Response::json(200, json!({"took": took, "errors": errors, "items": items})))
}

fn handle_single_write(
    st: &mut State,
    req: &Request,
    op_type: OpType,
    index: &str,
    id: Option<String>,
    auto_create: bool,
) -> Result<Response, Response> {
    let refresh = check_write_params(req)?;
    let num = |name: &str| -> Result<Option<i64>, Response> {
        req.param(name)
            .map(|s| {
                s.parse::<i64>()
                    .map_err(|_| bad_request(&format!("Failed to parse long parameter [{name}] with value [{s}]")))
            })
            .transpose()
    };
    let mut op = BulkOp::new(op_type);
    op.index = Some(index.to_owned());
    op.id = id;
    op.if_seq_no = num("if_seq_no")?;
    op.if_primary_term = num("if_primary_term")?;
    op.version = num("version")?;
    op.version_type = req.param("version_type").map(str::to_owned);
    if let Some(vt) = &op.version_type {
        if !matches!(vt.as_str(), "internal" | "external" | "external_gte") {
            return Err(bad_request(&format!("No version type match [{vt}]")));
        }
    }
    op.require_alias = parse_bool_param(req, "require_alias", false)?;
    if op_type != OpType::Delete {
        if req.body.is_empty() {
            return Err(validation_failed(&["source is missing".into(), "content type is missing".into()]));
        }
        op.source = Some(req.body.clone());
    }
    validate_ops(std::slice::from_ref(&op), None)?;
    let item = apply_op(st, &op, None, auto_create, None);
    if item.failed {
        return Err(Response::from_error_object(item.status, item.body["error"].clone()));
    }
    if refresh != RefreshPolicy::None {
        if let Some(ix) = st.indices.get_mut(index) {
            ix.refresh();
        }
    }
    let mut body = item.body;
    if refresh == RefreshPolicy::Immediate {
        body.insert("forced_refresh".into(), json!(true));
    }
    Ok(Response::json(item.status, Value::Object(body)))
}

// ---------------------------------------------------------------------------------------------
// Mappings
// ---------------------------------------------------------------------------------------------

const KNOWN_TYPES: &[&str] = &[
    "text",
    "keyword",
    "long",
    "integer",
    "short",
    "byte",
    "double",
    "float",
    "half_float",
    "scaled_float",
    "unsigned_long",
    "date",
    "date_nanos",
    "boolean",
    "binary",
    "object",
    "nested",
    "flattened",
    "dense_vector",
    "sparse_vector",
    "rank_feature",
    "rank_features",
    "ip",
    "geo_point",
    "geo_shape",
    "shape",
    "point",
    "completion",
    "search_as_you_type",
    "token_count",
    "match_only_text",
    "wildcard",
    "constant_keyword",
    "alias",
    "join",
    "percolator",
    "version",
    "integer_range",
    "float_range",
    "long_range",
    "double_range",
    "date_range",
    "ip_range",
    "histogram",
    "semantic_text",
    "aggregate_metric_double",
    "counted_keyword",
];

const METADATA_FIELDS: &[&str] = &[
    "_id",
    "_index",
    "_routing",
    "_source",
    "_seq_no",
    "_version",
    "_primary_term",
    "_field_names",
    "_ignored",
    "_doc_count",
    "_tier",
    "_data_stream_timestamp",
    "_nested_path",
    "_feature",
    "_ignored_source",
];

const SIMILARITIES: &[&str] = &["l2_norm", "dot_product", "cosine", "max_inner_product"];

fn join_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn check_dynamic_value(v: &Value) -> Result<(), String> {
    match v {
        Value::Bool(_) => Ok(()),
        Value::String(s) if matches!(s.as_str(), "true" | "false" | "strict" | "runtime") => Ok(()),
        other => Err(format!(
            "Unknown value [{}] for field [dynamic] - accepted values are [true, runtime, false, strict]",
            preview(other)
        )),
    }
}

/// Validates a `mappings` object like `PUT /{index}` does and fills in the 8.15 defaults
/// (`dense_vector`: `index: true`, `similarity: cosine`, `index_options: int8_hnsw`).
fn normalize_mappings(m: &Value) -> Result<Value, String> {
    let Some(obj) = m.as_object() else {
        return Err(format!("Expected map for [mappings] but got [{}]", preview(m)));
    };
    let mut out = Map::new();
    let mut unsupported = Vec::new();
    for (k, v) in obj {
        match k.as_str() {
            "properties" => {
                out.insert(k.clone(), Value::Object(normalize_props(v, "")?));
            }
            "dynamic" => {
                check_dynamic_value(v)?;
                out.insert(k.clone(), v.clone());
            }
            "_source"
            | "dynamic_templates"
            | "_meta"
            | "_routing"
            | "date_detection"
            | "numeric_detection"
            | "dynamic_date_formats"
            | "runtime"
            | "enabled"
            | "subobjects"
            | "_data_stream_timestamp"
            | "_field_names" => {
                out.insert(k.clone(), v.clone());
            }
            _ => unsupported.push(format!("{k} : {v}")),
        }
    }
    if !unsupported.is_empty() {
        return Err(format!("Root mapping definition has unsupported parameters:  [{}]", unsupported.join("] [")));
    }
    Ok(Value::Object(out))
}

fn expand_dotted_props(props: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, def) in props {
        match name.split_once('.') {
            Some((head, rest)) if !head.is_empty() && !rest.is_empty() => {
                let entry = out.entry(head.to_owned()).or_insert_with(|| json!({"properties": {}}));
                if let Some(eo) = entry.as_object_mut() {
                    let p = eo.entry("properties").or_insert_with(|| json!({}));
                    if let Some(po) = p.as_object_mut() {
                        let mut single = Map::new();
                        single.insert(rest.to_owned(), def.clone());
                        for (k, v) in expand_dotted_props(&single) {
                            po.insert(k, v);
                        }
                    }
                }
            }
            _ => {
                out.insert(name.clone(), def.clone());
            }
        }
    }
    out
}

fn normalize_props(v: &Value, prefix: &str) -> Result<Map<String, Value>, String> {
    let Some(props) = v.as_object() else {
        return Err(format!("Expected map for property [properties] on field [{prefix}] but got [{}]", preview(v)));
    };
    let props = expand_dotted_props(props);
    let mut out = Map::new();
    for (name, def) in &props {
        if name.trim().is_empty() || name.contains('.') {
            return Err(format!("field name cannot be an empty string or contain only dots: [{name}]"));
        }
        let full = join_path(prefix, name);
        let Some(d) = def.as_object() else {
            return Err(format!(
                "Expected map for property [fields] on field [{name}] but got a class java.lang.String"
            ));
        };
        let ty = match d.get("type") {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => return Err(format!("No type specified for field [{name}]: [{}]", preview(other))),
        };
        let nd = match ty {
            None | Some("object") | Some("nested") => {
                let mut o = d.clone();
                if let Some(p) = d.get("properties") {
                    o.insert("properties".into(), Value::Object(normalize_props(p, &full)?));
                }
                if let Some(dy) = d.get("dynamic") {
                    check_dynamic_value(dy)?;
                }
                o
            }
            Some("dense_vector") => normalize_dense_vector(name, d)?,
            Some(t) if KNOWN_TYPES.contains(&t) => {
                if d.contains_key("properties") {
                    return Err(format!("unknown parameter [properties] on mapper [{name}] of type [{t}]"));
                }
                let mut o = d.clone();
                if let Some(f) = d.get("fields") {
                    o.insert("fields".into(), Value::Object(normalize_props(f, &full)?));
                }
                o
            }
            Some(t) => return Err(format!("No handler for type [{t}] declared on field [{name}]")),
        };
        out.insert(name.clone(), Value::Object(nd));
    }
    Ok(out)
}

fn default_index_options(element: &str) -> Value {
    if element == "float" {
        json!({"type": "int8_hnsw", "m": 16, "ef_construction": 100})
    } else {
        json!({"type": "hnsw", "m": 16, "ef_construction": 100})
    }
}

fn normalize_dense_vector(name: &str, d: &Map<String, Value>) -> Result<Map<String, Value>, String> {
    for k in d.keys() {
        if !matches!(k.as_str(), "type" | "dims" | "element_type" | "index" | "similarity" | "index_options" | "meta") {
            return Err(format!("unknown parameter [{k}] on mapper [{name}] of type [dense_vector]"));
        }
    }
    let element = match d.get("element_type") {
        None => "float".to_owned(),
        Some(Value::String(s)) if matches!(s.as_str(), "float" | "byte" | "bit") => s.clone(),
        Some(other) => {
            return Err(format!(
                "Unknown value [{}] for field [element_type] - accepted values are [float, byte, bit]",
                preview(other)
            ))
        }
    };
    let dims = match d.get("dims") {
        None => None,
        Some(v) => {
            let n = v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
            match n {
                Some(n) => Some(n),
                None => return Err(format!("Unable to parse [dims] for field [{name}]: [{}]", preview(v))),
            }
        }
    };
    if let Some(n) = dims {
        let max = if element == "bit" { (MAX_DIMS * 8) as u64 } else { MAX_DIMS as u64 };
        if n == 0 || n > max {
            return Err(format!("The number of dimensions should be in the range [1, {max}] but was [{n}]"));
        }
        if element == "bit" && n % 8 != 0 {
            return Err(format!(
                "The number of dimensions for should be a multiple of 8 for [bit] element_type but was [{n}]"
            ));
        }
    }
    let index = match d.get("index") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
        Some(other) => {
            return Err(format!("Failed to parse value [{}] as only [true] or [false] are allowed.", preview(other)))
        }
    };
    let similarity = match d.get("similarity") {
        None => None,
        Some(Value::String(s)) if SIMILARITIES.contains(&s.as_str()) => Some(s.clone()),
        Some(other) => {
            return Err(format!(
                "Unknown value [{}] for field [similarity] - accepted values are [l2_norm, dot_product, cosine, max_inner_product]",
                preview(other)
            ))
        }
    };
    if !index && similarity.is_some() {
        return Err("Field [similarity] requires field [index] to be configured and set to true".into());
    }
    if !index && d.contains_key("index_options") {
        return Err("Field [index_options] requires field [index] to be configured and set to true".into());
    }
    if element == "bit" && similarity.as_deref().is_some_and(|s| s != "l2_norm") {
        return Err(format!(
            "The [{}] similarity is not supported for [bit] element_type, only [l2_norm] is",
            similarity.unwrap()
        ));
    }
    let mut out = Map::new();
    out.insert("type".into(), json!("dense_vector"));
    if let Some(n) = dims {
        out.insert("dims".into(), json!(n));
    }
    if element != "float" {
        out.insert("element_type".into(), json!(element));
    }
    out.insert("index".into(), json!(index));
    if index {
        let default_sim = if element == "bit" { "l2_norm" } else { "cosine" };
        out.insert("similarity".into(), json!(similarity.unwrap_or_else(|| default_sim.to_owned())));
        let options = match d.get("index_options") {
            None => default_index_options(&element),
            Some(Value::Object(o)) => {
                let t = o.get("type").and_then(|t| t.as_str()).unwrap_or("");
                if !matches!(t, "hnsw" | "int8_hnsw" | "int4_hnsw" | "flat" | "int8_flat" | "int4_flat") {
                    return Err(format!("Unknown vector index options type [{t}] for field [{name}]"));
                }
                if t.starts_with("int") && element != "float" {
                    return Err(format!("[element_type] cannot be [{element}] when using index type [{t}]"));
                }
                let mut o = o.clone();
                if t.ends_with("hnsw") {
                    o.entry("m").or_insert(json!(16));
                    o.entry("ef_construction").or_insert(json!(100));
                }
                Value::Object(o)
            }
            Some(other) => {
                return Err(format!("Expected map for [index_options] on field [{name}] but got [{}]", preview(other)))
            }
        };
        out.insert("index_options".into(), options);
    }
    if let Some(meta) = d.get("meta") {
        out.insert("meta".into(), meta.clone());
    }
    Ok(out)
}

fn field_type(def: &Value) -> String {
    def.get("type").and_then(|t| t.as_str()).unwrap_or("object").to_owned()
}

/// Adds `overlay` (normalized) on top of `base`, refusing incompatible changes.
fn merge_mappings(base: &Value, overlay: &Value) -> Result<Value, String> {
    let mut out = base.as_object().cloned().unwrap_or_default();
    for (k, v) in overlay.as_object().into_iter().flatten() {
        if k == "properties" {
            let mut props = out.get("properties").and_then(|p| p.as_object()).cloned().unwrap_or_default();
            merge_props(&mut props, v.as_object().cloned().unwrap_or_default(), "")?;
            out.insert("properties".into(), Value::Object(props));
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    Ok(Value::Object(out))
}

fn merge_props(base: &mut Map<String, Value>, overlay: Map<String, Value>, prefix: &str) -> Result<(), String> {
    for (name, def) in overlay {
        let full = join_path(prefix, &name);
        let Some(existing) = base.get_mut(&name) else {
            base.insert(name, def);
            continue;
        };
        let (t_old, t_new) = (field_type(existing), field_type(&def));
        if t_old != t_new {
            return Err(format!("mapper [{full}] cannot be changed from type [{t_old}] to [{t_new}]"));
        }
        let (Some(eo), Some(no)) = (existing.as_object_mut(), def.as_object()) else { continue };
        match t_old.as_str() {
            "object" | "nested" => {
                let mut props = eo.get("properties").and_then(|p| p.as_object()).cloned().unwrap_or_default();
                merge_props(
                    &mut props,
                    no.get("properties").and_then(|p| p.as_object()).cloned().unwrap_or_default(),
                    &full,
                )?;
                for (k, v) in no {
                    if k != "properties" {
                        eo.insert(k.clone(), v.clone());
                    }
                }
                eo.insert("properties".into(), Value::Object(props));
            }
            "dense_vector" => {
                for p in ["dims", "element_type", "similarity", "index"] {
                    if let (Some(a), Some(b)) = (eo.get(p), no.get(p)) {
                        if a != b {
                            return Err(format!(
                                "Mapper for [{full}] conflicts with existing mapper:\n\tCannot update parameter [{p}] from [{}] to [{}]",
                                preview(a),
                                preview(b)
                            ));
                        }
                    }
                }
                for (k, v) in no {
                    eo.insert(k.clone(), v.clone());
                }
            }
            _ => {
                for (k, v) in no {
                    eo.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dynamic {
    True,
    False,
    Strict,
    Runtime,
}

fn parse_dynamic(v: Option<&Value>, inherited: Dynamic) -> Dynamic {
    match v {
        Some(Value::Bool(true)) => Dynamic::True,
        Some(Value::Bool(false)) => Dynamic::False,
        Some(Value::String(s)) => match s.as_str() {
            "true" => Dynamic::True,
            "false" => Dynamic::False,
            "strict" => Dynamic::Strict,
            "runtime" => Dynamic::Runtime,
            _ => inherited,
        },
        _ => inherited,
    }
}

/// Column of a field in the source line, for "[1:COL]" prefixes (approximate, 1-based); only
/// computed when an error message is formatted.
#[derive(Clone, Copy)]
struct Col<'r, 'k> {
    raw: &'r str,
    key: &'k str,
}

impl std::fmt::Display for Col<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let col = self.raw.find(&format!("\"{}\"", self.key)).map(|p| p + self.key.len() + 3).unwrap_or(1);
        write!(f, "{col}")
    }
}

struct MapCtx<'a> {
    id: &'a str,
    raw: &'a str,
    changed: bool,
}

impl<'a> MapCtx<'a> {
    /// Column of a field in the source line, for "[1:COL]" prefixes (approximate, 1-based).
    fn col<'k>(&self, key: &'k str) -> Col<'a, 'k> {
        Col { raw: self.raw, key }
    }
}

fn doc_parse_error(col: impl std::fmt::Display, inner: String) -> Value {
    json!({
        "type": "document_parsing_exception",
        "reason": format!("[1:{col}] failed to parse: {inner}"),
        "caused_by": {"type": "illegal_argument_exception", "reason": inner}
    })
}

fn field_parse_error(
    ctx: &MapCtx,
    col: impl std::fmt::Display,
    path: &str,
    ty: &str,
    value: &Value,
    cause_type: &str,
    cause: String,
) -> Value {
    json!({
        "type": "document_parsing_exception",
        "reason": format!(
            "[1:{col}] failed to parse field [{path}] of type [{ty}] in document with id '{}'. Preview of field's value: '{}'",
            ctx.id, preview(value)
        ),
        "caused_by": {"type": cause_type, "reason": cause}
    })
}

/// Checks a source against the index mapping; returns the mapping grown by dynamic mapping
/// (`Some`) when new fields were added, `Err(error object)` when the document does not fit.
fn check_mapping(mappings: &Value, source: &Value, id: &str, raw: &[u8]) -> Result<Option<Value>, Value> {
    let mut m = if mappings.is_object() { mappings.clone() } else { json!({}) };
    let root = m.as_object_mut().unwrap();
    if root.get("enabled") == Some(&Value::Bool(false)) {
        return Ok(None);
    }
    let dynamic = parse_dynamic(root.get("dynamic"), Dynamic::True);
    let had_props = root.contains_key("properties");
    let props = root.entry("properties").or_insert_with(|| json!({}));
    let raw_str = String::from_utf8_lossy(raw);
    let mut ctx = MapCtx { id, raw: &raw_str, changed: false };
    let Some(obj) = source.as_object() else { return Ok(None) };
    walk_object(&mut ctx, props.as_object_mut().unwrap(), dynamic, obj, "", "_doc")?;
    if !ctx.changed {
        return Ok(None);
    }
    let _ = had_props;
    Ok(Some(m))
}

fn walk_object(
    ctx: &mut MapCtx,
    props: &mut Map<String, Value>,
    dynamic: Dynamic,
    obj: &Map<String, Value>,
    prefix: &str,
    within: &str,
) -> Result<(), Value> {
    for (key, value) in obj {
        if key.trim().is_empty() {
            return Err(doc_parse_error(ctx.col(key), "field name cannot be an empty string".into()));
        }
        if prefix.is_empty() && METADATA_FIELDS.contains(&key.as_str()) {
            return Err(json!({
                "type": "document_parsing_exception",
                "reason": format!("[1:{}] Field [{key}] is a metadata field and cannot be added inside a document. Use the index API request parameters.", ctx.col(key))
            }));
        }
        if key.contains('.') {
            let parts: Vec<&str> = key.split('.').collect();
            if parts.iter().any(|p| p.trim().is_empty()) {
                return Err(doc_parse_error(
                    ctx.col(key),
                    format!("field name cannot contain only whitespace: ['{key}']"),
                ));
            }
            let mut v = value.clone();
            for p in parts[1..].iter().rev() {
                let mut m = Map::new();
                m.insert((*p).to_owned(), v);
                v = Value::Object(m);
            }
            visit_field(ctx, props, dynamic, parts[0], &v, prefix, within)?;
        } else {
            visit_field(ctx, props, dynamic, key, value, prefix, within)?;
        }
    }
    Ok(())
}

fn visit_field(
    ctx: &mut MapCtx,
    props: &mut Map<String, Value>,
    dynamic: Dynamic,
    key: &str,
    value: &Value,
    prefix: &str,
    within: &str,
) -> Result<(), Value> {
    if value.is_null() {
        return Ok(());
    }
    let path = join_path(prefix, key);
    let mut newly_added = false;
    if !props.contains_key(key) {
        match dynamic {
            Dynamic::Strict => {
                return Err(json!({
                    "type": "strict_dynamic_mapping_exception",
                    "reason": format!("[1:{}] mapping set to strict, dynamic introduction of [{key}] within [{within}] is not allowed", ctx.col(key))
                }))
            }
            Dynamic::False | Dynamic::Runtime => return Ok(()),
            Dynamic::True => match infer_mapping(value) {
                Some(m) => {
                    props.insert(key.to_owned(), m);
                    ctx.changed = true;
                    newly_added = true;
                }
                None => return Ok(()),
            },
        }
    }
    let fm = props.get_mut(key).unwrap();
    let Some(fm_obj) = fm.as_object_mut() else { return Ok(()) };
    let ty = fm_obj.get("type").and_then(|t| t.as_str()).unwrap_or("object").to_owned();
    match ty.as_str() {
        "dense_vector" => check_dense_vector(ctx, fm_obj, &path, key, value),
        "object" | "nested" => {
            if fm_obj.get("enabled") == Some(&Value::Bool(false)) {
                return Ok(());
            }
            let child_dynamic = parse_dynamic(fm_obj.get("dynamic"), dynamic);
            let concrete = || {
                json!({
                    "type": "document_parsing_exception",
                    "reason": format!("[1:{}] object mapping for [{path}] tried to parse field [{key}] as object, but found a concrete value", ctx.col(key))
                })
            };
            let objs: Vec<&Map<String, Value>> = match value {
                Value::Object(o) => vec![o],
                Value::Array(a) => {
                    let mut v = Vec::new();
                    for e in a {
                        match e {
                            Value::Object(o) => v.push(o),
                            Value::Null => {}
                            _ => return Err(concrete()),
                        }
                    }
                    v
                }
                _ => return Err(concrete()),
            };
            for o in objs {
                if o.is_empty() {
                    continue;
                }
                let children = fm_obj.entry("properties").or_insert_with(|| json!({}));
                if !children.is_object() {
                    *children = json!({});
                }
                walk_object(ctx, children.as_object_mut().unwrap(), child_dynamic, o, &path, &path)?;
            }
            if newly_added && fm_obj.get("properties").and_then(|p| p.as_object()).is_none_or(|p| p.is_empty()) {
                *fm_obj = json!({"type": "object"}).as_object().unwrap().clone();
            }
            Ok(())
        }
        other => check_concrete(ctx, other, fm_obj, &path, key, value),
    }
}

fn infer_mapping(v: &Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Bool(_) => Some(json!({"type": "boolean"})),
        Value::Number(n) => {
            Some(if n.is_i64() || n.is_u64() { json!({"type": "long"}) } else { json!({"type": "float"}) })
        }
        Value::String(s) => Some(if looks_like_date(s) {
            json!({"type": "date"})
        } else {
            json!({"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}})
        }),
        Value::Object(_) => Some(json!({"properties": {}})),
        Value::Array(a) => {
            // 8.11+: a float array of 128..=4096 numbers is mapped as a dense_vector.
            let first_is_float = a.first().is_some_and(|f| f.is_f64());
            if first_is_float && (128..=MAX_DIMS).contains(&a.len()) && a.iter().all(Value::is_number) {
                Some(json!({
                    "type": "dense_vector", "dims": a.len(), "index": true, "similarity": "cosine",
                    "index_options": default_index_options("float")
                }))
            } else {
                a.iter().find(|x| !x.is_null()).and_then(infer_mapping)
            }
        }
    }
}

fn looks_like_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 10 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    if !(digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10)) {
        return false;
    }
    let month = (b[5] - b'0') * 10 + (b[6] - b'0');
    let day = (b[8] - b'0') * 10 + (b[9] - b'0');
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    if b.len() == 10 {
        return true;
    }
    b[10] == b'T'
        && b.len() >= 13
        && digits(11..13)
        && b[13..].iter().all(|c| c.is_ascii_digit() || b":.+-Z".contains(c))
}

fn check_concrete(
    ctx: &MapCtx,
    ty: &str,
    fm: &Map<String, Value>,
    path: &str,
    key: &str,
    value: &Value,
) -> Result<(), Value> {
    if fm.get("ignore_malformed") == Some(&Value::Bool(true)) {
        return Ok(());
    }
    let accepts_objects = matches!(
        ty,
        "flattened"
            | "geo_point"
            | "geo_shape"
            | "shape"
            | "point"
            | "join"
            | "percolator"
            | "histogram"
            | "aggregate_metric_double"
            | "rank_features"
            | "sparse_vector"
            | "semantic_text"
            | "completion"
            | "integer_range"
            | "float_range"
            | "long_range"
            | "double_range"
            | "date_range"
            | "ip_range"
    );
    if accepts_objects {
        return Ok(());
    }
    fn flatten<'v>(v: &'v Value, out: &mut Vec<&'v Value>) {
        match v {
            Value::Array(a) => a.iter().for_each(|e| flatten(e, out)),
            other => out.push(other),
        }
    }
    let mut values = Vec::new();
    flatten(value, &mut values);
    let col = ctx.col(key);
    for v in values {
        if v.is_null() {
            continue;
        }
        if let Value::Object(_) = v {
            return Err(field_parse_error(
                ctx,
                col,
                path,
                ty,
                v,
                "illegal_state_exception",
                format!("Can't get text on a START_OBJECT at 1:{col}"),
            ));
        }
        let bad: Option<(&str, String)> = match ty {
            "long" | "integer" | "short" | "byte" | "unsigned_long" | "double" | "float" | "half_float"
            | "scaled_float" | "rank_feature" | "token_count" => {
                let n = match v {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                match n {
                    None => Some((
                        if v.is_string() { "number_format_exception" } else { "illegal_argument_exception" },
                        match v {
                            Value::String(s) => format!("For input string: \"{s}\""),
                            other => format!(
                                "Current token ({}) not numeric, can not use numeric value accessors",
                                token_name(other)
                            ),
                        },
                    )),
                    Some(f) => {
                        let range = match ty {
                            "long" => Some((i64::MIN as f64, i64::MAX as f64)),
                            "integer" => Some((i32::MIN as f64, i32::MAX as f64)),
                            "short" => Some((i16::MIN as f64, i16::MAX as f64)),
                            "byte" => Some((i8::MIN as f64, i8::MAX as f64)),
                            "unsigned_long" => Some((0.0, u64::MAX as f64)),
                            "float" | "half_float" => Some((f32::MIN as f64, f32::MAX as f64)),
                            _ => None,
                        };
                        match range {
                            Some((lo, hi)) if !(lo..=hi).contains(&f) || !f.is_finite() => Some((
                                "illegal_argument_exception",
                                format!("Value [{}] is out of range for a {ty}", preview(v)),
                            )),
                            _ => None,
                        }
                    }
                }
            }
            "boolean" => match v {
                Value::Bool(_) => None,
                Value::String(s) if s == "true" || s == "false" || s.is_empty() => None,
                other => Some((
                    "illegal_argument_exception",
                    format!("Failed to parse value [{}] as only [true] or [false] are allowed.", preview(other)),
                )),
            },
            "date" | "date_nanos" => match v {
                Value::Number(_) => None,
                Value::String(_) if fm.contains_key("format") => None,
                Value::String(s) if looks_like_date(s) || s.parse::<i64>().is_ok() => None,
                other => Some((
                    "illegal_argument_exception",
                    format!(
                        "failed to parse date field [{}] with format [strict_date_optional_time||epoch_millis]",
                        preview(other)
                    ),
                )),
            },
            _ => None,
        };
        if let Some((ctype, cause)) = bad {
            return Err(field_parse_error(ctx, col, path, ty, v, ctype, cause));
        }
    }
    Ok(())
}

fn vector_preview(v: &[f32]) -> String {
    let mut parts: Vec<String> = v.iter().take(5).map(|f| format!("{f:?}")).collect();
    if v.len() > 5 {
        parts.push("...".into());
    }
    format!("[{}]", parts.join(", "))
}

/// A `dense_vector` value: exactly `dims` finite numbers (bytes for `byte`/`bit`), and a
/// non-zero (cosine) or unit-length (dot_product, float) vector. Sets `dims` from the first
/// document when the mapping has none (8.11+).
fn check_dense_vector(
    ctx: &mut MapCtx,
    fm: &mut Map<String, Value>,
    path: &str,
    key: &str,
    value: &Value,
) -> Result<(), Value> {
    let col = ctx.col(key);
    let element = fm.get("element_type").and_then(|e| e.as_str()).unwrap_or("float").to_owned();
    let dims = fm.get("dims").and_then(|d| d.as_u64()).map(|d| d as usize);
    let indexed = fm.get("index") != Some(&Value::Bool(false));
    let similarity: Option<String> = if indexed {
        Some(
            fm.get("similarity")
                .and_then(|s| s.as_str())
                .unwrap_or(if element == "bit" { "l2_norm" } else { "cosine" })
                .to_owned(),
        )
    } else {
        None
    };
    let doc = format!("document with id '{}'", ctx.id);
    let Value::Array(arr) = value else {
        return Err(field_parse_error(
            ctx,
            col,
            path,
            "dense_vector",
            value,
            "parsing_exception",
            format!("Failed to parse object: expecting token of type [START_ARRAY] but found [{}]", token_name(value)),
        ));
    };
    let per_element = if element == "bit" { 8 } else { 1 };
    let expected_len = dims.map(|d| d / per_element);
    let mut floats: Vec<f32> = Vec::with_capacity(arr.len());
    for (i, el) in arr.iter().enumerate() {
        if let (Some(exp), Some(d)) = (expected_len, dims) {
            if i >= exp {
                return Err(doc_parse_error(
                    col,
                    format!("The [dense_vector] field [{path}] in doc [{doc}] has more dimensions than defined in the mapping [{d}]"),
                ));
            }
        }
        let Some(n) = el.as_f64().filter(|_| el.is_number()) else {
            return Err(field_parse_error(
                ctx,
                col,
                path,
                "dense_vector",
                value,
                "parsing_exception",
                format!(
                    "Failed to parse object: expecting token of type [VALUE_NUMBER] but found [{}]",
                    token_name(el)
                ),
            ));
        };
        if element == "float" {
            let f = n as f32;
            if !f.is_finite() {
                return Err(doc_parse_error(
                    col,
                    format!("[dense_vector] field [{path}] vectors must contain only finite values, found [{n}] at dim [{i}]"),
                ));
            }
            floats.push(f);
        } else {
            if n.fract() != 0.0 {
                return Err(doc_parse_error(
                    col,
                    format!("element_type [{element}] vectors only support non-decimal values but found decimal value [{n}] at dim [{i}];"),
                ));
            }
            if !(-128.0..=127.0).contains(&n) {
                return Err(doc_parse_error(
                    col,
                    format!("element_type [{element}] vectors only support integers between [-128, 127] but found [{n}] at dim [{i}];"),
                ));
            }
            floats.push(n as f32);
        }
    }
    match (expected_len, dims) {
        (Some(exp), Some(d)) if arr.len() != exp => {
            return Err(doc_parse_error(
                col,
                format!(
                    "The [dense_vector] field [{path}] in doc [{doc}] has a different number of dimensions [{}] than defined in the mapping [{d}]",
                    arr.len() * per_element
                ),
            ));
        }
        (None, _) | (_, None) => {
            let new_dims = arr.len() * per_element;
            let max = MAX_DIMS * per_element;
            if new_dims == 0 || new_dims > max {
                return Err(doc_parse_error(
                    col,
                    format!("The number of dimensions should be in the range [1, {max}] but was [{new_dims}]"),
                ));
            }
            fm.insert("dims".into(), json!(new_dims));
            ctx.changed = true;
        }
        _ => {}
    }
    match similarity.as_deref() {
        Some("cosine") if floats.iter().all(|f| *f == 0.0) => {
            return Err(doc_parse_error(
                col,
                format!("The [cosine] similarity does not support vectors with zero magnitude. Preview of invalid vector: {}", vector_preview(&floats)),
            ));
        }
        Some("dot_product") if element == "float" => {
            let sq: f64 = floats.iter().map(|f| (*f as f64) * (*f as f64)).sum();
            if (sq - 1.0).abs() > 1e-4 {
                return Err(doc_parse_error(
                    col,
                    format!(
                        "The [dot_product] similarity can only be used with unit-length vectors. Preview of invalid vector: {}",
                        vector_preview(&floats)
                    ),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}
