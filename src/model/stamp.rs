//! Stamps: the order of the copies of a part.
//!
//! Every part gets a stamp when ingress accepts it: microseconds since the Unix epoch from
//! this process's clock, made strictly increasing (a part accepted after another always
//! gets a larger stamp, even within one microsecond or if the wall clock steps back a
//! little). "Newest" means "largest stamp":
//!
//! - at one instance, the copy of a part accepted last wins, exactly;
//! - across instances, stamps come from each instance's clock: two copies of one part
//!   accepted by different instances less than their clock skew apart may be ordered
//!   either way (keep instances NTP-synchronised: a few milliseconds of skew).
//!
//! A document's version, sent to Elasticsearch as an external version, is the largest
//! stamp of its parts, so a later completion of an item always carries a larger version.
//! Stamps stay below 2^53 (until the year 2255), so the state store's Lua scripts compare
//! them exactly as doubles.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The last stamp handed out in this process.
static LAST: AtomicU64 = AtomicU64::new(0);

/// The next stamp: the wall clock in µs, or one more than the last stamp if that is larger.
pub fn next() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let stamp = now.max(last + 1);
        match LAST.compare_exchange_weak(last, stamp, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return stamp,
            Err(seen) => last = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps_strictly_increase_across_threads() {
        let threads: Vec<_> =
            (0..4).map(|_| std::thread::spawn(|| (0..10_000).map(|_| super::next()).collect::<Vec<_>>())).collect();
        let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let n = all.len();
        for w in all.windows(2).take(1000) {
            assert!(w[0] != w[1]);
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "no stamp is handed out twice");
        assert!(all[n - 1] < 1 << 53, "stamps stay exact as doubles");
    }
}
