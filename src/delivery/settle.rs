//! Recording the end of each document: the one place that confirms outbox entries,
//! releases waiting requests, stores dead letters, parks, and counts each end.

use super::request::{Context, Encoded};
use super::End;
use crate::metrics::EndLabels;
use crate::model::ack::ack_all;
use crate::model::document::Origin;
use crate::state::DeadLetter;

/// A document and the end it reached.
pub type Ended = (Encoded, End);

/// Records ends: confirms the outbox entries of documents that completed in the store (by
/// version: an older entry goes too, a newer one stays), releases their requests.
pub async fn end(ctx: &Context, ended: Vec<Ended>) {
    if ended.is_empty() {
        return;
    }
    let mut confirms = Vec::new();
    let mut indexed = Vec::new();
    for (doc, end) in ended {
        ctx.metrics.documents_ended.get_or_create(&EndLabels { end: end.label() }).inc();
        if end == End::Indexed {
            indexed.push(doc.received_at.elapsed());
        }
        if doc.origin == Origin::Outbox {
            ctx.outbox.end(&doc.id, doc.version);
            confirms.push((doc.id, doc.version));
        }
        ack_all(doc.acks);
    }
    ctx.metrics.observe_indexed(indexed.into_iter());
    ctx.metrics.store_confirms.inc_by(confirms.len() as u64);
    if let Err(e) = ctx.store.confirm(&confirms).await {
        // Harmless but wasteful: these entries will be resent, and end as superseded or
        // indexed again with the same version.
        tracing::warn!(documents = confirms.len(), error = %e, "Cannot settle delivered documents in the outbox; they will be sent again.");
    }
}

/// Stores dead letters (retrying the store a while), then ends their documents. If the
/// store refuses them, documents waiting in the outbox stay there (sent again later) and
/// the ids of the others go to the ERROR log, the last trace of them.
pub async fn dead_letter(ctx: &Context, letters: Vec<(Encoded, DeadLetter)>) {
    if letters.is_empty() {
        return;
    }
    let (docs, letters): (Vec<Encoded>, Vec<DeadLetter>) = letters.into_iter().unzip();
    for d in &letters {
        tracing::warn!(id = %d.id, status = ?d.status, error_type = %d.error_type, reason = %d.reason, "Document refused; dead-lettering it.");
    }
    let mut attempt = 0;
    loop {
        match ctx.store.dead_letter(&letters).await {
            Ok(()) => {
                ctx.metrics.dead_letters.inc_by(letters.len() as u64);
                return end(ctx, docs.into_iter().map(|d| (d, End::DeadLettered)).collect()).await;
            }
            Err(e) if attempt < ctx.policy.max_retries => {
                tracing::warn!(error = %e, letters = letters.len(), "Cannot store dead letters; retrying.");
                tokio::time::sleep(ctx.policy.backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => {
                let lost: Vec<&str> =
                    docs.iter().filter(|d| d.origin == Origin::Memory).map(|d| d.id.as_str()).collect();
                tracing::error!(error = %e, ?lost, "Documents lost: they were refused and the dead-letter store is unavailable (those in the outbox stay there).");
                for doc in docs {
                    ctx.outbox.end(&doc.id, doc.version);
                    ack_all(doc.acks);
                }
                return;
            }
        }
    }
}

/// Shutdown gave up on these documents: leave them recoverable in the store. Those that
/// completed in the store stay in its outbox, their leases released so that the next
/// start resends them at once; those that completed in memory are parked there now.
pub async fn park(ctx: &Context, docs: Vec<Encoded>) {
    let mut memory = Vec::new();
    let mut leased = Vec::new();
    let mut acks = Vec::new();
    for doc in docs {
        ctx.metrics.documents_ended.get_or_create(&EndLabels { end: End::Parked.label() }).inc();
        acks.extend(doc.acks);
        match doc.memory_copy {
            Some(document) => memory.push(document),
            None => {
                ctx.outbox.end(&doc.id, doc.version);
                leased.push(doc.id);
            }
        }
    }
    if let Err(e) = ctx.store.renew(&leased, std::time::Duration::ZERO).await {
        tracing::warn!(documents = leased.len(), error = %e, "Cannot release outbox leases; they are resent once the leases lapse.");
    }
    match ctx.store.park(&memory).await {
        Ok(()) => {
            tracing::warn!(documents = memory.len() + leased.len(), "Shutdown deadline passed: documents parked in the state store's outbox; they are sent at the next start.");
            ack_all(acks); // durable in the store
        }
        Err(e) => {
            let ids: Vec<&str> = memory.iter().map(|d| d.id.as_str()).collect();
            tracing::error!(error = %e, ?ids, "Documents lost: shutdown gave up on the sink and the state store refused them.");
        }
    }
}
