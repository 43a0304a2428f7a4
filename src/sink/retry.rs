//! What is retried, and when: item statuses from config (429 and 5xx by default), and
//! whole-request failures that leave the outcome unknown or say "later" (no answer, 429,
//! 5xx). Backoff is exponential with full jitter, capped.

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;

use super::SinkError;
use crate::config::ElasticsearchSettings;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    statuses: HashSet<u16>,
    /// Attempts after the first.
    pub max_retries: u32,
    initial: Duration,
    max: Duration,
}

impl RetryPolicy {
    pub fn new(settings: &ElasticsearchSettings) -> RetryPolicy {
        RetryPolicy {
            statuses: settings.retry_statuses.iter().copied().collect(),
            max_retries: settings.max_retries,
            initial: settings.retry_initial_backoff,
            max: settings.retry_max_backoff,
        }
    }

    /// Whether a failed item with this status is sent again.
    pub fn retries_status(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }

    /// Whether a whole request that failed this way is sent again.
    pub fn retries_request(&self, error: &SinkError) -> bool {
        match error {
            SinkError::Transport(_) => true,
            SinkError::Status { status, .. } => self.retries_status(*status),
            SinkError::Protocol(_) | SinkError::Config(_) => false,
        }
    }

    /// The wait before retry number `retry` (0-based): uniform in [0, min(max, initial * 2^retry)].
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self.initial.saturating_mul(1u32 << retry.min(20)).min(self.max);
        ceiling.mul_f64(rand::rng().random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let mut es = Settings::defaults().elasticsearch;
        es.retry_initial_backoff = Duration::from_millis(100);
        es.retry_max_backoff = Duration::from_secs(1);
        let policy = RetryPolicy::new(&es);
        for retry in 0..30 {
            let ceiling = Duration::from_millis(100).saturating_mul(1 << retry.min(20)).min(Duration::from_secs(1));
            assert!(policy.backoff(retry) <= ceiling);
        }
        assert!(policy.retries_status(429));
        assert!(policy.retries_status(503));
        assert!(!policy.retries_status(400));
        assert!(policy.retries_request(&SinkError::Transport("reset".into())));
        assert!(!policy.retries_request(&SinkError::Status { status: 413, error_type: "x".into(), reason: "".into() }));
    }
}
