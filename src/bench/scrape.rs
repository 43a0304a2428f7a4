//! Reading embedjoin's Prometheus exposition (`GET /metrics`, or [`Metrics::render`] in
//! process) into the few totals the benchmark reports.
//!
//! The in-process bench reads the same text as the `--http` one, so both count alike and
//! labelled families (bulk requests by status, completions by path) sum without the bench
//! knowing every label.
//!
//! [`Metrics::render`]: crate::metrics::Metrics::render

use super::report::Counts;

/// What the bench needs from one scrape of `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub parts_received: f64,
    pub documents_indexed: f64,
    pub dead_letters: f64,
    pub completed_in_memory: f64,
    pub completed_in_store: f64,
    pub store_merges: f64,
    pub store_merge_bytes: f64,
    pub bulk_requests: f64,
    pub bulk_bytes: f64,
    /// `part_to_indexed_seconds` buckets: (upper bound, cumulative count), by bound.
    pub latency_buckets: Vec<(f64, u64)>,
}

impl Scrape {
    /// The run's counts from this scrape (a whole run's totals, or a `since` difference),
    /// plus what only the caller knows.
    pub fn counts(&self, parts_sent: u64, parts_accepted: u64, vector_bytes: u64, json_bytes: Option<u64>) -> Counts {
        Counts {
            parts_sent,
            parts_accepted,
            documents_indexed: self.documents_indexed as u64,
            dead_letters: self.dead_letters as u64,
            completed_in_memory: self.completed_in_memory as u64,
            completed_in_store: self.completed_in_store as u64,
            redis_merges: self.store_merges as u64,
            redis_merge_bytes: self.store_merge_bytes as u64,
            bulk_requests: self.bulk_requests as u64,
            bulk_bytes: self.bulk_bytes as u64,
            vector_bytes,
            json_bytes,
        }
    }

    /// Reads the Prometheus / OpenMetrics text. A metric is found by the end of its name
    /// (`documents_indexed_total` matches `embedjoin_documents_indexed_total`), so the
    /// registry's prefix is read from the text rather than assumed; labelled series sum.
    pub fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some((series, value)) => (series.trim(), value),
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let is = |metric: &str| name == metric || name.strip_suffix(metric).is_some_and(|head| head.ends_with('_'));
            let label = |key: &str| {
                labels.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k.trim() == key).then(|| v.trim().trim_matches('"'))
                })
            };
            if is("parts_received_total") {
                s.parts_received += value;
            } else if is("documents_indexed_total") {
                s.documents_indexed += value;
            } else if is("dead_letters_total") {
                s.dead_letters += value;
            } else if is("documents_completed_total") {
                match label("path").map(str::to_ascii_lowercase).as_deref() {
                    Some("memory") => s.completed_in_memory += value,
                    Some("store") => s.completed_in_store += value,
                    _ => {}
                }
            } else if is("store_merges_total") {
                s.store_merges += value;
            } else if is("store_merge_bytes_total") {
                s.store_merge_bytes += value;
            } else if is("bulk_requests_total") {
                s.bulk_requests += value;
            } else if is("bulk_bytes_total") {
                s.bulk_bytes += value;
            } else if is("part_to_indexed_seconds_bucket") {
                let le = match label("le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::NAN),
                    None => f64::NAN,
                };
                if !le.is_nan() {
                    s.latency_buckets.push((le, value as u64));
                }
            }
        }
        s.latency_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        s
    }

    /// Documents that reached an end: acknowledged or dead-lettered.
    pub fn done(&self) -> f64 {
        self.documents_indexed + self.dead_letters
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Scrape) -> Scrape {
        let d = |a: f64, b: f64| (a - b).max(0.0);
        let latency_buckets = self
            .latency_buckets
            .iter()
            .map(|&(le, n)| {
                let was = before.latency_buckets.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
                (le, n.saturating_sub(was))
            })
            .collect();
        Scrape {
            parts_received: d(self.parts_received, before.parts_received),
            documents_indexed: d(self.documents_indexed, before.documents_indexed),
            dead_letters: d(self.dead_letters, before.dead_letters),
            completed_in_memory: d(self.completed_in_memory, before.completed_in_memory),
            completed_in_store: d(self.completed_in_store, before.completed_in_store),
            store_merges: d(self.store_merges, before.store_merges),
            store_merge_bytes: d(self.store_merge_bytes, before.store_merge_bytes),
            bulk_requests: d(self.bulk_requests, before.bulk_requests),
            bulk_bytes: d(self.bulk_bytes, before.bulk_bytes),
            latency_buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP embedjoin_documents_indexed Documents the sink acknowledged.
# TYPE embedjoin_documents_indexed counter
embedjoin_documents_indexed_total 120
embedjoin_dead_letters_total 3
embedjoin_documents_completed_total{path="Memory"} 100
embedjoin_documents_completed_total{path="Store"} 23
embedjoin_bulk_requests_total{status="200"} 4
embedjoin_bulk_requests_total{status="429"} 1
embedjoin_store_merges_total 46
embedjoin_part_to_indexed_seconds_sum 1.5
embedjoin_part_to_indexed_seconds_count 120
embedjoin_part_to_indexed_seconds_bucket{le="0.001"} 20
embedjoin_part_to_indexed_seconds_bucket{le="+Inf"} 120
embedjoin_part_to_indexed_seconds_bucket{le="0.0005"} 10
# EOF
"#;

    #[test]
    fn a_scrape_reads_counters_by_the_end_of_their_names() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.documents_indexed, 120.0);
        assert_eq!(s.dead_letters, 3.0);
        assert_eq!(s.done(), 123.0);
        assert_eq!(s.completed_in_memory, 100.0);
        assert_eq!(s.completed_in_store, 23.0);
        assert_eq!(s.bulk_requests, 5.0);
        assert_eq!(s.store_merges, 46.0);
        assert_eq!(s.latency_buckets, vec![(0.0005, 10), (0.001, 20), (f64::INFINITY, 120)]);
        // Another prefix is found too; a name that merely ends alike is not.
        let other = Scrape::parse("svc_documents_indexed_total 7\nxdocuments_indexed_total 9\n");
        assert_eq!(other.documents_indexed, 7.0);
    }

    #[test]
    fn figures_are_differences_between_two_scrapes() {
        let before = Scrape::parse(TEXT);
        let after = Scrape::parse(&TEXT.replace(" 120\n", " 150\n"));
        let d = after.since(&before);
        assert_eq!(d.documents_indexed, 30.0);
        assert_eq!(d.dead_letters, 0.0);
        assert_eq!(d.latency_buckets.last(), Some(&(f64::INFINITY, 30)));
    }
}
