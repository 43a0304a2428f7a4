//! The Elasticsearch sink: `_bulk` calls through the official client, and the index
//! (with `dense_vector` mappings) created at start. OpenSearch speaks the same `_bulk`.

use std::time::Duration;

use bytes::Bytes;
use elasticsearch::auth::Credentials;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, StatusCode};
use elasticsearch::indices::{IndicesCreateParts, IndicesExistsParts};
use elasticsearch::{BulkParts, Elasticsearch};
use serde::Deserialize;

use super::{ItemStatus, SinkError};
use crate::config::ElasticsearchSettings;
use crate::model::Schema;

/// Only what embedjoin reads of a bulk response; the rest is not sent back at all.
const BULK_FILTER_PATH: &[&str] = &["errors", "items.*.status", "items.*.error.type", "items.*.error.reason"];

#[derive(Clone)]
pub struct EsSink {
    client: Elasticsearch,
    index: String,
    timeout: Duration,
}

impl EsSink {
    pub fn new(settings: &ElasticsearchSettings) -> Result<EsSink, SinkError> {
        let url = url::Url::parse(&settings.url).map_err(|e| SinkError::Config(format!("elasticsearch.url: {e}")))?;
        let mut transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .timeout(settings.request_timeout)
            .request_body_compression(settings.compression)
            .disable_proxy();
        if !settings.api_key.is_empty() {
            transport = transport.auth(Credentials::EncodedApiKey(settings.api_key.expose().to_owned()));
        } else if !settings.username.is_empty() {
            transport =
                transport.auth(Credentials::Basic(settings.username.clone(), settings.password.expose().to_owned()));
        }
        let transport = transport.build().map_err(|e| SinkError::Config(format!("elasticsearch: {e}")))?;
        Ok(EsSink {
            client: Elasticsearch::new(transport),
            index: settings.index.clone(),
            timeout: settings.request_timeout,
        })
    }

    /// Sends one `_bulk` body holding `count` operations; returns one status per operation.
    pub async fn bulk(&self, body: Bytes, count: usize) -> Result<Vec<ItemStatus>, SinkError> {
        let response = self
            .client
            .bulk(BulkParts::Index(&self.index))
            .filter_path(BULK_FILTER_PATH)
            .request_timeout(self.timeout)
            .body(vec![body])
            .send()
            .await
            .map_err(|e| SinkError::Transport(with_causes(&e)))?;
        let status = response.status_code();
        let bytes = response.bytes().await.map_err(|e| SinkError::Transport(with_causes(&e)))?;
        if !status.is_success() {
            return Err(request_error(status, &bytes));
        }
        let parsed: BulkResponse = serde_json::from_slice(&bytes)
            .map_err(|e| SinkError::Protocol(format!("unreadable bulk response: {e}")))?;
        if parsed.items.len() != count {
            return Err(SinkError::Protocol(format!("{} items in the response for {count} sent", parsed.items.len())));
        }
        Ok(parsed
            .items
            .into_iter()
            .map(|item| {
                let op = item.op;
                let error = op.error.map(|e| (e.kind, e.reason.unwrap_or_default()));
                ItemStatus { status: op.status, error }
            })
            .collect())
    }

    /// Creates the index with `dense_vector` mappings unless it exists.
    pub async fn ensure_index(&self, schema: &Schema, similarity: &str) -> Result<(), SinkError> {
        let exists = self
            .client
            .indices()
            .exists(IndicesExistsParts::Index(&[&self.index]))
            .send()
            .await
            .map_err(|e| SinkError::Transport(with_causes(&e)))?;
        match exists.status_code() {
            StatusCode::OK => return Ok(()),
            StatusCode::NOT_FOUND => {}
            other => return Err(request_error(other, &exists.bytes().await.unwrap_or_default())),
        }
        let mut properties = serde_json::Map::new();
        properties.insert("id".into(), serde_json::json!({"type": "keyword"}));
        properties.insert("completed_at".into(), serde_json::json!({"type": "date"}));
        for part in schema.parts() {
            properties.insert(
                part.field.clone(),
                serde_json::json!({"type": "dense_vector", "dims": part.dims, "index": true, "similarity": similarity}),
            );
        }
        let body = serde_json::json!({"mappings": {"properties": properties}});
        let response = self
            .client
            .indices()
            .create(IndicesCreateParts::Index(&self.index))
            .body(body)
            .send()
            .await
            .map_err(|e| SinkError::Transport(with_causes(&e)))?;
        let status = response.status_code();
        if status.is_success() {
            return Ok(());
        }
        let err = request_error(status, &response.bytes().await.unwrap_or_default());
        match &err {
            // Another instance created it first.
            SinkError::Status { error_type, .. } if error_type == "resource_already_exists_exception" => Ok(()),
            _ => Err(err),
        }
    }

    /// Whether the cluster answers.
    pub async fn ping(&self) -> Result<(), SinkError> {
        let response = self
            .client
            .send(Method::Get, "/", Default::default(), Option::<&()>::None, Option::<&[u8]>::None, Some(self.timeout))
            .await
            .map_err(|e| SinkError::Transport(with_causes(&e)))?;
        let status = response.status_code();
        if status.is_success() {
            Ok(())
        } else {
            Err(request_error(status, &response.bytes().await.unwrap_or_default()))
        }
    }
}

#[derive(Deserialize)]
struct BulkResponse {
    #[serde(default)]
    items: Vec<BulkItem>,
}

#[derive(Deserialize)]
struct BulkItem {
    /// The operation's result, under its action name.
    #[serde(rename = "index", alias = "create", alias = "update", alias = "delete")]
    op: BulkOp,
}

#[derive(Deserialize)]
struct BulkOp {
    status: u16,
    error: Option<ItemError>,
}

#[derive(Deserialize)]
struct ItemError {
    #[serde(rename = "type")]
    kind: String,
    reason: Option<String>,
}

/// An error with its chain of causes ("error sending request ...: connection refused"):
/// the client's top-level message alone does not say what went wrong.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Reads an Elasticsearch error body (`{"error":{"type","reason"},"status"}`) as far as it goes.
fn request_error(status: StatusCode, body: &[u8]) -> SinkError {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error = &value["error"];
    let (error_type, reason) = match error {
        serde_json::Value::Object(_) => (
            error["type"].as_str().unwrap_or("unknown").to_owned(),
            error["reason"].as_str().unwrap_or_default().to_owned(),
        ),
        serde_json::Value::String(s) => ("unknown".to_owned(), s.clone()),
        _ => ("unknown".to_owned(), String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()),
    };
    SinkError::Status { status: status.as_u16(), error_type, reason }
}
