//! What a sink's answer means for a document, as one table-tested function per level:
//! [`RetryPolicy::classify_item`] for an item of a bulk response, and
//! [`RetryPolicy::classify_request`] for a whole request that failed. Busy is not wrong:
//! only an answer about the document itself dead-letters it. Backoff is exponential with
//! full jitter, capped.

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;

use super::encode::Action;
use super::{ItemStatus, SinkError};
use crate::config::ElasticsearchSettings;

/// The error type of a 409 from an external-versioned write the index already holds a
/// newer (or the same, for `external`) version of.
pub const VERSION_CONFLICT: &str = "version_conflict_engine_exception";
/// The error type of a write to an index that does not exist (and may not be created).
pub const INDEX_NOT_FOUND: &str = "index_not_found_exception";
/// The error type of an `update` of an id the index does not hold.
pub const DOCUMENT_MISSING: &str = "document_missing_exception";

/// What one item's result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The sink took it.
    Indexed,
    /// The sink holds a newer version of the id (or, for a guarded update, every part as
    /// new): this write lost to it, which is settled.
    Superseded,
    /// A `create` found the id indexed: write it as a guarded update instead.
    Exists,
    /// A guarded update found no document to update.
    Missing,
    /// Busy or unavailable: send it again later.
    Retry,
    /// The cluster refuses us, not the document (401/403, a missing index): an operator
    /// must act; delivery stalls and keeps the document, retrying until it is taken.
    Stall,
    /// The document itself is wrong: retrying cannot help.
    Reject,
}

/// What a whole-request failure means for the documents in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestVerdict {
    /// Busy, unreachable, or an answer that cannot be read: send the same request again.
    Retry,
    /// The cluster refuses us (401/403, a missing index, a misconfiguration): stall.
    Stall,
    /// The body is too large (413), or a document in it broke the request (400): split it
    /// until the offending document stands alone.
    Split,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    statuses: HashSet<u16>,
    /// How long a refused document is retried before it is dead-lettered (`None`: until
    /// taken, or parked at shutdown).
    pub retry_for: Option<Duration>,
    initial: Duration,
    max: Duration,
}

impl RetryPolicy {
    pub fn new(settings: &ElasticsearchSettings) -> RetryPolicy {
        RetryPolicy {
            statuses: settings.retry_statuses.iter().copied().collect(),
            retry_for: settings.retry_for,
            initial: settings.retry_initial_backoff,
            max: settings.retry_max_backoff,
        }
    }

    /// What an item's result means for a write of this action.
    pub fn classify_item(&self, action: Action, item: &ItemStatus) -> Verdict {
        let error_type = item.error.as_ref().map(|(kind, _)| kind.as_str());
        match (item.status, action) {
            (200..=299, Action::Merge | Action::Upsert) if item.noop => Verdict::Superseded,
            (200..=299, _) => Verdict::Indexed,
            (409, Action::Index) if error_type == Some(VERSION_CONFLICT) => Verdict::Superseded,
            (409, Action::Create) if error_type == Some(VERSION_CONFLICT) => Verdict::Exists,
            // Updates of one document raced past `retry_on_conflict`: busy, not wrong.
            (409, Action::Merge | Action::Upsert) if error_type == Some(VERSION_CONFLICT) => Verdict::Retry,
            (404, Action::Merge) if error_type == Some(DOCUMENT_MISSING) => Verdict::Missing,
            (status, _) => self.classify_status(status, error_type),
        }
    }

    fn classify_status(&self, status: u16, error_type: Option<&str>) -> Verdict {
        match status {
            s if self.statuses.contains(&s) => Verdict::Retry,
            401 | 403 => Verdict::Stall,
            404 if error_type == Some(INDEX_NOT_FOUND) => Verdict::Stall,
            _ => Verdict::Reject,
        }
    }

    /// What a whole request that failed this way means.
    pub fn classify_request(&self, error: &SinkError) -> RequestVerdict {
        match error {
            SinkError::Transport(_) | SinkError::Protocol(_) => RequestVerdict::Retry,
            SinkError::Status { status, .. } if self.statuses.contains(status) => RequestVerdict::Retry,
            SinkError::Status { status: 400 | 413, .. } => RequestVerdict::Split,
            SinkError::Status { .. } | SinkError::Config(_) => RequestVerdict::Stall,
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
            (404, Some(DOCUMENT_MISSING), Verdict::Reject),
            (409, Some("some_other_conflict"), Verdict::Reject),
            (429, Some("es_rejected_execution_exception"), Verdict::Retry),
            (500, Some("x"), Verdict::Retry),
            (502, None, Verdict::Retry),
            (503, Some("unavailable_shards_exception"), Verdict::Retry),
            (504, None, Verdict::Retry),
            (400, Some("document_parsing_exception"), Verdict::Reject),
            (400, Some("mapper_parsing_exception"), Verdict::Reject),
            (401, Some("security_exception"), Verdict::Stall),
            (403, Some("security_exception"), Verdict::Stall),
            (404, Some("index_not_found_exception"), Verdict::Stall),
        ];
        let policy = policy();
        for &(status, error_type, want) in table {
            let item = ItemStatus { status, error: error_type.map(|t| (t.into(), String::new())), noop: false };
            assert_eq!(policy.classify_item(Action::Index, &item), want, "{status} {error_type:?}");
        }
    }

    #[test]
    fn guarded_writes_classify_by_their_action() {
        let item = |status, error_type: Option<&str>, noop| ItemStatus {
            status,
            error: error_type.map(|t| (t.into(), String::new())),
            noop,
        };
        let table: &[(Action, ItemStatus, Verdict)] = &[
            (Action::Create, item(201, None, false), Verdict::Indexed),
            (Action::Create, item(409, Some(VERSION_CONFLICT), false), Verdict::Exists),
            (Action::Merge, item(200, None, false), Verdict::Indexed),
            (Action::Merge, item(200, None, true), Verdict::Superseded),
            (Action::Merge, item(404, Some(DOCUMENT_MISSING), false), Verdict::Missing),
            (Action::Merge, item(409, Some(VERSION_CONFLICT), false), Verdict::Retry),
            (Action::Merge, item(429, Some("es_rejected_execution_exception"), false), Verdict::Retry),
            (Action::Merge, item(400, Some("illegal_argument_exception"), false), Verdict::Reject),
            (Action::Upsert, item(201, None, false), Verdict::Indexed),
            (Action::Upsert, item(200, None, true), Verdict::Superseded),
            (Action::Upsert, item(404, Some(DOCUMENT_MISSING), false), Verdict::Reject),
            (Action::Index, item(200, None, true), Verdict::Indexed),
        ];
        let policy = policy();
        for (action, item, want) in table {
            assert_eq!(policy.classify_item(*action, item), *want, "{action:?} {item:?}");
        }
    }

    #[test]
    fn request_failures_never_dead_letter_a_batch() {
        let policy = policy();
        let status = |status| SinkError::Status { status, error_type: "x".into(), reason: String::new() };
        let table: &[(SinkError, RequestVerdict)] = &[
            (SinkError::Transport("connection reset".into()), RequestVerdict::Retry),
            (SinkError::Protocol("unreadable bulk response".into()), RequestVerdict::Retry),
            (status(429), RequestVerdict::Retry),
            (status(500), RequestVerdict::Retry),
            (status(503), RequestVerdict::Retry),
            (status(413), RequestVerdict::Split),
            (status(400), RequestVerdict::Split),
            (status(401), RequestVerdict::Stall),
            (status(403), RequestVerdict::Stall),
            (status(404), RequestVerdict::Stall),
            (SinkError::Config("bad url".into()), RequestVerdict::Stall),
        ];
        for (error, want) in table {
            assert_eq!(policy.classify_request(error), *want, "{error}");
        }
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
