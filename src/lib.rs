//! embedjoin joins the parts of an item that arrive separately (a text embedding, an
//! image embedding, ...) into one complete document, and writes it once to Elasticsearch.
//!
//! How the parts fit:
//!
//! ```text
//! http (actix-web ingress, validation by model::ingest)
//!   -> shard::Router: shard = hash(id) % shards
//!      -> shard::ShardActor (owns its partials; completes in memory when it can;
//!         every flush interval merges dirty partials into the state store in one
//!         batch, and gets back the items that became complete there, in its outbox)
//!      -> delivery::BulkWriter (batches into _bulk requests; each document reaches one
//!         end: indexed, superseded, dead-lettered or parked)
//!         -> sink::SinkClient (Elasticsearch, NDJSON files, or null)
//!   delivery::outbox::Maintenance (per instance: renews delivery leases, resends lapsed
//!   outbox entries, sweeps orphans)
//! ```
//!
//! - [`config`]: typed settings and their validation; defaults in `config/default.toml`.
//! - [`model`]: the parts, the request contract, documents.
//! - [`state`]: the state store (Redis, or embedded on disk): atomic per-item merges by
//!   part stamps, completion records, the outbox, orphans, dead letters. Storage only.
//! - [`delivery`]: every completed document's journey to exactly one end.
//! - [`sink`]: sending bulk requests (Elasticsearch, `_bulk` files, null).
//! - [`metrics`]: every exported metric, defined in one place.
//! - [`app`]: assembles everything; [`shutdown`] and [`telemetry`] serve the binary.
//! - [`bench`]: `embedjoin bench`, the in-process (or `--http`) benchmark.
//! - [`check`]: `embedjoin check`, which validates the settings and reaches each backend.
//! - [`dead_letters`]: `embedjoin dead-letters list|replay`, for documents the sink refused.
//! - [`secret`]: secrets in settings, and how they stay out of logs and printed configs.

pub mod app;
pub mod bench;
pub mod check;
pub mod config;
pub mod dead_letters;
pub mod delivery;
pub mod http;
pub mod metrics;
pub mod model;
pub mod secret;
pub mod shard;
pub mod shutdown;
pub mod sink;
pub mod state;
pub mod telemetry;

pub use app::{Application, Pipeline};
pub use config::Settings;
