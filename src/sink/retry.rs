//! What a sink's answer means for a document, as one table-tested function per level:
//! [`RetryPolicy::classify_item`] for an item of a bulk response, and
//! [`RetryPolicy::retries_request`] for a whole request that failed. Backoff is
//! exponential with full jitter, capped.

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;

use super::SinkError;
use crate::config::ElasticsearchSettings;

/// The error type of a 409 from an external-versioned write the index already holds a
/// newer (or the same, for `external`) version of.
pub const VERSION_CONFLICT: &str = "version_conflict_engine_exception";

/// What one item's result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The sink took it.
    Indexed,
    /// The sink holds a newer version of the id: this write lost to it, which is settled.
    Superseded,
    /// Busy or unavailable: send it again later.
    Retry,
    /// The document itself is wrong: retrying cannot help.
    Reject,
}

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

    /// What an item's status (and error type) means.
    pub fn classify_item(&self, status: u16, error_type: Option<&str>) -> Verdict {
        match status {
            200..=299 => Verdict::Indexed,
            409 if error_type == Some(VERSION_CONFLICT) => Verdict::Superseded,
            s if self.statuses.contains(&s) => Verdict::Retry,
            _ => Verdict::Reject,
        }
    }

    /// Whether a whole request that failed this way is sent again.
    pub fn retries_request(&self, error: &SinkError) -> bool {
        match error {
            SinkError::Transport(_) => true,
            SinkError::Status { status, .. } => self.statuses.contains(status),
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

    fn policy() -> RetryPolicy {
        RetryPolicy::new(&Settings::defaults().elasticsearch)
    }

    #[test]
    fn item_results_classify_as_the_contract_says() {
        let table: &[(u16, Option<&str>, Verdict)] = &[
            (200, None, Verdict::Indexed),
            (201, None, Verdict::Indexed),
            (409, Some(VERSION_CONFLICT), Verdict::Superseded),
            (409, Some("some_other_conflict"), Verdict::Reject),
            (429, Some("es_rejected_execution_exception"), Verdict::Retry),
            (500, Some("x"), Verdict::Retry),
            (502, None, Verdict::Retry),
            (503, Some("unavailable_shards_exception"), Verdict::Retry),
            (504, None, Verdict::Retry),
            (400, Some("document_parsing_exception"), Verdict::Reject),
            (400, Some("mapper_parsing_exception"), Verdict::Reject),
            (404, Some("index_not_found_exception"), Verdict::Reject),
        ];
        let policy = policy();
        for &(status, error_type, want) in table {
            assert_eq!(policy.classify_item(status, error_type), want, "{status} {error_type:?}");
        }
    }

    #[test]
    fn request_failures_that_say_later_are_retried() {
        let policy = policy();
        let status = |status| SinkError::Status { status, error_type: "x".into(), reason: String::new() };
        assert!(policy.retries_request(&SinkError::Transport("reset".into())));
        assert!(policy.retries_request(&status(429)));
        assert!(policy.retries_request(&status(503)));
        assert!(!policy.retries_request(&status(413)));
        assert!(!policy.retries_request(&status(400)));
        assert!(!policy.retries_request(&SinkError::Protocol("bad".into())));
    }

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
    }
}
