//! Typed settings, loaded in layers: `config/default.toml` (compiled in, the one place
//! where defaults live), then an optional file given with `--config`, then
//! `EMBEDJOIN__SECTION__KEY` environment variables.
//!
//! [`Settings::load`] validates everything before the service starts; an error names the
//! offending key and says why it is wrong.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// The defaults, compiled into the binary so it runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "EMBEDJOIN";

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file or variable could not be read or parsed.
    #[error("cannot load settings: {0}")]
    Load(#[from] config::ConfigError),
    /// A value was read but is not acceptable.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

/// All of embedjoin's settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The parts that make an item complete, in the order they appear in documents.
    pub parts: Vec<PartSettings>,
    pub http: HttpSettings,
    pub shards: ShardSettings,
    pub durability: DurabilitySettings,
    pub state: StateSettings,
    pub redis: RedisSettings,
    pub embedded: EmbeddedSettings,
    pub sink: SinkSettings,
    pub elasticsearch: ElasticsearchSettings,
    pub file: FileSettings,
    pub log: LogSettings,
}

/// One required part of a document.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartSettings {
    /// The `embedding_type` clients send, e.g. `EMBEDDINGS_TEXT`.
    pub type_name: String,
    /// The document field it fills, e.g. `text_embedding`.
    pub field: String,
    /// Number of floats in the vector.
    pub dims: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on; port 0 picks a free port.
    pub bind: String,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most items in one request.
    pub max_batch_items: usize,
    /// Longest id, in bytes.
    pub max_id_bytes: usize,
    /// actix-web workers; 0 means one per core.
    pub workers: usize,
    /// Longest a request may take to send its body (and its headers); then 408 and the
    /// connection is closed, so slow clients cannot hold connections and buffers.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Largest `metadata` of one item, measured as serialized JSON.
    pub max_metadata_bytes: usize,
    /// When set, `POST /aggregate*` and `GET /documents/*` need `Authorization: Bearer
    /// <token>`; empty leaves them open.
    pub auth_token: Secret,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSettings {
    /// Number of shard actors; 0 means one per core.
    pub count: usize,
    /// Bound of each shard's mailbox, in messages.
    pub mailbox_capacity: usize,
    /// Period of the persist-and-reconcile flush.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Dirty partials that trigger an early flush.
    pub max_dirty: usize,
    /// Vector bytes of partials held in memory, over all shards, above which ingress sheds load.
    pub max_resident_bytes: usize,
}

/// When a request is acknowledged.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Once the parts are queued in memory.
    Accepted,
    /// Once every part is in the state store, or its document confirmed by the sink.
    Persisted,
}

/// What happens to a partial that never completes.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OrphanAction {
    Drop,
    DeadLetter,
    /// Index what is there, marked `"incomplete": true` with its `missing_parts`.
    Index,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DurabilitySettings {
    pub ack: AckMode,
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub enqueue_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub outbox_resend_after: Duration,
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    pub orphans: OrphanAction,
    /// Most dead letters the state store keeps; the oldest go first (counted, logged at ERROR).
    pub dead_letter_max: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    Redis,
    /// An on-disk store inside the process: no server, one instance per store file.
    Embedded,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    pub backend: StateBackend,
    /// How long the store remembers a completed item (its parts' stamps, no vectors), so
    /// that an older copy or a re-applied merge arriving later changes nothing.
    #[serde(with = "humantime_serde")]
    pub remember_completed: Duration,
    /// What a newer copy of a part does when its item was completed (and is remembered).
    pub late_parts: LatePartsAction,
}

/// What a newer copy of a part does once its item was completed.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LatePartsAction {
    /// It updates the indexed document: that part (and its metadata) only, never replacing
    /// a newer part, with a guarded partial `update` (a painless script).
    Update,
    /// It starts a new item, which completes (and replaces the document) only when every
    /// part comes again. Needs no scripting in the search engine.
    NewItem,
}

/// `Debug` shows what `Serialize` shows (the URL without its password).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS: one node, or a
    /// primary with replicas. Unused when `cluster_nodes` is set.
    #[serde(serialize_with = "crate::secret::serialize_url")]
    pub url: String,
    /// Seed nodes of a Redis Cluster (`redis://` or `rediss://` URLs, credentials in
    /// them); when set, embedjoin runs in cluster mode.
    #[serde(serialize_with = "crate::secret::serialize_urls")]
    pub cluster_nodes: Vec<String>,
    /// Virtual buckets items are spread over (see `state::redis::keys`): fixed for the
    /// life of the stored data.
    pub buckets: u32,
    /// With `durability.ack = "persisted"`, a flush counts as durable only once this many
    /// replicas of each master it wrote to have it (`WAIT`); 0 does not wait.
    pub wait_replicas: usize,
    /// How long a flush waits for `wait_replicas`; then it fails and is retried.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Prefix of every key embedjoin writes.
    pub key_prefix: String,
    /// Time after which an incomplete partial expires.
    #[serde(with = "humantime_serde")]
    pub partial_ttl: Duration,
    /// List (under the prefix) that receives dead-lettered documents.
    pub dead_letter_key: String,
    /// About how many hashes share the records of completed items (see `state::records`),
    /// rounded up to a multiple of `buckets`: a hash stays compact up to Redis's
    /// `hash-max-listpack-entries`.
    pub record_buckets: u32,
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
}

/// The embedded state store (`state.backend = "embedded"`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedSettings {
    /// The store's file; it and its directory are created if missing.
    pub path: std::path::PathBuf,
    /// Time after which an incomplete partial is taken by the orphan sweeper.
    #[serde(with = "humantime_serde")]
    pub partial_ttl: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SinkBackend {
    Elasticsearch,
    /// Appends `_bulk` NDJSON to rotated files, to load into Elasticsearch later.
    File,
    /// Discards documents (every item acknowledged, no I/O), for benchmarks.
    Null,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    pub backend: SinkBackend,
}

/// The file sink (`sink.backend = "file"`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// Directory of the `embedjoin-NNNNNN.ndjson` files; created if missing.
    pub dir: std::path::PathBuf,
    /// A file is closed and the next one started before a batch would take it past this
    /// size (a batch larger than this goes alone into a file).
    pub max_bytes: u64,
}

/// dense_vector similarity functions Elasticsearch knows.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Similarity {
    Cosine,
    DotProduct,
    L2Norm,
    MaxInnerProduct,
}

impl Similarity {
    pub fn as_str(self) -> &'static str {
        match self {
            Similarity::Cosine => "cosine",
            Similarity::DotProduct => "dot_product",
            Similarity::L2Norm => "l2_norm",
            Similarity::MaxInnerProduct => "max_inner_product",
        }
    }
}

/// The search engine behind `elasticsearch.url`: they share `_bulk` but map vectors
/// differently (`dense_vector` or `knn_vector`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EngineSetting {
    /// Told by the cluster's `GET /` at start.
    Auto,
    Elasticsearch,
    Opensearch,
}

/// `Debug` shows what `Serialize` shows (no password, no API key).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticsearchSettings {
    #[serde(serialize_with = "crate::secret::serialize_url")]
    pub url: String,
    pub index: String,
    /// Create the index with vector mappings at start unless it exists.
    pub create_index: bool,
    pub similarity: Similarity,
    /// Which engine the cluster runs, for the index mappings; `auto` reads `GET /`.
    pub engine: EngineSetting,
    /// Build a vector index (HNSW) for kNN search; `false` only stores the vectors.
    pub index_vectors: bool,
    pub username: String,
    pub password: Secret,
    pub api_key: Secret,
    /// Documents per bulk request, at most.
    pub bulk_max_docs: usize,
    /// Bytes per bulk request body, at most (one larger document still goes alone).
    pub bulk_max_bytes: usize,
    /// Longest a document waits for its bulk request to fill.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Most bulk requests in flight at once; the adaptive limit moves between 1 and this.
    pub requests_in_flight: usize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a document that the cluster keeps refusing for a busy or unavailable
    /// reason (429, 5xx, no answer, 401/403, a missing index) is retried before it is
    /// dead-lettered; `None` (the default): until it is taken, or parked at shutdown.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub retry_for: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Item statuses that are retried.
    pub retry_statuses: Vec<u16>,
    /// Gzip request bodies.
    pub compression: bool,
    /// How vectors are written in documents.
    pub vector_encoding: VectorEncoding,
}

/// How vectors are written into documents sent to Elasticsearch.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VectorEncoding {
    /// JSON arrays of numbers: every version of Elasticsearch and OpenSearch.
    Array,
    /// Base64 of big-endian float32 bytes: Elasticsearch 9.3+ only; cheaper to produce and
    /// about a third of the size.
    Base64,
}

// By hand, through `Serialize`, so that a URL's password never reaches `{:?}` (a field added
// later is covered without anyone remembering to redact it).
impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_as_serialized("RedisSettings", self, f)
    }
}

impl std::fmt::Debug for ElasticsearchSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_as_serialized("ElasticsearchSettings", self, f)
    }
}

fn redis_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let parsed = url::Url::parse(value).map_err(|e| invalid(key, format!("cannot parse `{value}`: {e}")))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err(invalid(key, "must start with redis:// or rediss://"));
    }
    Ok(())
}

fn debug_as_serialized<T: Serialize>(name: &str, value: &T, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    match serde_json::to_value(value) {
        Ok(shown) => write!(f, "{name} {shown}"),
        Err(_) => write!(f, "{name} {{ .. }}"),
    }
}

/// Where a secret lives in the settings.
type SecretField = fn(&mut Settings) -> &mut Secret;

/// Settings that hold secrets, with the environment variable that sets each. They are
/// read from the environment verbatim: `try_parsing` would turn a token like `0123` into
/// the number 123 and `TRUE` into `true`.
const SECRET_ENV: &[(&str, SecretField)] = &[
    ("EMBEDJOIN__HTTP__AUTH_TOKEN", |s| &mut s.http.auth_token),
    ("EMBEDJOIN__ELASTICSEARCH__PASSWORD", |s| &mut s.elasticsearch.password),
    ("EMBEDJOIN__ELASTICSEARCH__API_KEY", |s| &mut s.elasticsearch.api_key),
];

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Settings {
    /// Loads defaults, then `file` if given, then `EMBEDJOIN__*` variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("elasticsearch.retry_statuses")
            .with_list_parse_key("redis.cluster_nodes");
        let mut settings: Settings = builder.add_source(env).build()?.try_deserialize()?;
        for (var, field) in SECRET_ENV {
            if let Ok(value) = std::env::var(var) {
                *field(&mut settings) = Secret::new(value);
            }
        }
        settings.validate()?;
        Ok(settings)
    }

    /// The compiled-in defaults, validated. Tests start from these.
    pub fn defaults() -> Settings {
        Settings::load_from_str(DEFAULT_TOML).expect("the compiled-in defaults are valid")
    }

    /// Loads settings from TOML text layered over the defaults (no environment).
    pub fn load_from_str(toml: &str) -> Result<Settings, ConfigError> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml))
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value that the types alone do not constrain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.parts.is_empty() {
            return Err(invalid("parts", "at least one part is required"));
        }
        if self.parts.len() > crate::model::MAX_PARTS {
            return Err(invalid("parts", format!("at most {} parts are supported", crate::model::MAX_PARTS)));
        }
        let (mut types, mut fields) = (HashSet::new(), HashSet::new());
        for (i, part) in self.parts.iter().enumerate() {
            let key = |k: &str| format!("parts[{i}].{k}");
            if part.type_name.is_empty() {
                return Err(invalid(key("type_name"), "must not be empty"));
            }
            if !types.insert(&part.type_name) {
                return Err(invalid(key("type_name"), format!("`{}` is listed twice", part.type_name)));
            }
            if part.field.is_empty() || part.field.starts_with('_') || part.field.contains('.') {
                return Err(invalid(key("field"), "must be a non-empty name without a leading `_` or a `.`"));
            }
            if crate::model::RESERVED_FIELDS.contains(&part.field.as_str()) {
                return Err(invalid(key("field"), format!("`{}` is reserved", part.field)));
            }
            if !fields.insert(&part.field) {
                return Err(invalid(key("field"), format!("`{}` is used by two parts", part.field)));
            }
            if part.dims == 0 || part.dims > 4096 {
                return Err(invalid(key("dims"), "must be between 1 and 4096 (Elasticsearch's dense_vector limit)"));
            }
        }
        self.http
            .bind
            .parse::<std::net::SocketAddr>()
            .map_err(|e| invalid("http.bind", format!("`{}` is not an address:port ({e})", self.http.bind)))?;
        positive("http.max_body_bytes", self.http.max_body_bytes)?;
        positive("http.max_batch_items", self.http.max_batch_items)?;
        if !(1..=512).contains(&self.http.max_id_bytes) {
            return Err(invalid("http.max_id_bytes", "must be between 1 and 512"));
        }
        nonzero_duration("http.body_timeout", self.http.body_timeout)?;
        positive("http.max_metadata_bytes", self.http.max_metadata_bytes)?;
        // It travels in a header: RFC 6750's token68 characters, no spaces.
        let token_char = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
        if !self.http.auth_token.expose().chars().all(token_char) {
            return Err(invalid(
                "http.auth_token",
                "may only hold letters, digits and - . _ ~ + / = (it is sent in an HTTP header)",
            ));
        }
        positive("shards.mailbox_capacity", self.shards.mailbox_capacity)?;
        positive("shards.max_dirty", self.shards.max_dirty)?;
        positive("shards.max_resident_bytes", self.shards.max_resident_bytes)?;
        let d = &self.durability;
        nonzero_duration("durability.ack_timeout", d.ack_timeout)?;
        nonzero_duration("durability.enqueue_timeout", d.enqueue_timeout)?;
        nonzero_duration("durability.maintenance_interval", d.maintenance_interval)?;
        nonzero_duration("durability.outbox_resend_after", d.outbox_resend_after)?;
        positive("durability.dead_letter_max", d.dead_letter_max)?;
        if d.maintenance_interval.saturating_mul(2) > d.outbox_resend_after {
            return Err(invalid(
                "durability.outbox_resend_after",
                "must be at least twice durability.maintenance_interval (leases are renewed every interval)",
            ));
        }
        nonzero_duration("state.remember_completed", self.state.remember_completed)?;
        nonzero_duration("shards.flush_interval", self.shards.flush_interval)?;
        if self.shards.count > 4096 {
            return Err(invalid("shards.count", "must be at most 4096"));
        }

        redis_url("redis.url", &self.redis.url)?;
        for node in &self.redis.cluster_nodes {
            redis_url("redis.cluster_nodes", node)?;
        }
        if !(1..=16384).contains(&self.redis.buckets) {
            return Err(invalid("redis.buckets", "must be between 1 and 16384 (Redis Cluster's slots)"));
        }
        nonzero_duration("redis.wait_timeout", self.redis.wait_timeout)?;
        if self.redis.key_prefix.contains(['{', '}']) {
            return Err(invalid("redis.key_prefix", "must not contain `{` or `}` (they delimit the cluster hash tag)"));
        }
        if !(1..=1 << 20).contains(&self.redis.record_buckets) {
            return Err(invalid("redis.record_buckets", "must be between 1 and 1048576"));
        }
        if self.redis.partial_ttl < Duration::from_secs(1) {
            return Err(invalid("redis.partial_ttl", "must be at least 1s"));
        }
        nonzero_duration("redis.response_timeout", self.redis.response_timeout)?;
        nonzero_duration("redis.connection_timeout", self.redis.connection_timeout)?;
        if self.embedded.path.as_os_str().is_empty() {
            return Err(invalid("embedded.path", "must not be empty"));
        }
        if self.embedded.partial_ttl < Duration::from_secs(1) {
            return Err(invalid("embedded.partial_ttl", "must be at least 1s"));
        }
        if self.file.dir.as_os_str().is_empty() {
            return Err(invalid("file.dir", "must not be empty"));
        }
        if self.file.max_bytes == 0 {
            return Err(invalid("file.max_bytes", "must be greater than 0"));
        }

        let es = &self.elasticsearch;
        let es_url =
            url::Url::parse(&es.url).map_err(|e| invalid("elasticsearch.url", format!("cannot parse: {e}")))?;
        if !matches!(es_url.scheme(), "http" | "https") {
            return Err(invalid("elasticsearch.url", "must start with http:// or https://"));
        }
        if es.index.is_empty()
            || es.index != es.index.to_lowercase()
            || es.index.starts_with(['_', '-', '+'])
            || es.index.contains(['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':'])
        {
            return Err(invalid("elasticsearch.index", format!("`{}` is not a valid index name", es.index)));
        }
        if !es.api_key.is_empty() && !es.username.is_empty() {
            return Err(invalid("elasticsearch.api_key", "set either api_key or username/password, not both"));
        }
        positive("elasticsearch.bulk_max_docs", es.bulk_max_docs)?;
        positive("elasticsearch.bulk_max_bytes", es.bulk_max_bytes)?;
        positive("elasticsearch.requests_in_flight", es.requests_in_flight)?;
        nonzero_duration("elasticsearch.flush_interval", es.flush_interval)?;
        nonzero_duration("elasticsearch.request_timeout", es.request_timeout)?;
        nonzero_duration("elasticsearch.retry_initial_backoff", es.retry_initial_backoff)?;
        if es.retry_max_backoff < es.retry_initial_backoff {
            return Err(invalid("elasticsearch.retry_max_backoff", "must be at least retry_initial_backoff"));
        }
        if let Some(s) = es.retry_statuses.iter().find(|s| !(400..600).contains(*s)) {
            return Err(invalid("elasticsearch.retry_statuses", format!("{s} is not an HTTP error status")));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }

    /// Time after which the configured state backend's incomplete partials are orphans.
    pub fn partial_ttl(&self) -> Duration {
        match self.state.backend {
            StateBackend::Redis => self.redis.partial_ttl,
            StateBackend::Embedded => self.embedded.partial_ttl,
        }
    }

    /// Number of shards, with 0 resolved to the number of cores.
    pub fn shard_count(&self) -> usize {
        if self.shards.count == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            self.shards.count
        }
    }
}

fn positive(key: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(())
}

fn nonzero_duration(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(toml: &str) -> String {
        Settings::load_from_str(toml).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::defaults();
        assert_eq!(s.parts.len(), 2);
        assert_eq!(s.parts[0].dims, 384);
    }

    #[test]
    fn errors_name_the_bad_key() {
        assert!(error_of("[shards]\nmailbox_capacity = 0").contains("shards.mailbox_capacity"));
        assert!(error_of("[[parts]]\ntype_name='A'\nfield='a'\ndims=0").contains("parts[0].dims"));
        let two_fields = "[[parts]]\ntype_name='A'\nfield='x'\ndims=3\n[[parts]]\ntype_name='B'\nfield='x'\ndims=3";
        assert!(error_of(two_fields).contains("parts[1].field"));
        assert!(error_of("[redis]\nurl = 'http://x'").contains("redis.url"));
        assert!(error_of("[elasticsearch]\nurl = 'not a url'").contains("elasticsearch.url"));
        assert!(error_of("[http]\nbind = 'nowhere'").contains("http.bind"));
        assert!(error_of("[shards]\nflush_interval = 'soon'").contains("flush_interval"));
    }

    #[test]
    fn a_parts_list_replaces_the_default_one() {
        let s = Settings::load_from_str("[[parts]]\ntype_name='A'\nfield='a'\ndims=3").unwrap();
        assert_eq!(s.parts, vec![PartSettings { type_name: "A".into(), field: "a".into(), dims: 3 }]);
    }

    #[test]
    fn debug_and_serialize_never_show_secrets() {
        let mut s = Settings::defaults();
        s.redis.url = "redis://user:redis-pw@cache:6390".into();
        s.elasticsearch.url = "https://elastic:url-pw@es:9200".into();
        s.elasticsearch.password = Secret::new("es-pw");
        s.elasticsearch.api_key = Secret::new("es-key");
        s.http.auth_token = Secret::new("bearer-tok");
        let shown = format!("{s:?} {}", serde_json::to_string(&s).unwrap());
        for secret in ["redis-pw", "url-pw", "es-pw", "es-key", "bearer-tok"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("cache:6390") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn an_auth_token_must_fit_in_a_header() {
        assert!(Settings::load_from_str("[http]\nauth_token = 'abc-DEF_123.~+/='").is_ok());
        assert!(error_of("[http]\nauth_token = 'has space'").contains("http.auth_token"));
    }

    #[test]
    fn the_defaults_need_no_server_and_the_backends_settings_are_checked() {
        let s = Settings::defaults();
        assert_eq!((s.state.backend, s.sink.backend), (StateBackend::Embedded, SinkBackend::File));
        assert_eq!(s.partial_ttl(), s.embedded.partial_ttl);
        let redis = Settings::load_from_str("[state]\nbackend = 'redis'\n[redis]\npartial_ttl = '5m'").unwrap();
        assert_eq!(redis.partial_ttl(), Duration::from_secs(300));
        assert!(error_of("[embedded]\npath = ''").contains("embedded.path"));
        assert!(error_of("[embedded]\npartial_ttl = '10ms'").contains("embedded.partial_ttl"));
        assert!(error_of("[file]\ndir = ''").contains("file.dir"));
        assert!(error_of("[file]\nmax_bytes = 0").contains("file.max_bytes"));
        assert!(error_of("[state]\nbackend = 'sqlite'").contains("sqlite"));
        for file in [include_str!("../config/local.toml"), include_str!("../config/production.toml")] {
            let s = Settings::load_from_str(file).unwrap();
            assert_eq!((s.state.backend, s.sink.backend), (StateBackend::Redis, SinkBackend::Elasticsearch));
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(error_of("[shards]\ncont = 3").contains("cont"));
    }
}
