//! Every metric embedjoin exports, defined in this one place: names, help texts, labels.
//!
//! One [`Metrics`] per running pipeline (not a global), so that two instances in one
//! process (tests, benchmarks) keep separate counts. Labels are few and bounded: a
//! rejection code, a completion path, an HTTP status. `GET /metrics` renders them in the
//! Prometheus text format; the benchmark reads them directly.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Where an item became complete.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CompletedIn {
    /// Every part met in one shard's memory: no store round trip.
    Memory,
    /// The store's merge found every part.
    Store,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompletedLabels {
    pub path: CompletedIn,
}

/// The end a completed document reached (see `delivery::End`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub end: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: u16,
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    pub parts_received: Counter,
    pub parts_rejected: Family<ReasonLabels, Counter>,
    pub documents_completed: Family<CompletedLabels, Counter>,
    pub document_updates: Counter,
    pub documents_indexed: Counter,
    pub documents_ended: Family<EndLabels, Counter>,
    pub outbox_in_flight: Gauge,
    pub sink_concurrency_limit: Gauge,
    pub sink_stalled: Gauge,
    pub dead_letters: Counter,
    pub orphans_expired: Counter,
    pub outbox_resent: Counter,
    pub state_resets: Counter,
    pub overloaded: Counter,
    pub store_flushes: Counter,
    pub store_merges: Counter,
    pub store_confirms: Counter,
    pub store_merge_bytes: Counter,
    pub store_flush_failures: Counter,
    pub store_flush_seconds: Histogram,
    pub partials_resident: Gauge,
    pub shard_mailbox_depth: Family<ShardLabels, Gauge>,
    pub writer_queue_depth: Gauge,
    pub partial_bytes_resident: Gauge,
    /// Bytes of complete documents between a shard and the end of their delivery.
    pub document_bytes_resident: Gauge,
    /// Bytes of request bodies ingress holds while reading and parsing them.
    pub request_bytes_resident: Gauge,
    /// Dead letters the state store dropped, oldest first, because it held `durability.dead_letter_max`.
    pub dead_letters_dropped: Counter,
    pub bulk_requests: Family<StatusLabels, Counter>,
    pub bulk_request_failures: Counter,
    pub bulk_items: Family<StatusLabels, Counter>,
    pub bulk_bytes: Counter,
    pub bulk_retries: Counter,
    pub bulk_seconds: Histogram,
    pub part_to_indexed_seconds: Histogram,
    /// Part-to-indexed latency in microseconds, exact enough for percentiles (the
    /// benchmark reads it; Prometheus gets the histogram above).
    pub part_to_indexed_us: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let latency_buckets = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let mut m = Metrics {
            registry: Registry::with_prefix("embedjoin"),
            parts_received: Counter::default(),
            parts_rejected: Family::default(),
            documents_completed: Family::default(),
            document_updates: Counter::default(),
            documents_indexed: Counter::default(),
            documents_ended: Family::default(),
            outbox_in_flight: Gauge::default(),
            sink_concurrency_limit: Gauge::default(),
            sink_stalled: Gauge::default(),
            dead_letters: Counter::default(),
            orphans_expired: Counter::default(),
            outbox_resent: Counter::default(),
            state_resets: Counter::default(),
            overloaded: Counter::default(),
            store_flushes: Counter::default(),
            store_merges: Counter::default(),
            store_confirms: Counter::default(),
            store_merge_bytes: Counter::default(),
            store_flush_failures: Counter::default(),
            store_flush_seconds: latency_buckets(),
            partials_resident: Gauge::default(),
            shard_mailbox_depth: Family::default(),
            writer_queue_depth: Gauge::default(),
            partial_bytes_resident: Gauge::default(),
            document_bytes_resident: Gauge::default(),
            request_bytes_resident: Gauge::default(),
            dead_letters_dropped: Counter::default(),
            bulk_requests: Family::default(),
            bulk_request_failures: Counter::default(),
            bulk_items: Family::default(),
            bulk_bytes: Counter::default(),
            bulk_retries: Counter::default(),
            bulk_seconds: latency_buckets(),
            part_to_indexed_seconds: latency_buckets(),
            part_to_indexed_us: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            ),
        };
        let r = &mut m.registry;
        r.register("parts_received", "Parts taken by ingress", m.parts_received.clone());
        r.register("parts_rejected", "Items refused by ingress, by reason", m.parts_rejected.clone());
        r.register("documents_completed", "Items that became complete, by where", m.documents_completed.clone());
        r.register(
            "document_updates",
            "Newer copies of parts for completed items, sent to update their documents (state.late_parts)",
            m.document_updates.clone(),
        );
        r.register("documents_indexed", "Documents the sink acknowledged", m.documents_indexed.clone());
        r.register(
            "documents_ended",
            "Completed documents and updates by the end they reached: indexed, updated, superseded, dead_lettered, parked",
            m.documents_ended.clone(),
        );
        r.register(
            "outbox_in_flight",
            "Outbox entries this instance is delivering under a lease",
            m.outbox_in_flight.clone(),
        );
        r.register(
            "sink_concurrency_limit",
            "Bulk requests allowed in flight now (adaptive: falls on backpressure, rises while the cluster keeps up)",
            m.sink_concurrency_limit.clone(),
        );
        r.register(
            "sink_stalled",
            "1 while the cluster refuses embedjoin (401/403, a missing index): delivery waits, nothing is dropped",
            m.sink_stalled.clone(),
        );
        r.register("dead_letters", "Documents the sink refused for good", m.dead_letters.clone());
        r.register("shard_mailbox_depth", "Messages waiting in a shard's mailbox", m.shard_mailbox_depth.clone());
        r.register(
            "writer_queue_depth",
            "Documents waiting in the bulk writer, not yet in a request",
            m.writer_queue_depth.clone(),
        );
        r.register("store_confirms", "Outbox confirmations sent to the state store", m.store_confirms.clone());
        r.register("orphans_expired", "Partial items that did not complete within the TTL", m.orphans_expired.clone());
        r.register("outbox_resent", "Completed documents resent from the outbox", m.outbox_resent.clone());
        r.register("state_resets", "Times the state store was found to have lost its data", m.state_resets.clone());
        r.register("overloaded", "Requests refused with 503 because the pipeline was saturated", m.overloaded.clone());
        r.register("store_flushes", "Flushes of dirty partials to the state store", m.store_flushes.clone());
        r.register("store_merges", "Per-item merge calls sent to the state store", m.store_merges.clone());
        r.register("store_merge_bytes", "Vector bytes sent to the state store", m.store_merge_bytes.clone());
        r.register("store_flush_failures", "Flushes that failed in whole or part", m.store_flush_failures.clone());
        r.register("store_flush_seconds", "Duration of a flush", m.store_flush_seconds.clone());
        r.register("partials_resident", "Partial items held in memory", m.partials_resident.clone());
        r.register(
            "document_bytes_resident",
            "Bytes of complete documents queued for or in delivery (counted against shards.max_resident_bytes)",
            m.document_bytes_resident.clone(),
        );
        r.register(
            "partial_bytes_resident",
            "Vector bytes of partials held in memory",
            m.partial_bytes_resident.clone(),
        );
        r.register(
            "request_bytes_resident",
            "Bytes of request bodies held while they are read and parsed",
            m.request_bytes_resident.clone(),
        );
        r.register(
            "dead_letters_dropped",
            "Oldest dead letters dropped because the store held durability.dead_letter_max",
            m.dead_letters_dropped.clone(),
        );
        r.register("bulk_requests", "Bulk requests answered, by HTTP status", m.bulk_requests.clone());
        r.register("bulk_request_failures", "Bulk requests with no answer", m.bulk_request_failures.clone());
        r.register("bulk_items", "Bulk item results, by status", m.bulk_items.clone());
        r.register("bulk_bytes", "Bulk request body bytes sent", m.bulk_bytes.clone());
        r.register("bulk_retries", "Documents sent again after a retryable failure", m.bulk_retries.clone());
        r.register("bulk_seconds", "Duration of a bulk request", m.bulk_seconds.clone());
        r.register(
            "part_to_indexed_seconds",
            "From a part's arrival to its document's acknowledgement",
            m.part_to_indexed_seconds.clone(),
        );
        m
    }

    /// Bytes the pipeline holds: partials in the shards and documents on their way to the
    /// sink (request bodies being read are in `request_bytes_resident`); ingress sheds load
    /// above `shards.max_resident_bytes`.
    pub fn resident_bytes(&self) -> usize {
        (self.partial_bytes_resident.get() + self.document_bytes_resident.get()).max(0) as usize
    }

    /// Records the latency of documents the sink just acknowledged.
    pub fn observe_indexed(&self, latencies: impl Iterator<Item = Duration>) {
        let mut hdr = self.part_to_indexed_us.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for latency in latencies {
            self.part_to_indexed_seconds.observe(latency.as_secs_f64());
            let _ = hdr.record((latency.as_micros() as u64).max(1));
            n += 1;
        }
        self.documents_indexed.inc_by(n);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
