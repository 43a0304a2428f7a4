//! Acknowledgement groups for the `persisted` ack mode: a request waits until each of its
//! parts is durable (stored by a completed flush, or its document confirmed by the sink or
//! stored as a dead letter). Every part of the request holds the group; whoever makes a
//! part durable calls [`AckGroup::part_done`]. In `accepted` mode parts carry no group.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug)]
pub struct AckGroup {
    remaining: AtomicUsize,
    done: Notify,
}

impl AckGroup {
    /// A group waiting for `parts` parts.
    pub fn new(parts: usize) -> Arc<AckGroup> {
        Arc::new(AckGroup { remaining: AtomicUsize::new(parts), done: Notify::new() })
    }

    /// One part of the request is durable.
    pub fn part_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Resolves once every part is durable.
    pub async fn wait(&self) {
        if self.remaining.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
    }

    pub fn remaining(&self) -> usize {
        self.remaining.load(Ordering::Acquire)
    }
}

/// Marks every group in `acks` as having one more durable part.
pub fn ack_all(acks: Vec<Arc<AckGroup>>) {
    for ack in acks {
        ack.part_done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_after_the_last_part_even_if_it_came_first() {
        let group = AckGroup::new(2);
        group.part_done();
        assert_eq!(group.remaining(), 1);
        let waiter = tokio::spawn({
            let g = group.clone();
            async move { g.wait().await }
        });
        group.part_done();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        let done_before_wait = AckGroup::new(1);
        done_before_wait.part_done();
        tokio::time::timeout(std::time::Duration::from_secs(5), done_before_wait.wait()).await.unwrap();
    }
}
