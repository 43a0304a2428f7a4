//! Recording the end of each document: the one place that confirms outbox entries,
//! releases waiting requests, stores dead letters, parks, and counts each end.

use std::time::Duration;

use super::request::{Context, Encoded};
use super::End;
use crate::metrics::EndLabels;
use crate::model::ack::ack_all;
use crate::model::document::Origin;
use crate::state::DeadLetter;

/// Longest a park may take: shutdown must end whatever the store does.
const PARK_TIMEOUT: Duration = Duration::from_secs(2);

/// A document and the end it reached.
pub type Ended = (Encoded, End);

/// Records ends: confirms the outbox entries of documents that completed in the store (by
/// version: an older entry goes too, a newer one stays), releases their requests.
pub async fn end(ctx: &Context, ended: Vec<Ended>) {
    if ended.is_empty() {
        return;
    }
    let mut confirms = Vec::new();
    let mut reopens = Vec::new();
    let mut indexed = Vec::new();
    for (doc, end) in ended {
        ctx.metrics.documents_ended.get_or_create(&EndLabels { end: end.label() }).inc();
        if end == End::Indexed {
            indexed.push(doc.received_at.elapsed());
        }
        if doc.origin == Origin::Outbox {
            ctx.outbox.end(&doc.id, doc.version);
            match end {
                End::Reopened => reopens.push((doc.id, doc.version)),
                _ => confirms.push((doc.id, doc.version)),
            }
        }
        ack_all(doc.acks);
    }
    if let Err(e) = ctx.store.reopen(&reopens).await {
        // The entries stay in the outbox: resent once their leases lapse, and reopened then.
        tracing::warn!(documents = reopens.len(), error = %e, "Cannot put the parts of updates whose document is gone back in the store; they will be sent again.");
    }
    ctx.metrics.observe_indexed(indexed.into_iter());
    ctx.metrics.store_confirms.inc_by(confirms.len() as u64);
    if let Err(e) = ctx.store.confirm(&confirms).await {
        // Harmless but wasteful: these entries will be resent, and end as superseded or
        // indexed again with the same version.
        tracing::warn!(documents = confirms.len(), error = %e, "Cannot settle delivered documents in the outbox; they will be sent again.");
    }
}

/// Stores dead letters, then ends their documents. While the store refuses them it is
/// retried with backoff; if shutdown's deadline passes first, documents waiting in the
/// outbox stay there (sent again later) and the others are parked with them.
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
            Err(e) => {
                tracing::warn!(error = %e, letters = letters.len(), "Cannot store dead letters; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(ctx.policy.backoff(attempt)) => attempt += 1,
                    _ = ctx.give_up.cancelled() => return park(ctx, docs).await,
                }
            }
        }
    }
}

/// Shutdown gave up on these documents: leave them recoverable in the store. Those that
/// completed in the store stay in its outbox, their leases released so that the next
/// start resends them at once; those that completed in memory are parked there now.
pub async fn park(ctx: &Context, docs: Vec<Encoded>) {
    if docs.is_empty() {
        return;
    }
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
    // Bounded: shutdown ends in time even when the store does not answer.
    let released = tokio::time::timeout(PARK_TIMEOUT, ctx.store.renew(&leased, Duration::ZERO)).await;
    if !matches!(released, Ok(Ok(()))) {
        tracing::warn!(
            documents = leased.len(),
            "Cannot release outbox leases; they are resent once the leases lapse."
        );
    }
    let parked = match tokio::time::timeout(PARK_TIMEOUT, ctx.store.park(&memory)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {PARK_TIMEOUT:?}")),
    };
    match parked {
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
