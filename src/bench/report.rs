//! What a benchmark run measured, and how it is shown: a table for a person, one JSON line
//! for a script, one row per value for a sweep.
//!
//! Every per-document figure divides by the documents the sink acknowledged, so a run that
//! lost documents cannot look cheaper than it was (and is flagged as incomplete anyway).

use std::fmt::Write as _;

use serde::Serialize;

use super::load::Order;

/// Latency to the sink's acknowledgement of a document: per document from the arrival of
/// the part that completed it (the pipeline's own histogram), or, in paced mode, per part
/// from when it was due ([`Paced::each_part`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// False when read from Prometheus buckets (`--http`): then each figure is interpolated
    /// within a bucket, and `max_ms` is the upper bound of the highest non-empty bucket.
    pub exact: bool,
}

impl Latency {
    /// From the pipeline's microsecond HDR histogram; `None` if nothing was recorded.
    pub fn from_hdr(h: &hdrhistogram::Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Latency {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            exact: true,
        })
    }

    /// From cumulative Prometheus buckets `(le seconds, count)` sorted by `le` (the last one
    /// `+Inf`), as the difference of two scrapes gives them.
    pub fn from_buckets(buckets: &[(f64, u64)]) -> Option<Latency> {
        let total = buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let quantile = |q: f64| {
            let rank = (q * total as f64).ceil().max(1.0) as u64;
            let mut prev = (0.0, 0u64);
            for &(le, count) in buckets {
                if count >= rank {
                    if le.is_infinite() {
                        return prev.0;
                    }
                    let within = (rank - prev.1) as f64 / (count - prev.1).max(1) as f64;
                    return prev.0 + (le - prev.0) * within;
                }
                prev = (le, count);
            }
            prev.0
        };
        let max = buckets
            .iter()
            .zip(std::iter::once(&(0.0, 0)).chain(buckets))
            .filter(|(b, before)| b.1 > before.1)
            .map(|(b, before)| if b.0.is_infinite() { before.0 } else { b.0 })
            .last()
            .unwrap_or(0.0);
        Some(Latency {
            p50_ms: quantile(0.50) * 1000.0,
            p99_ms: quantile(0.99) * 1000.0,
            max_ms: max * 1000.0,
            exact: false,
        })
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `in-process` or `http`.
    pub mode: &'static str,
    pub order: Order,
    pub entities: usize,
    pub dims: Vec<usize>,
    pub batch_size: usize,
    pub concurrency: usize,
    /// Shard actors (in-process only; a server's own config decides in `--http` mode).
    pub shards: Option<usize>,
    /// Parts sent, duplicates included.
    pub parts_sent: u64,
    /// Parts the pipeline took (in `--http` mode, those answered as accepted).
    pub parts_accepted: u64,
    pub documents_indexed: u64,
    pub dead_letters: u64,
    /// `documents_indexed + dead_letters >= entities`.
    pub complete: bool,
    /// From the first part sent to the last document acknowledged (the drain included).
    pub wall_seconds: f64,
    /// From the first part sent to the last one taken by the pipeline.
    pub submit_seconds: f64,
    pub embeddings_per_s: f64,
    pub documents_per_s: f64,
    /// Vector payload sent, as f32: 4 bytes per value.
    pub vector_bytes: u64,
    pub vector_mb_per_s: f64,
    /// Request bodies sent (`--http` only).
    pub json_bytes: Option<u64>,
    pub json_mb_per_s: Option<f64>,
    /// Documents whose parts met in a shard's memory, and those completed by a Redis merge.
    pub completed_in_memory: u64,
    pub completed_in_store: u64,
    pub redis_merges: u64,
    pub redis_merges_per_doc: f64,
    pub redis_merge_bytes_per_doc: f64,
    pub bulk_requests: u64,
    pub bulk_requests_per_doc: f64,
    pub bulk_bytes_per_doc: f64,
    pub latency: Option<Latency>,
    /// VmHWM of this process (in-process only).
    pub peak_rss_bytes: Option<u64>,
    /// Memory of the pre-generated load, which the peak includes (it becomes the parts).
    pub load_bytes: Option<u64>,
    /// CPU per embedding of this process (in-process only) and of Redis (when known).
    pub cpu: Option<super::cpu::CpuCost>,
    /// The offered load and the latency of each part, with `--rate`.
    pub paced: Option<Paced>,
    /// With `--reembed`: documents updated by the measured run, and per second.
    pub updated: Option<u64>,
    pub updated_per_s: Option<f64>,
}

/// What a paced run (`--rate`) offered, and how each part fared.
#[derive(Debug, Clone, Serialize)]
pub struct Paced {
    /// Embeddings per second offered (`--rate`).
    pub offered_per_s: f64,
    /// Embeddings per second actually sent: parts over the time to send them.
    pub sent_per_s: f64,
    /// How late the latest batch left, after the time it was due.
    pub max_behind_ms: f64,
    /// Over parts: from each part's due time to its document's acknowledgement. None over
    /// `--http`, or with a sink other than `null` (the bench cannot see those sinks).
    pub each_part: Option<Latency>,
    /// Parts whose item was not indexed after them (a late copy with no partner).
    pub parts_not_indexed: u64,
}

/// Raw counts a run collects; [`Summary::new`] derives the rates.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub parts_sent: u64,
    pub parts_accepted: u64,
    pub documents_indexed: u64,
    pub dead_letters: u64,
    pub completed_in_memory: u64,
    pub completed_in_store: u64,
    pub redis_merges: u64,
    pub redis_merge_bytes: u64,
    pub bulk_requests: u64,
    pub bulk_bytes: u64,
    pub vector_bytes: u64,
    pub json_bytes: Option<u64>,
}

/// How a run was set up.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub mode: &'static str,
    pub order: Order,
    pub entities: usize,
    pub dims: Vec<usize>,
    pub batch_size: usize,
    pub concurrency: usize,
    pub shards: Option<usize>,
}

impl Summary {
    pub fn new(
        shape: RunShape,
        c: Counts,
        wall_seconds: f64,
        submit_seconds: f64,
        latency: Option<Latency>,
        peak_rss_bytes: Option<u64>,
        load_bytes: Option<u64>,
    ) -> Summary {
        let wall = wall_seconds.max(1e-9);
        let docs = c.documents_indexed.max(1) as f64;
        let mb = |bytes: u64| bytes as f64 / 1e6 / wall;
        Summary {
            mode: shape.mode,
            order: shape.order,
            entities: shape.entities,
            dims: shape.dims,
            batch_size: shape.batch_size,
            concurrency: shape.concurrency,
            shards: shape.shards,
            parts_sent: c.parts_sent,
            parts_accepted: c.parts_accepted,
            documents_indexed: c.documents_indexed,
            dead_letters: c.dead_letters,
            complete: c.documents_indexed + c.dead_letters >= shape.entities as u64,
            wall_seconds,
            submit_seconds,
            embeddings_per_s: c.parts_accepted as f64 / wall,
            documents_per_s: c.documents_indexed as f64 / wall,
            vector_bytes: c.vector_bytes,
            vector_mb_per_s: mb(c.vector_bytes),
            json_bytes: c.json_bytes,
            json_mb_per_s: c.json_bytes.map(mb),
            completed_in_memory: c.completed_in_memory,
            completed_in_store: c.completed_in_store,
            redis_merges: c.redis_merges,
            redis_merges_per_doc: c.redis_merges as f64 / docs,
            redis_merge_bytes_per_doc: c.redis_merge_bytes as f64 / docs,
            bulk_requests: c.bulk_requests,
            bulk_requests_per_doc: c.bulk_requests as f64 / docs,
            bulk_bytes_per_doc: c.bulk_bytes as f64 / docs,
            latency,
            peak_rss_bytes,
            load_bytes,
            cpu: None,
            paced: None,
            updated: None,
            updated_per_s: None,
        }
    }

    /// The loud line printed when documents are missing, if they are.
    pub fn incomplete_warning(&self) -> Option<String> {
        (!self.complete).then(|| {
            format!(
                "WARNING: INCOMPLETE RUN: {} items sent, but only {} documents indexed and {} dead-lettered; {} missing. The figures above undercount the work.",
                self.entities,
                self.documents_indexed,
                self.dead_letters,
                self.entities as u64 - self.documents_indexed - self.dead_letters
            )
        })
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let dims: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        let shards = self.shards.map_or(String::new(), |s| format!(", {s} shards"));
        let _ = writeln!(
            t,
            "embedjoin bench ({}): {} items x {} parts ({} dims), order {}, batches of {}, {} senders{}",
            self.mode,
            grouped(self.entities as f64),
            self.dims.len(),
            dims.join("+"),
            serde_plain(&self.order),
            self.batch_size,
            self.concurrency,
            shards
        );
        let mut row = |name: &str, value: String| {
            let _ = writeln!(t, "  {name:<22}{value}");
        };
        row(
            "wall time",
            format!(
                "{:.3} s (all parts handed in after {:.3} s; the rest is the drain)",
                self.wall_seconds, self.submit_seconds
            ),
        );
        row("embeddings/s", grouped(self.embeddings_per_s));
        row("documents/s", grouped(self.documents_per_s));
        row(
            "vector MB/s",
            format!("{:.1} (f32 payload, 4 bytes x dims per part: {} MB)", self.vector_mb_per_s, mb(self.vector_bytes)),
        );
        if let (Some(rate), Some(bytes)) = (self.json_mb_per_s, self.json_bytes) {
            row("JSON MB/s", format!("{rate:.1} (request bodies: {} MB)", mb(bytes)));
        }
        row(
            "documents",
            format!(
                "{} indexed, {} dead-lettered ({} completed in memory, {} through Redis)",
                self.documents_indexed, self.dead_letters, self.completed_in_memory, self.completed_in_store
            ),
        );
        if let (Some(updated), Some(rate)) = (self.updated, self.updated_per_s) {
            row(
                "updated",
                format!("{updated} documents, {} per second (a re-embedding run: one part type again)", grouped(rate)),
            );
        }
        row(
            "Redis merges/doc",
            format!(
                "{:.3} ({} bytes/doc; {} merges)",
                self.redis_merges_per_doc,
                grouped(self.redis_merge_bytes_per_doc),
                self.redis_merges
            ),
        );
        row(
            "bulk requests/doc",
            format!(
                "{:.4} ({} bytes/doc; {} requests)",
                self.bulk_requests_per_doc,
                grouped(self.bulk_bytes_per_doc),
                self.bulk_requests
            ),
        );
        if let Some(p) = &self.paced {
            row(
                "offered load",
                format!(
                    "{} embeddings/s, open loop; sent at {}/s, at worst {} ms behind schedule",
                    grouped(p.offered_per_s),
                    grouped(p.sent_per_s),
                    ms(p.max_behind_ms)
                ),
            );
        }
        row(
            "last part -> indexed",
            match self.latency {
                Some(l) => format!(
                    "{} (per document, from the arrival of the part that completed it{})",
                    latency(&l),
                    if l.exact { "" } else { "; from the server's histogram buckets" }
                ),
                None => "no document acknowledged".into(),
            },
        );
        if let Some(p) = &self.paced {
            let not_indexed = match p.parts_not_indexed {
                0 => String::new(),
                n => format!("; {n} parts not indexed after they were sent"),
            };
            row(
                "each part -> indexed",
                match &p.each_part {
                    Some(l) => format!(
                        "{} (over parts, from when each was due to its document indexed; includes waiting for the item's other parts{not_indexed})",
                        latency(l)
                    ),
                    None => "not seen from here (in process with --sink null only)".into(),
                },
            );
        }
        if let Some(cpu) = &self.cpu {
            let mut figures = Vec::new();
            if let Some(us) = cpu.service_us_per_embedding {
                let who = if self.mode == "http" { "the server" } else { "this process" };
                figures.push(format!("{who} {us:.1} µs"));
            }
            if let Some(us) = cpu.redis_us_per_embedding {
                figures.push(format!("Redis {us:.1} µs"));
            }
            if !figures.is_empty() {
                row("CPU/embedding", figures.join("; "));
            }
            if let (Some(commands), Some(bytes)) = (cpu.redis_commands_per_embedding, cpu.redis_bytes_per_embedding) {
                row("Redis/embedding", format!("{commands:.2} commands, {} bytes in and out", grouped(bytes)));
            }
            for (i, m) in cpu.redis_masters.iter().flatten().enumerate() {
                row(
                    if i == 0 { "Redis per master" } else { "" },
                    format!(
                        "{}: {:.1}% of the commands, CPU {:.1} µs/embedding",
                        m.address, m.command_share_percent, m.redis_us_per_embedding
                    ),
                );
            }
            if let (Some(records), Some(bytes)) = (cpu.redis_records, cpu.redis_bytes_per_record) {
                row(
                    "Redis/record",
                    format!(
                        "{bytes:.0} bytes per remembered item ({} records; used_memory growth over the run)",
                        grouped(records as f64)
                    ),
                );
            }
        }
        row(
            "peak RSS",
            match (self.peak_rss_bytes, self.load_bytes) {
                (Some(peak), Some(load)) => {
                    format!("{} MB (VmHWM; includes {} MB of pre-generated load)", mb(peak), mb(load))
                }
                (Some(peak), None) => format!("{} MB (VmHWM)", mb(peak)),
                _ => "n/a (the server's memory is not visible from here)".into(),
            },
        );
        t
    }

    /// One JSON object on one line.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("a summary serialises")
    }
}

/// The header of a sweep table over `key`.
pub fn sweep_header(key: &str) -> String {
    format!(
        "{key:>18} {:>10} {:>9} {:>11} {:>12} {:>9} {:>9} {:>11} {:>8}",
        "emb/s", "docs/s", "merges/doc", "bulk req/doc", "p50 ms", "p99 ms", "peak RSS MB", "wall s"
    )
}

/// One row of a sweep table.
pub fn sweep_row(value: &str, s: &Summary) -> String {
    let (p50, p99) = s.latency.map_or(("-".into(), "-".into()), |l| (ms(l.p50_ms), ms(l.p99_ms)));
    let flag = if s.complete { "" } else { "  INCOMPLETE" };
    format!(
        "{value:>18} {:>10} {:>9} {:>11.3} {:>12.4} {p50:>9} {p99:>9} {:>11} {:>8.3}{flag}",
        grouped(s.embeddings_per_s),
        grouped(s.documents_per_s),
        s.redis_merges_per_doc,
        s.bulk_requests_per_doc,
        s.peak_rss_bytes.map_or("-".into(), mb),
        s.wall_seconds,
    )
}

/// A whole number with thousands separators: 12345.6 -> "12,346".
pub fn grouped(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// p50, p99 and max; the max of bucketed figures is an upper bound.
fn latency(l: &Latency) -> String {
    format!(
        "p50 {} ms, p99 {} ms, max {}{} ms",
        ms(l.p50_ms),
        ms(l.p99_ms),
        if l.exact { "" } else { "<= " },
        ms(l.max_ms)
    )
}

/// Milliseconds with precision where it matters: 0.123, 4.56, 78.9, 1234.
fn ms(x: f64) -> String {
    if x < 1.0 {
        format!("{x:.3}")
    } else if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// Bytes as decimal megabytes with one decimal.
fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// A unit enum as its serde name.
fn serde_plain<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(indexed: u64) -> Summary {
        Summary::new(
            RunShape {
                mode: "in-process",
                order: Order::Split,
                entities: 1000,
                dims: vec![384, 512],
                batch_size: 100,
                concurrency: 8,
                shards: Some(2),
            },
            Counts {
                parts_sent: 2000,
                parts_accepted: 2000,
                documents_indexed: indexed,
                redis_merges: 2 * indexed,
                redis_merge_bytes: 3584 * indexed,
                bulk_requests: 2,
                bulk_bytes: 8000 * indexed,
                vector_bytes: 3_584_000,
                ..Counts::default()
            },
            0.5,
            0.4,
            None,
            Some(50_000_000),
            Some(4_000_000),
        )
    }

    #[test]
    fn percentiles_come_from_the_hdr_histogram() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 100).unwrap(); // 0.1 ms .. 100 ms
        }
        let l = Latency::from_hdr(&h).unwrap();
        assert!((l.p50_ms - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p99_ms - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.1, "{l:?}");
        assert!(l.exact);
        h.reset();
        assert_eq!(Latency::from_hdr(&h), None);
    }

    #[test]
    fn percentiles_interpolate_within_prometheus_buckets() {
        // 100 observations: 50 under 1 ms, 40 in 1-2 ms, 10 in 2-4 ms.
        let buckets = [(0.001, 50), (0.002, 90), (0.004, 100), (0.008, 100), (f64::INFINITY, 100)];
        let l = Latency::from_buckets(&buckets).unwrap();
        assert!((l.p50_ms - 1.0).abs() < 1e-9, "{l:?}");
        assert!((l.p99_ms - 3.8).abs() < 1e-9, "{l:?}");
        assert!((l.max_ms - 4.0).abs() < 1e-9, "{l:?}");
        assert!(!l.exact);
        assert_eq!(Latency::from_buckets(&[(f64::INFINITY, 0)]), None);
    }

    #[test]
    fn rates_and_per_document_figures_derive_from_counts() {
        let s = summary(1000);
        assert_eq!(s.embeddings_per_s, 4000.0);
        assert_eq!(s.documents_per_s, 2000.0);
        assert_eq!(s.redis_merges_per_doc, 2.0);
        assert_eq!(s.bulk_requests_per_doc, 0.002);
        assert!((s.vector_mb_per_s - 7.168).abs() < 1e-9);
        assert!(s.complete);
        assert!(s.incomplete_warning().is_none());
    }

    #[test]
    fn a_run_that_lost_documents_is_flagged_loudly() {
        let s = summary(990);
        assert!(!s.complete);
        let warning = s.incomplete_warning().unwrap();
        assert!(warning.contains("INCOMPLETE"), "{warning}");
        assert!(warning.contains("10 missing"), "{warning}");
        assert!(sweep_row("2", &s).ends_with("INCOMPLETE"));
    }

    #[test]
    fn the_table_names_each_figure_and_its_bytes() {
        let t = summary(1000).table();
        for needle in [
            "embeddings/s          4,000",
            "documents/s           2,000",
            "f32 payload",
            "Redis merges/doc      2.000",
            "bulk requests/doc     0.0020",
            "no document acknowledged",
            "50.0 MB (VmHWM; includes 4.0 MB of pre-generated load)",
            "order split",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        assert!(!t.contains("JSON MB/s"));
    }

    #[test]
    fn a_paced_run_shows_its_offered_load_and_both_latencies() {
        let latency = |p50_ms, p99_ms, max_ms| Latency { p50_ms, p99_ms, max_ms, exact: true };
        let mut s = summary(1000);
        s.latency = Some(latency(12.0, 80.0, 95.0));
        s.paced = Some(Paced {
            offered_per_s: 8000.0,
            sent_per_s: 7999.6,
            max_behind_ms: 1.25,
            each_part: Some(latency(300.0, 2700.0, 2800.0)),
            parts_not_indexed: 3,
        });
        let t = s.table();
        for needle in [
            "offered load          8,000 embeddings/s, open loop; sent at 8,000/s, at worst 1.25 ms behind schedule",
            "last part -> indexed  p50 12.0 ms, p99 80.0 ms, max 95.0 ms (per document",
            "each part -> indexed  p50 300 ms, p99 2700 ms, max 2800 ms (over parts",
            "3 parts not indexed",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        s.paced.as_mut().unwrap().each_part = None;
        assert!(s.table().contains("each part -> indexed  not seen from here"));
        let v: serde_json::Value = serde_json::from_str(&s.json_line()).unwrap();
        assert_eq!(v["paced"]["offered_per_s"], 8000.0);
    }

    #[test]
    fn redis_commands_and_bytes_are_shown_per_embedding() {
        let mut s = summary(1000);
        s.cpu = Some(crate::bench::cpu::CpuCost {
            service_us_per_embedding: None,
            redis_us_per_embedding: Some(12.5),
            redis_commands_per_embedding: Some(2.5),
            redis_bytes_per_embedding: Some(4321.0),
            redis_records: None,
            redis_bytes_per_record: None,
            redis_masters: None,
        });
        let t = s.table();
        assert!(t.contains("CPU/embedding         Redis 12.5 µs\n"), "{t}");
        assert!(t.contains("Redis/embedding       2.50 commands, 4,321 bytes in and out"), "{t}");
        assert!(!t.contains("per master"), "{t}");
    }

    #[test]
    fn a_cluster_run_shows_each_masters_share_in_the_table_and_the_json() {
        let master = |address: &str, command_share_percent, redis_us_per_embedding| crate::bench::cpu::MasterCost {
            address: address.into(),
            command_share_percent,
            redis_us_per_embedding,
        };
        let mut s = summary(1000);
        s.cpu = Some(crate::bench::cpu::CpuCost {
            service_us_per_embedding: Some(30.0),
            redis_us_per_embedding: Some(36.0),
            redis_commands_per_embedding: Some(10.5),
            redis_bytes_per_embedding: Some(4321.0),
            redis_records: None,
            redis_bytes_per_record: None,
            redis_masters: Some(vec![
                master("127.0.0.1:7001", 33.41, 12.04),
                master("127.0.0.1:7002", 33.3, 11.96),
                master("127.0.0.1:7003", 33.29, 12.0),
            ]),
        });
        let t = s.table();
        for needle in [
            "CPU/embedding         this process 30.0 µs; Redis 36.0 µs\n",
            "Redis per master      127.0.0.1:7001: 33.4% of the commands, CPU 12.0 µs/embedding\n",
            "                      127.0.0.1:7003: 33.3% of the commands, CPU 12.0 µs/embedding\n",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        let v: serde_json::Value = serde_json::from_str(&s.json_line()).unwrap();
        let masters = &v["cpu"]["redis_masters"];
        assert_eq!(masters[1]["address"], "127.0.0.1:7002");
        assert_eq!(masters[1]["command_share_percent"], 33.3);
        assert_eq!(masters[2]["redis_us_per_embedding"], 12.0);
    }

    #[test]
    fn the_json_line_is_one_parseable_line() {
        let line = summary(1000).json_line();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["order"], "split");
        assert_eq!(v["documents_indexed"], 1000);
        assert_eq!(v["complete"], true);
        assert_eq!(v["latency"], serde_json::Value::Null);
    }

    #[test]
    fn sweep_rows_line_up_with_the_header() {
        let header = sweep_header("shards");
        let row = sweep_row("2", &summary(1000));
        assert_eq!(header.len(), row.len(), "\n{header}\n{row}");
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0.4), "0");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(1000.0), "1,000");
        assert_eq!(grouped(1234567.8), "1,234,568");
        assert_eq!(ms(0.1234), "0.123");
        assert_eq!(ms(12.34), "12.3");
    }
}
