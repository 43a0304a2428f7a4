//! The Elasticsearch sink: `_bulk` calls through the official client, and the index
//! created at start. OpenSearch speaks the same `_bulk` but maps vectors differently, so
//! the bootstrap reads `GET /` to tell the engines apart (unless `elasticsearch.engine`
//! names it): Elasticsearch gets `dense_vector` (dims, similarity), OpenSearch gets
//! `knn_vector` (dimension, and an HNSW method on the Lucene engine, which needs no
//! native library) in an index with `index.knn` on. Nothing else depends on the engine.

use std::time::Duration;

use bytes::Bytes;
use elasticsearch::auth::Credentials;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, StatusCode};
use elasticsearch::indices::{IndicesCreateParts, IndicesExistsParts};
use elasticsearch::{BulkParts, Elasticsearch};
use serde::Deserialize;

use super::{ItemStatus, SinkError};
use crate::config::{ElasticsearchSettings, EngineSetting, Similarity};
use crate::model::Schema;

/// Only what embedjoin reads of a bulk response; the rest is not sent back at all.
const BULK_FILTER_PATH: &[&str] =
    &["errors", "items.*.status", "items.*.result", "items.*.error.type", "items.*.error.reason"];

#[derive(Clone)]
pub struct EsSink {
    client: Elasticsearch,
    index: String,
    timeout: Duration,
    /// The configured engine; `Auto` asks the cluster.
    engine: EngineSetting,
    /// Whether vector fields get an HNSW index.
    index_vectors: bool,
}

/// Which search engine answers, as its `GET /` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Elasticsearch,
    OpenSearch,
}

/// The engine and its version (`version.number`), as read from `GET /`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    pub kind: EngineKind,
    /// Empty when the engine was configured rather than asked.
    pub version: String,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.kind {
            EngineKind::Elasticsearch => "Elasticsearch",
            EngineKind::OpenSearch => "OpenSearch",
        };
        if self.version.is_empty() {
            write!(f, "{name}")
        } else {
            write!(f, "{name} {}", self.version)
        }
    }
}

impl Engine {
    /// Reads a `GET /` body. OpenSearch says `"distribution": "opensearch"` in `version`;
    /// Elasticsearch has no such field (its `build_flavor` is `default`).
    pub fn from_root(body: &serde_json::Value) -> Result<Engine, SinkError> {
        let version = &body["version"];
        let number = version["number"]
            .as_str()
            .ok_or_else(|| SinkError::Protocol(format!("GET / has no version.number: {body}")))?;
        let kind = if version["distribution"].as_str() == Some("opensearch") {
            EngineKind::OpenSearch
        } else {
            EngineKind::Elasticsearch
        };
        Ok(Engine { kind, version: number.to_owned() })
    }
}

/// The body of `PUT /{index}`: the document fields and, per configured part, a vector
/// field of its dimension in the engine's own type.
pub fn index_body(kind: EngineKind, schema: &Schema, similarity: Similarity, index_vectors: bool) -> serde_json::Value {
    let mut properties = serde_json::Map::new();
    properties.insert("id".into(), serde_json::json!({"type": "keyword"}));
    properties.insert("completed_at".into(), serde_json::json!({"type": "date"}));
    // Each part's stamp, for the guarded update: stored in the source, never indexed.
    properties.insert("_parts".into(), serde_json::json!({"type": "object", "enabled": false}));
    for part in schema.parts() {
        let field = match kind {
            // `similarity` is only accepted on an indexed field.
            EngineKind::Elasticsearch if index_vectors => serde_json::json!({
                "type": "dense_vector", "dims": part.dims, "index": true, "similarity": similarity.as_str()
            }),
            EngineKind::Elasticsearch => serde_json::json!({"type": "dense_vector", "dims": part.dims, "index": false}),
            EngineKind::OpenSearch if index_vectors => serde_json::json!({
                "type": "knn_vector",
                "dimension": part.dims,
                "method": {"name": "hnsw", "engine": "lucene", "space_type": opensearch_space(similarity)}
            }),
            // Without `index.knn` a knn_vector is only stored (doc values) for exact scoring.
            EngineKind::OpenSearch => serde_json::json!({"type": "knn_vector", "dimension": part.dims}),
        };
        properties.insert(part.field.clone(), field);
    }
    let mut body = serde_json::json!({"mappings": {"properties": properties}});
    if kind == EngineKind::OpenSearch && index_vectors {
        body["settings"] = serde_json::json!({"index": {"knn": true}});
    }
    body
}

/// What in an existing index's mapping (`properties`) disagrees with the configured parts.
pub fn mapping_problems(
    kind: EngineKind,
    schema: &Schema,
    similarity: Similarity,
    properties: &serde_json::Value,
) -> Result<(), String> {
    let (want_type, dims_key) = match kind {
        EngineKind::Elasticsearch => ("dense_vector", "dims"),
        EngineKind::OpenSearch => ("knn_vector", "dimension"),
    };
    let mut problems = Vec::new();
    for part in schema.parts() {
        let field = &properties[&part.field];
        if field.is_null() {
            continue; // mapped dynamically from the first document: nothing to disagree with
        }
        let what = format!("`{}` (part {})", part.field, part.type_name);
        if field["type"] != want_type {
            problems.push(format!("{what} is mapped as {}, not {want_type}", field["type"]));
            continue;
        }
        if field[dims_key].as_u64() != Some(part.dims as u64) {
            problems.push(format!("{what} has {} dimensions in the index, {} configured", field[dims_key], part.dims));
        }
        let stated = match kind {
            EngineKind::Elasticsearch => field["similarity"].as_str().map(str::to_owned),
            EngineKind::OpenSearch => field["method"]["space_type"].as_str().map(str::to_owned),
        };
        let configured = match kind {
            EngineKind::Elasticsearch => similarity.as_str(),
            EngineKind::OpenSearch => opensearch_space(similarity),
        };
        if let Some(stated) = stated.filter(|s| s != configured) {
            problems.push(format!("{what} uses similarity {stated}, {configured} configured"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "its mapping disagrees with the configured parts: {}. Fix `parts` and `elasticsearch.similarity`, or set elasticsearch.index to a new index",
        problems.join("; ")
    ))
}

/// A strict mapping (`"dynamic": "strict"`) without `_parts` would refuse every document,
/// which carries its parts' stamps there.
pub fn parts_field_problem(mappings: &serde_json::Value) -> Result<(), String> {
    let strict = mappings["dynamic"] == "strict";
    if strict && mappings["properties"]["_parts"].is_null() {
        return Err("its mapping is \"dynamic\": \"strict\" and has no `_parts` field, which every document \
            carries (each part's stamp): add it with PUT <index>/_mapping \
            {\"properties\": {\"_parts\": {\"type\": \"object\", \"enabled\": false}}}"
            .into());
    }
    Ok(())
}

/// OpenSearch's name for an Elasticsearch similarity. `dot_product` (unit vectors) and
/// `max_inner_product` both score by inner product there.
fn opensearch_space(similarity: Similarity) -> &'static str {
    match similarity {
        Similarity::Cosine => "cosinesimil",
        Similarity::DotProduct | Similarity::MaxInnerProduct => "innerproduct",
        Similarity::L2Norm => "l2",
    }
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
            engine: settings.engine,
            index_vectors: settings.index_vectors,
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
            .await;
        let bytes = answer(response).await?;
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
                ItemStatus { status: op.status, error, noop: op.result.as_deref() == Some("noop") }
            })
            .collect())
    }

    /// Creates the index, with the engine's vector mappings, unless it exists; returns the
    /// engine it mapped for.
    pub async fn ensure_index(&self, schema: &Schema, similarity: Similarity) -> Result<Engine, SinkError> {
        let engine = self.engine().await?;
        let exists = self
            .client
            .indices()
            .exists(IndicesExistsParts::Index(&[&self.index]))
            .send()
            .await
            .map_err(|e| SinkError::Transport(with_causes(&e)))?;
        match exists.status_code() {
            StatusCode::OK => {
                self.verify_mapping(engine.kind, schema, similarity).await?;
                return Ok(engine);
            }
            StatusCode::NOT_FOUND => {}
            other => return Err(request_error(other, &exists.bytes().await.unwrap_or_default())),
        }
        let body = index_body(engine.kind, schema, similarity, self.index_vectors);
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
            return Ok(engine);
        }
        let err = request_error(status, &response.bytes().await.unwrap_or_default());
        match &err {
            // Another instance created it first.
            SinkError::Status { error_type, .. } if error_type == "resource_already_exists_exception" => Ok(engine),
            _ => Err(err),
        }
    }

    /// Checks that an existing index maps every configured part as embedjoin would (vector
    /// type, dimension, similarity where it is stated): a disagreement would have every
    /// document refused, so it is a start-up error that says what to fix.
    pub async fn verify_mapping(
        &self,
        kind: EngineKind,
        schema: &Schema,
        similarity: Similarity,
    ) -> Result<(), SinkError> {
        let response = self
            .client
            .indices()
            .get_mapping(elasticsearch::indices::IndicesGetMappingParts::Index(&[&self.index]))
            .send()
            .await;
        let body = answer(response).await?;
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| SinkError::Protocol(format!("unreadable mapping of {}: {e}", self.index)))?;
        // The answer is keyed by the concrete index (an alias resolves to it).
        let mappings = value.as_object().and_then(|m| m.values().next()).map(|ix| &ix["mappings"]);
        let mappings = mappings.unwrap_or(&serde_json::Value::Null);
        mapping_problems(kind, schema, similarity, &mappings["properties"])
            .and_then(|()| parts_field_problem(mappings))
            .map_err(|problem| SinkError::Config(format!("index {}: {problem}", self.index)))
    }

    /// The engine behind the URL: as configured, or read from `GET /` (version included).
    pub async fn engine(&self) -> Result<Engine, SinkError> {
        match self.engine {
            EngineSetting::Elasticsearch => Ok(Engine { kind: EngineKind::Elasticsearch, version: String::new() }),
            EngineSetting::Opensearch => Ok(Engine { kind: EngineKind::OpenSearch, version: String::new() }),
            EngineSetting::Auto => {
                let body = self.root().await?;
                let value: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| SinkError::Protocol(format!("unreadable GET / answer: {e}")))?;
                Engine::from_root(&value)
            }
        }
    }

    /// Whether the cluster runs painless scripts, which guarded updates need
    /// (`state.late_parts = "update"`): `Ok(false)` when it refuses them, an error when it
    /// cannot be told (no answer, or no right to the execute API).
    pub async fn runs_painless(&self) -> Result<bool, SinkError> {
        let probe = serde_json::json!({"script": {"lang": "painless", "source": "params.x + 1", "params": {"x": 1}}});
        let response = self
            .client
            .send(
                Method::Post,
                "/_scripts/painless/_execute",
                Default::default(),
                Option::<&()>::None,
                Some(serde_json::to_vec(&probe).expect("a JSON value serialises")),
                Some(self.timeout),
            )
            .await
            .map_err(|e| SinkError::Transport(with_causes(&e)))?;
        let status = response.status_code();
        let body = response.bytes().await.map_err(|e| SinkError::Transport(with_causes(&e)))?;
        match status.as_u16() {
            200..=299 => Ok(true),
            // No painless (a missing module, or scripts disabled): the API refuses the script.
            400 => Ok(false),
            _ => Err(request_error(status, &body)),
        }
    }

    /// Whether the cluster answers.
    pub async fn ping(&self) -> Result<(), SinkError> {
        self.root().await.map(|_| ())
    }

    /// `GET /`: the cluster's name and version.
    async fn root(&self) -> Result<Bytes, SinkError> {
        let response = self
            .client
            .send(Method::Get, "/", Default::default(), Option::<&()>::None, Option::<&[u8]>::None, Some(self.timeout))
            .await
            .map_err(|e| SinkError::Transport(with_causes(&e)))?;
        let status = response.status_code();
        let body = response.bytes().await.map_err(|e| SinkError::Transport(with_causes(&e)))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(request_error(status, &body))
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
    result: Option<String>,
}

#[derive(Deserialize)]
struct ItemError {
    #[serde(rename = "type")]
    kind: String,
    reason: Option<String>,
}

/// The body of a successful answer; a failed one as the error it describes.
async fn answer(
    sent: Result<elasticsearch::http::response::Response, elasticsearch::Error>,
) -> Result<Bytes, SinkError> {
    let response = sent.map_err(|e| SinkError::Transport(with_causes(&e)))?;
    let status = response.status_code();
    let bytes = response.bytes().await.map_err(|e| SinkError::Transport(with_causes(&e)))?;
    if !status.is_success() {
        return Err(request_error(status, &bytes));
    }
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn a_strict_mapping_must_have_the_parts_field() {
        let strict = serde_json::json!({"dynamic": "strict", "properties": {"id": {"type": "keyword"}}});
        assert!(parts_field_problem(&strict).unwrap_err().contains("_parts"));
        let with =
            serde_json::json!({"dynamic": "strict", "properties": {"_parts": {"type": "object", "enabled": false}}});
        assert_eq!(parts_field_problem(&with), Ok(()));
        assert_eq!(parts_field_problem(&serde_json::json!({"properties": {}})), Ok(()), "dynamic: maps it itself");
        let ours = index_body(
            EngineKind::Elasticsearch,
            &Schema::new(&crate::config::Settings::defaults().parts),
            Similarity::Cosine,
            false,
        );
        assert_eq!(ours["mappings"]["properties"]["_parts"]["enabled"], false, "stored, not indexed");
    }

    #[test]
    fn an_existing_mapping_that_disagrees_is_named_field_by_field() {
        let schema = Schema::new(&crate::config::Settings::defaults().parts);
        let ours = index_body(EngineKind::Elasticsearch, &schema, Similarity::Cosine, true);
        let props = &ours["mappings"]["properties"];
        assert_eq!(mapping_problems(EngineKind::Elasticsearch, &schema, Similarity::Cosine, props), Ok(()));
        let err = mapping_problems(EngineKind::Elasticsearch, &schema, Similarity::DotProduct, props).unwrap_err();
        assert!(
            err.contains("`text_embedding` (part EMBEDDINGS_TEXT) uses similarity cosine, dot_product configured"),
            "{err}"
        );
        let mut other = props.clone();
        other["image_embedding"]["dims"] = serde_json::json!(256);
        other["text_embedding"] = serde_json::json!({"type": "float"});
        let err = mapping_problems(EngineKind::Elasticsearch, &schema, Similarity::Cosine, &other).unwrap_err();
        assert!(
            err.contains("`text_embedding` (part EMBEDDINGS_TEXT) is mapped as \"float\", not dense_vector"),
            "{err}"
        );
        assert!(
            err.contains("`image_embedding` (part EMBEDDINGS_IMAGE) has 256 dimensions in the index, 512 configured"),
            "{err}"
        );
        let os = index_body(EngineKind::OpenSearch, &schema, Similarity::Cosine, true);
        assert_eq!(
            mapping_problems(EngineKind::OpenSearch, &schema, Similarity::Cosine, &os["mappings"]["properties"]),
            Ok(())
        );
        assert_eq!(
            mapping_problems(EngineKind::Elasticsearch, &schema, Similarity::Cosine, &serde_json::Value::Null),
            Ok(())
        );
    }

    #[test]
    fn root_answers_tell_the_engines_apart() {
        let es = serde_json::json!({"version": {"number": "8.17.0", "build_flavor": "default"}});
        let os = serde_json::json!({"version": {"distribution": "opensearch", "number": "2.19.1"}});
        assert_eq!(
            Engine::from_root(&es).unwrap(),
            Engine { kind: EngineKind::Elasticsearch, version: "8.17.0".into() }
        );
        assert_eq!(Engine::from_root(&os).unwrap().to_string(), "OpenSearch 2.19.1");
        assert!(Engine::from_root(&serde_json::json!({"ok": true})).is_err());
    }

    #[test]
    fn each_engine_gets_its_own_vector_mapping() {
        let settings = Settings::defaults();
        let schema = Schema::new(&settings.parts);
        let part = &schema.parts()[0];
        let es = index_body(EngineKind::Elasticsearch, &schema, Similarity::Cosine, true);
        assert_eq!(
            es["mappings"]["properties"][&part.field],
            serde_json::json!({"type": "dense_vector", "dims": part.dims, "index": true, "similarity": "cosine"})
        );
        assert!(es.get("settings").is_none());
        let os = index_body(EngineKind::OpenSearch, &schema, Similarity::L2Norm, true);
        assert_eq!(os["settings"]["index"]["knn"], true);
        assert_eq!(
            os["mappings"]["properties"][&part.field],
            serde_json::json!({"type": "knn_vector", "dimension": part.dims,
                "method": {"name": "hnsw", "engine": "lucene", "space_type": "l2"}})
        );
        let stored = index_body(EngineKind::Elasticsearch, &schema, Similarity::Cosine, false);
        assert_eq!(stored["mappings"]["properties"][&part.field]["index"], false);
    }
}
