//! Sending bulk requests: the sink clients (Elasticsearch, `_bulk` files, null), the
//! encoding of documents into `_bulk` operations ([`encode`]), and what each answer means
//! ([`retry`]). Batching, settling and parking live in `delivery`; this module knows
//! nothing of the state store.

pub mod elasticsearch;
pub mod encode;
pub mod file;
pub mod retry;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::{LatePartsAction, Settings, SinkBackend};
use crate::model::Schema;

/// The result of one operation of a bulk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemStatus {
    pub status: u16,
    /// Error type and reason, for a failed item.
    pub error: Option<(String, String)>,
    /// A successful update that changed nothing (`"result": "noop"`).
    pub noop: bool,
}

impl ItemStatus {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A whole-request failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// No answer: connection refused, dropped or timed out. The items may or may not have
    /// been applied; resending is safe because `_id` is fixed.
    #[error("transport: {0}")]
    Transport(String),
    /// The sink answered the whole request with an error status.
    #[error("status {status} {error_type}: {reason}")]
    Status { status: u16, error_type: String, reason: String },
    /// The sink answered something embedjoin cannot read.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The sink cannot be set up from the settings.
    #[error("config: {0}")]
    Config(String),
}

/// The configured sink.
#[derive(Clone)]
pub enum SinkClient {
    Elasticsearch(elasticsearch::EsSink),
    /// Appends `_bulk` NDJSON to local files, to load into Elasticsearch later.
    File(file::FileSink),
    /// Acknowledges every item (201) without I/O: benchmarks measure the pipeline alone.
    Null,
    /// Like `Null`, after showing each body to an observer: the benchmark learns when each
    /// document is acknowledged. Never built from settings.
    Observed(BodyObserver),
}

/// Sees each bulk body a [`SinkClient::Observed`] acknowledges, as it acknowledges it.
pub type BodyObserver = Arc<dyn Fn(&Bytes) + Send + Sync>;

/// Why the service does not start when guarded updates cannot run.
pub const NO_PAINLESS: &str = "state.late_parts = \"update\" writes guarded updates as painless scripts, \
and the cluster refuses painless scripts. Allow inline painless scripts (script.allowed_types), \
or set state.late_parts = \"new_item\" (a newer part then waits for the item's other parts again).";

impl SinkClient {
    pub fn new(settings: &Settings) -> Result<SinkClient, SinkError> {
        match settings.sink.backend {
            SinkBackend::Elasticsearch => {
                Ok(SinkClient::Elasticsearch(elasticsearch::EsSink::new(&settings.elasticsearch)?))
            }
            SinkBackend::File => Ok(SinkClient::File(file::FileSink::new(&settings.file))),
            SinkBackend::Null => Ok(SinkClient::Null),
        }
    }

    /// Prepares the destination: creates the index, with the engine's vector mappings, when
    /// the settings ask for it; otherwise only says which engine answers (a failure to tell
    /// is not fatal then: the credentials may be allowed `_bulk` and nothing else).
    pub async fn prepare(&self, settings: &Settings, schema: &Schema) -> Result<(), SinkError> {
        let index = &settings.elasticsearch.index;
        if let SinkClient::Elasticsearch(es) = self {
            if settings.state.late_parts == LatePartsAction::Update {
                match es.runs_painless().await {
                    Ok(true) => {}
                    Ok(false) => return Err(SinkError::Config(NO_PAINLESS.into())),
                    Err(error) => tracing::warn!(
                        %error,
                        "Cannot tell whether the cluster runs painless scripts, which state.late_parts = \"update\" needs; going on."
                    ),
                }
            }
        }
        match self {
            SinkClient::Elasticsearch(es) if settings.elasticsearch.create_index => {
                let engine = es.ensure_index(schema, settings.elasticsearch.similarity).await?;
                tracing::info!(%engine, %index, "Index ready.");
                Ok(())
            }
            SinkClient::Elasticsearch(es) => {
                match es.engine().await {
                    Ok(engine) => tracing::info!(%engine, %index, "Writing to an index that is not created here."),
                    Err(error) => tracing::warn!(%error, %index, "Cannot tell which engine answers; writing anyway."),
                }
                Ok(())
            }
            SinkClient::File(file) => file.open().await,
            SinkClient::Null | SinkClient::Observed(_) => Ok(()),
        }
    }

    /// Sends one bulk body of `count` operations.
    pub async fn bulk(&self, body: Bytes, count: usize) -> Result<Vec<ItemStatus>, SinkError> {
        match self {
            SinkClient::Elasticsearch(es) => es.bulk(body, count).await,
            SinkClient::File(file) => file.bulk(body, count).await,
            SinkClient::Null => Ok(vec![ItemStatus { status: 201, error: None, noop: false }; count]),
            SinkClient::Observed(observe) => {
                observe(&body);
                Ok(vec![ItemStatus { status: 201, error: None, noop: false }; count])
            }
        }
    }

    pub async fn ping(&self) -> Result<(), SinkError> {
        match self {
            SinkClient::Elasticsearch(es) => es.ping().await,
            SinkClient::File(_) | SinkClient::Null | SinkClient::Observed(_) => Ok(()),
        }
    }
}
