//! The maintenance actor: one per instance, every `durability.maintenance_interval`:
//!
//! - checks that the state store still holds what it held (a Redis restarted without its
//!   data loses every persisted partial: that is logged as an ERROR and counted);
//! - resends outbox entries the sink has not confirmed within `outbox_resend_after`
//!   (documents completed before a crash, or whose confirmation was lost);
//! - takes partials not updated within the backend's partial TTL ([`Settings::partial_ttl`])
//!   and drops or dead-letters them.
//!
//! It stops when the pipeline's cancel token fires, before the writer drains.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{DeadLetter, Orphan, StateStore};
use crate::config::{OrphanAction, Settings};
use crate::metrics::Metrics;
use crate::model::{Document, Schema};
use crate::sink::writer::WriterHandle;

/// Most entries handled per kind and round.
const ROUND_LIMIT: usize = 500;

pub struct Maintenance {
    store: StateStore,
    writer: WriterHandle,
    schema: Schema,
    metrics: Arc<Metrics>,
    interval: Duration,
    resend_after: Duration,
    orphan_after: Duration,
    orphans: OrphanAction,
    cancel: CancellationToken,
}

impl Maintenance {
    pub fn spawn(
        settings: &Settings,
        store: StateStore,
        writer: WriterHandle,
        schema: Schema,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let actor = Maintenance {
            store,
            writer,
            schema,
            metrics,
            interval: settings.durability.maintenance_interval,
            resend_after: settings.durability.outbox_resend_after,
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
                _ = self.cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "State store maintenance failed; it runs again next interval.");
            }
        }
    }

    async fn round(&self) -> Result<(), super::StateError> {
        if self.store.check_epoch().await? {
            self.metrics.state_resets.inc();
            tracing::error!("The state store lost its data (restarted without persistence, or flushed): persisted partials and unconfirmed documents stored before are gone. Run Redis with appendonly yes.");
        }
        loop {
            let docs = self.store.claim_outbox(self.resend_after, ROUND_LIMIT).await?;
            if docs.is_empty() {
                break;
            }
            let n = docs.len();
            self.metrics.outbox_resent.inc_by(n as u64);
            tracing::info!(documents = n, "Resending completed documents the sink has not confirmed.");
            if self.writer.send(docs).await.is_err() {
                return Ok(()); // shutting down; they stay in the outbox
            }
            if n < ROUND_LIMIT || self.cancel.is_cancelled() {
                break;
            }
        }
        loop {
            let orphans = self.store.take_orphans(self.orphan_after, ROUND_LIMIT).await?;
            if orphans.is_empty() {
                break;
            }
            let n = orphans.len();
            self.handle_orphans(orphans).await;
            if n < ROUND_LIMIT || self.cancel.is_cancelled() {
                break;
            }
        }
        Ok(())
    }

    async fn handle_orphans(&self, orphans: Vec<Orphan>) {
        self.metrics.orphans_expired.inc_by(orphans.len() as u64);
        match self.orphans {
            OrphanAction::Drop => {
                let ids: Vec<&str> = orphans.iter().map(|o| o.id.as_str()).collect();
                tracing::info!(count = ids.len(), ?ids, "Dropped partial items that did not complete in time.");
            }
            OrphanAction::Index => {
                let docs: Vec<Document> = orphans
                    .into_iter()
                    .map(|o| Document {
                        id: o.id,
                        vectors: o.vectors.into_iter().map(Option::unwrap_or_default).collect(),
                        metadata: o.metadata,
                        completed_at: SystemTime::now(),
                        received_at: std::time::Instant::now(),
                        outbox: None,
                        acks: Vec::new(),
                    })
                    .collect();
                tracing::info!(
                    count = docs.len(),
                    "Indexing partial items that did not complete in time, marked incomplete."
                );
                if let Err(closed) = self.writer.send(docs).await {
                    let ids: Vec<String> = closed.0.into_iter().map(|d| d.id).collect();
                    tracing::error!(?ids, "Orphans lost: the bulk writer has stopped.");
                }
            }
            OrphanAction::DeadLetter => {
                let letters: Vec<DeadLetter> = orphans.iter().map(|o| self.letter(o)).collect();
                if let Err(e) = self.store.dead_letter(&letters).await {
                    let ids: Vec<&str> = orphans.iter().map(|o| o.id.as_str()).collect();
                    tracing::error!(error = %e, ?ids, "Orphans lost: the dead-letter store refused them.");
                }
            }
        }
    }

    fn letter(&self, orphan: &Orphan) -> DeadLetter {
        let mut source = serde_json::Map::new();
        source.insert("id".into(), orphan.id.clone().into());
        let mut missing = Vec::new();
        for (slot, vector) in orphan.vectors.iter().enumerate() {
            let part = self.schema.part(slot);
            match vector {
                Some(v) => {
                    source.insert(part.field.clone(), serde_json::json!(v));
                }
                None => missing.push(part.type_name.clone()),
            }
        }
        if let Some(meta) = &orphan.metadata {
            source.extend(meta.clone());
        }
        DeadLetter {
            id: orphan.id.clone(),
            status: None,
            error_type: "incomplete".into(),
            reason: format!("did not complete within the partial TTL; missing: {}", missing.join(", ")),
            attempts: 0,
            document: Bytes::from(serde_json::to_vec(&source).expect("JSON serialises")),
            at: SystemTime::now(),
        }
    }
}
