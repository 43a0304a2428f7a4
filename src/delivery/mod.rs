//! The journey of every completed document, owned in one place: from the moment an item
//! completes (in a shard's memory, in the state store, or as an orphan swept from it) to
//! exactly one end:
//!
//! - **Indexed**: the sink took it (a 2xx item).
//! - **Superseded**: the sink holds a newer version of the id (a 409 version conflict: the
//!   index never goes back), or a newer completion replaced it in the outbox.
//! - **Dead-lettered**: the document itself is wrong (a 4xx item other than 409/429), or
//!   it is an orphan the settings send to the dead letters; stored with its reason.
//! - **Parked**: shutdown's deadline passed before the sink took it; it waits in the state
//!   store's outbox and is delivered by the next start (of any instance).
//!
//! Settling an end confirms the document's outbox entry (by version) and releases the
//! requests waiting on it (`persisted` mode). Documents that completed in the store are
//! delivered under a lease ([`InFlight`] renews it every maintenance interval), so no
//! other instance resends them while their delivery is alive; when an instance dies, its
//! leases lapse and any instance resends them.
//!
//! Modules: [`writer`] batches documents into bulk requests, [`request`] delivers one
//! request until each of its documents reaches an end, [`settle`] records the ends, and
//! [`outbox`] is the maintenance actor (lease renewal, resends, orphan sweep). Imports run
//! one way: `delivery` uses `state` (to settle) and `sink` (to send); neither imports it.

pub mod concurrency;
pub mod outbox;
pub mod request;
pub mod settle;
pub mod writer;

use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use prometheus_client::metrics::gauge::Gauge;

pub use writer::{BulkWriter, Slot, WriterClosed, WriterHandle};

/// The end a document reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Indexed,
    /// Newer copies of some parts were written into the indexed document.
    Updated,
    /// An update found no document (deleted from the index): its parts wait in the store
    /// for the others as a new item.
    Reopened,
    Superseded,
    DeadLettered,
    Parked,
}

impl End {
    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            End::Indexed => "indexed",
            End::Updated => "updated",
            End::Reopened => "reopened",
            End::Superseded => "superseded",
            End::DeadLettered => "dead_lettered",
            End::Parked => "parked",
        }
    }
}

/// Outbox entries this instance is delivering: id -> version. The maintenance actor
/// renews their leases, and leaves them out when it claims lapsed entries.
#[derive(Clone, Default)]
pub struct InFlight(Arc<DashMap<String, u64>>);

impl InFlight {
    /// Marks a delivery of `id` at `version` as started.
    pub fn start(&self, id: &str, version: u64) {
        self.0.entry(id.to_owned()).and_modify(|v| *v = (*v).max(version)).or_insert(version);
    }

    /// Marks it ended (unless a newer version of the id is being delivered).
    pub fn end(&self, id: &str, version: u64) {
        self.0.remove_if(id, |_, v| *v <= version);
    }

    /// Whether this instance delivers `id` at `version` or newer already.
    pub fn covers(&self, id: &str, version: u64) -> bool {
        self.0.get(id).is_some_and(|v| *v >= version)
    }

    /// The ids being delivered.
    pub fn ids(&self) -> Vec<String> {
        self.0.iter().map(|e| e.key().clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether delivery is stalled because the cluster refuses us rather than our documents
/// (401/403, a missing index), and why: `/ready` answers 503 with the reason meanwhile.
#[derive(Clone)]
pub struct SinkHealth {
    stalled: Arc<Mutex<Option<String>>>,
    gauge: Gauge,
}

impl SinkHealth {
    pub fn new(gauge: Gauge) -> SinkHealth {
        SinkHealth { stalled: Arc::new(Mutex::new(None)), gauge }
    }

    /// The reason delivery is stalled, if it is.
    pub fn stalled(&self) -> Option<String> {
        self.lock().clone()
    }

    /// Delivery is stalled; logged at ERROR when it starts (an operator must act).
    pub fn stall(&self, reason: String) {
        let mut stalled = self.lock();
        if stalled.is_none() {
            tracing::error!(%reason, "Delivery stalled: the cluster refuses embedjoin (credentials, privileges or a missing index); every document is kept and retried until it is taken.");
            self.gauge.set(1);
        }
        *stalled = Some(reason);
    }

    /// The cluster took a request again.
    pub fn recover(&self) {
        let mut stalled = self.lock();
        if let Some(reason) = stalled.take() {
            tracing::info!(was = %reason, "Delivery resumed.");
            self.gauge.set(0);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.stalled.lock().unwrap_or_else(|e| e.into_inner())
    }
}
