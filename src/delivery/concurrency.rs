//! The adaptive limit on bulk requests in flight (AIMD, as Vector's adaptive request
//! concurrency): it starts at 1, rises by one request per round trip while the cluster
//! keeps up (answers without backpressure, latency not growing), and is multiplied by
//! [`DECREASE`] on backpressure (429, 5xx, no answer) or when a response takes much longer
//! than the recent average. It never leaves `1..=requests_in_flight`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

/// The factor applied to the limit on backpressure.
pub const DECREASE: f64 = 0.5;
/// A response this many times slower than the average counts as backpressure.
const SLOW: f64 = 2.0;
/// Weight of a new round trip in the moving average.
const ALPHA: f64 = 0.2;

#[derive(Debug)]
struct State {
    limit: f64,
    max: f64,
    /// Moving average of successful round trips, in seconds.
    rtt: Option<f64>,
}

/// A shared handle on the limit; cheap to clone.
#[derive(Clone)]
pub struct AdaptiveLimit {
    state: Arc<Mutex<State>>,
    gauge: Gauge,
}

impl AdaptiveLimit {
    pub fn new(max: usize, gauge: Gauge) -> AdaptiveLimit {
        gauge.set(1);
        AdaptiveLimit { state: Arc::new(Mutex::new(State { limit: 1.0, max: max.max(1) as f64, rtt: None })), gauge }
    }

    /// Requests that may be in flight now.
    pub fn current(&self) -> usize {
        self.lock().limit as usize
    }

    /// A response without backpressure took `rtt`.
    pub fn on_success(&self, rtt: Duration) {
        let mut s = self.lock();
        let rtt = rtt.as_secs_f64();
        match s.rtt {
            Some(avg) if rtt > SLOW * avg => s.limit = (s.limit * DECREASE).max(1.0),
            _ => s.limit = (s.limit + 1.0 / s.limit).min(s.max),
        }
        s.rtt = Some(s.rtt.map_or(rtt, |avg| avg + ALPHA * (rtt - avg)));
        self.gauge.set(s.limit as i64);
    }

    /// The cluster pushed back (429, 5xx, no answer).
    pub fn on_backpressure(&self) {
        let mut s = self.lock();
        s.limit = (s.limit * DECREASE).max(1.0);
        self.gauge.set(s.limit as i64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_while_the_cluster_keeps_up_and_falls_on_backpressure() {
        let limit = AdaptiveLimit::new(4, Gauge::default());
        assert_eq!(limit.current(), 1);
        for _ in 0..20 {
            limit.on_success(Duration::from_millis(10));
        }
        assert_eq!(limit.current(), 4, "capped at requests_in_flight");
        limit.on_backpressure();
        assert_eq!(limit.current(), 2);
        limit.on_backpressure();
        limit.on_backpressure();
        assert_eq!(limit.current(), 1, "never below one");
        for _ in 0..20 {
            limit.on_success(Duration::from_millis(10));
        }
        assert_eq!(limit.current(), 4);
        limit.on_success(Duration::from_millis(100)); // much slower than the average
        assert_eq!(limit.current(), 2);
        assert_eq!(limit.gauge.get(), 2);
    }
}
