//! Paced load (`--rate N`): batches offered on a fixed schedule, open loop (a batch is sent
//! when it is due, whether or not earlier ones were answered), and the latency of each part
//! to its document's acknowledgement.
//!
//! Latency is measured from a part's *scheduled* send time, so a generator or pipeline that
//! falls behind shows up as latency instead of hiding it (no coordinated omission). In
//! process, the bench sees each bulk body the sink acknowledges ([`IndexLog::observer`]) and
//! notes when each item was indexed; a part's latency is then the first indexing of its
//! item at or after the part was due. Over `--http` the bench cannot see the server's sink,
//! so only the server's own histogram is reported.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::sink::BodyObserver;

/// When each batch is due, from the start of the run: `rate` parts per second, each batch
/// due when the parts before it have been offered.
pub fn schedule(batch_sizes: impl IntoIterator<Item = usize>, rate: f64) -> Vec<Duration> {
    let mut before = 0usize;
    batch_sizes
        .into_iter()
        .map(|n| {
            let due = Duration::from_secs_f64(before as f64 / rate);
            before += n;
            due
        })
        .collect()
}

/// The `_id`s of the operations in a `_bulk` body, as the sink encoder writes them: on each
/// action line `{"index":{"_id":"..."` (or `create`, `update`), the source line after it.
pub fn bulk_ids(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    const ACTIONS: [&[u8]; 3] = [b"{\"index\":{\"_id\":\"", b"{\"create\":{\"_id\":\"", b"{\"update\":{\"_id\":\""];
    let mut rest = body;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let action_end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let action = &rest[..action_end];
        let after = &rest[(action_end + 1).min(rest.len())..];
        // The source line follows its action line.
        let source_end = memchr::memchr(b'\n', after).map_or(after.len(), |i| i + 1);
        rest = &after[source_end..];
        if let Some(id) = ACTIONS.iter().find_map(|a| action.strip_prefix(*a)) {
            if let Some(end) = memchr::memchr(b'"', id) {
                return Some(&id[..end]);
            }
        }
    })
}

/// When each item of a run was indexed: item `n` has the id `{prefix}{n}`.
#[derive(Clone)]
pub struct IndexLog {
    prefix: Arc<str>,
    /// Per item, every acknowledgement of its document (more than one with duplicates).
    at: Arc<Mutex<Vec<Vec<Instant>>>>,
}

impl IndexLog {
    pub fn new(prefix: &str, entities: usize) -> IndexLog {
        IndexLog { prefix: prefix.into(), at: Arc::new(Mutex::new(vec![Vec::new(); entities])) }
    }

    /// Notes every document of `body` as indexed at `now`.
    pub fn record(&self, body: &[u8], now: Instant) {
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        for id in bulk_ids(body) {
            let item = id.strip_prefix(self.prefix.as_bytes()).and_then(|n| std::str::from_utf8(n).ok());
            if let Some(slot) = item.and_then(|n| n.parse::<usize>().ok()).and_then(|n| at.get_mut(n)) {
                slot.push(now);
            }
        }
    }

    /// For the sink: records each body it acknowledges, at that moment.
    pub fn observer(&self) -> BodyObserver {
        let log = self.clone();
        Arc::new(move |body: &Bytes| log.record(body, Instant::now()))
    }

    /// Latency of each part, from when it was due to the first indexing of its item at or
    /// after that, in microseconds; and the parts whose item was not indexed after them.
    pub fn part_latencies(&self, parts: &[(u32, Instant)]) -> (Histogram<u64>, u64) {
        let at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        let mut never = 0;
        for &(item, due) in parts {
            let indexed = at.get(item as usize).and_then(|times| times.iter().filter(|t| **t >= due).min());
            match indexed {
                Some(t) => {
                    let _ = h.record((t.duration_since(due).as_micros() as u64).max(1));
                }
                None => never += 1,
            }
        }
        (h, never)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_due_when_the_parts_before_them_are_offered() {
        let due = schedule([100, 100, 50, 100], 1000.0);
        let ms: Vec<u128> = due.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 100, 200, 250]);
    }

    #[test]
    fn ids_are_read_from_action_lines_only() {
        let body = b"{\"index\":{\"_id\":\"b-1\",\"version\":3,\"version_type\":\"external_gte\"}}\n\
            {\"id\":\"b-1\",\"v\":[1.0]}\n\
            {\"index\":{\"_id\":\"b-22\",\"version\":1}}\n\
            {\"index\":{\"_id\":\"not-an-action\"}}\n\
            {\"create\":{\"_id\":\"b-3\"}}\n{\"id\":\"b-3\"}\n\
            {\"update\":{\"_id\":\"b-4\"}}\n{\"script\":{}}\n\
            {\"delete\":{\"_id\":\"b-5\"}}\n{}\n";
        let ids: Vec<&[u8]> = bulk_ids(body).collect();
        assert_eq!(ids, [&b"b-1"[..], b"b-22", b"b-3", b"b-4"]);
        assert_eq!(bulk_ids(b"").count(), 0);
    }

    #[test]
    fn a_part_waits_for_the_first_indexing_after_it_was_due() {
        let log = IndexLog::new("b-", 3);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        log.record(b"{\"index\":{\"_id\":\"b-0\"}}\n{}\n{\"index\":{\"_id\":\"b-1\"}}\n{}\n", at(50));
        log.record(b"{\"index\":{\"_id\":\"b-0\"}}\n{}\n{\"index\":{\"_id\":\"other-1\"}}\n{}\n", at(500));
        // Item 0: parts due at 0 and 20 ms (indexed at 50), a copy due at 100 (indexed at
        // 500); item 1's part at 10; item 2 never indexed.
        let parts = [(0, at(0)), (0, at(20)), (1, at(10)), (0, at(100)), (2, at(5))];
        let (h, never) = log.part_latencies(&parts);
        assert_eq!((h.len(), never), (4, 1));
        assert!(h.equivalent(h.min(), 30_000) && h.equivalent(h.max(), 400_000));
        assert!(h.equivalent(h.value_at_quantile(0.5), 40_000), "{}", h.value_at_quantile(0.5));
    }
}
