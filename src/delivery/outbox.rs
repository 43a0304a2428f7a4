//! The maintenance actor: one per instance, every `durability.maintenance_interval`:
//!
//! - renews the leases of the outbox entries this instance is delivering, so that no other
//!   instance resends them while their delivery is alive (one delivery at a time);
//! - claims outbox entries whose lease lapsed (their instance died, or a previous run of
//!   this one parked them) and sends them to the writer;
//! - sweeps orphans: parts that waited longer than the partial TTL; per
//!   `durability.orphans` they are dropped (logged with their ids), or moved to the outbox
//!   and delivered like any document (indexed marked incomplete, or dead-lettered);
//! - checks that the state store still holds what it held (a Redis restarted without its
//!   data loses every stored partial and outbox entry: an ERROR, counted).
//!
//! It stops when the pipeline's cancel token fires, before the writer drains.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{InFlight, WriterHandle};
use crate::config::{OrphanAction, Settings};
use crate::metrics::Metrics;
use crate::model::Document;
use crate::state::{DeadLetter, StateError, StateStore, Swept};

/// Most entries handled per kind and round.
const ROUND_LIMIT: usize = 500;

pub struct Maintenance {
    store: StateStore,
    writer: WriterHandle,
    outbox: InFlight,
    metrics: Arc<Metrics>,
    interval: Duration,
    lease: Duration,
    orphan_after: Duration,
    orphans: OrphanAction,
    cancel: CancellationToken,
}

/// How long shutdown waits to hand this instance's buckets on.
const RELEASE_WITHIN: Duration = Duration::from_secs(1);

impl Maintenance {
    pub fn spawn(
        settings: &Settings,
        store: StateStore,
        writer: WriterHandle,
        outbox: InFlight,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let actor = Maintenance {
            store,
            writer,
            outbox,
            metrics,
            interval: settings.durability.maintenance_interval,
            lease: settings.durability.outbox_resend_after,
            orphan_after: settings.partial_ttl(),
            orphans: settings.durability.orphans,
            cancel,
        };
        tokio::spawn(actor.run())
    }

    async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "State store maintenance failed; it runs again next interval.");
            }
        }
        // The other instances take this one's buckets at once, rather than when its
        // leases lapse.
        let released = tokio::time::timeout(RELEASE_WITHIN, self.store.release_share()).await;
        if let Err(e) = released
            .map_err(|_| format!("no answer within {RELEASE_WITHIN:?}"))
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!(error = %e, "Could not release this instance's share of the maintenance; it lapses by itself.");
        }
    }

    async fn round(&self) -> Result<(), StateError> {
        if self.store.check_epoch().await? {
            self.metrics.state_resets.inc();
            tracing::error!("The state store lost its data (restarted without persistence, or flushed): persisted partials and unconfirmed documents stored before are gone. Run Redis with appendonly yes.");
        }
        self.metrics.outbox_in_flight.set(self.outbox.len() as i64);
        self.store.renew(&self.outbox.ids(), self.lease).await?;
        self.store.take_share(self.interval).await?;
        loop {
            let claimed = self.store.claim_outbox(self.lease, ROUND_LIMIT).await?;
            let n = claimed.len();
            let docs = self.readable(claimed).await;
            // A lapsed lease of our own (renewal failed for a while): its delivery goes on.
            let docs: Vec<Document> = docs.into_iter().filter(|d| !self.outbox.covers(&d.id, d.version())).collect();
            if !docs.is_empty() {
                self.metrics.outbox_resent.inc_by(docs.len() as u64);
                tracing::info!(documents = docs.len(), "Resending completed documents whose delivery lease lapsed.");
                if !self.send(docs).await {
                    return Ok(()); // shutting down; their leases lapse and they are resent
                }
            }
            if n < ROUND_LIMIT || self.cancel.is_cancelled() {
                break;
            }
        }
        let deliver = (self.orphans != OrphanAction::Drop).then_some(self.lease);
        loop {
            let swept = self.store.sweep_orphans(self.orphan_after, ROUND_LIMIT, deliver).await?;
            let n = swept.len();
            let orphans = self.readable(swept).await;
            self.metrics.orphans_expired.inc_by(orphans.len() as u64);
            if deliver.is_none() {
                if !orphans.is_empty() {
                    let ids: Vec<&str> = orphans.iter().map(|o| o.id.as_str()).collect();
                    tracing::info!(count = ids.len(), ?ids, "Dropped partial items that did not complete in time.");
                }
            } else if !orphans.is_empty() && !self.send(orphans).await {
                return Ok(()); // in the outbox: delivered after their lease lapses
            }
            if n < ROUND_LIMIT || self.cancel.is_cancelled() {
                break;
            }
        }
        Ok(())
    }

    /// Hands documents to the writer unless shutdown starts first (they are in the outbox
    /// either way); `false` if it did.
    async fn send(&self, docs: Vec<Document>) -> bool {
        tokio::select! {
            sent = self.writer.send(docs) => sent.is_ok(),
            _ = self.cancel.cancelled() => false,
        }
    }

    /// The documents among swept entries; unreadable ones are dead-lettered with their id
    /// and the reason, then settled (removed from the outbox).
    async fn readable(&self, swept: Vec<Swept>) -> Vec<Document> {
        let mut docs = Vec::with_capacity(swept.len());
        let mut letters = Vec::new();
        for entry in swept {
            match entry {
                Swept::Found(doc) => docs.push(doc),
                Swept::Unreadable { id, version, reason } => letters.push((
                    DeadLetter {
                        id,
                        status: None,
                        error_type: "unreadable".into(),
                        reason,
                        attempts: 0,
                        document: Bytes::from_static(b"null"),
                        at: SystemTime::now(),
                        version: None,
                    },
                    version,
                )),
            }
        }
        if !letters.is_empty() {
            let (letters, versions): (Vec<DeadLetter>, Vec<u64>) = letters.into_iter().unzip();
            for l in &letters {
                tracing::error!(id = %l.id, reason = %l.reason, "A stored item cannot be read; dead-lettering it.");
            }
            match self.store.dead_letter(&letters).await {
                Ok(()) => {
                    self.metrics.dead_letters.inc_by(letters.len() as u64);
                    let settled: Vec<(String, u64)> = letters.into_iter().map(|l| l.id).zip(versions).collect();
                    if let Err(e) = self.store.confirm(&settled).await {
                        tracing::warn!(error = %e, "Cannot remove dead-lettered entries from the outbox; they are read again later.");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "Cannot store dead letters for unreadable items; they stay in the store.")
                }
            }
        }
        docs
    }
}
