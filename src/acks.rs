//! Acknowledgements of one consumer channel, coalesced.
//!
//! A worker acks a whole batch of deliveries at once, after the batch's commit. One
//! `basic.ack` with `multiple` set acknowledges every delivery up to its tag, which
//! costs the broker and the client one frame instead of hundreds — but it must never
//! cover a delivery whose effects are not committed yet. So every delivery is
//! registered as unsettled when it arrives, and settlements go through one task per
//! channel, in order: the acks below the oldest delivery still unsettled become one
//! `multiple` ack, the others are acked one by one at once (a slow handler holds back
//! no one else's ack), and a requeue is always a single `basic.nack`. Deliveries that
//! arrive later have higher tags, so nothing unregistered can be covered.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// How a delivery is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Its effects are committed and confirmed.
    Ack,
    /// Return it to the queue.
    Requeue,
}

struct Settle {
    delivery: Delivery,
    settlement: Settlement,
    /// Released once the ack or nack is on its way, like the delivery itself.
    _slot: OwnedSemaphorePermit,
}

/// The settling side of one consumer channel; clones share it.
#[derive(Clone)]
pub(crate) struct Acks {
    unsettled: Arc<Mutex<BTreeSet<u64>>>,
    settle: mpsc::UnboundedSender<Settle>,
}

impl Acks {
    /// Starts the channel's settling task; it ends when every clone is dropped.
    pub(crate) fn start() -> Self {
        let unsettled = Arc::new(Mutex::new(BTreeSet::new()));
        let (settle, queue) = mpsc::unbounded_channel();
        tokio::spawn(settle_loop(unsettled.clone(), queue));
        Self { unsettled, settle }
    }

    /// Registers a delivery as unsettled; call it for every delivery, in the order
    /// the consumer yields them, before anything may settle it.
    pub(crate) fn received(&self, delivery: &Delivery) {
        self.lock().insert(delivery.delivery_tag);
    }

    /// Settles a delivery; `slot` is released once the ack or nack has been handed
    /// to the connection.
    pub(crate) fn settle(
        &self,
        delivery: Delivery,
        settlement: Settlement,
        slot: OwnedSemaphorePermit,
    ) {
        let settle = Settle {
            delivery,
            settlement,
            _slot: slot,
        };
        // The loop only stops once every sender is gone, and we are one.
        let _ = self.settle.send(settle);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        lock(&self.unsettled)
    }
}

/// The set of unsettled tags. It is only ever held for inserts and removes, which
/// leave it consistent even if a panic cut them short: a poisoned lock is still usable.
fn lock(unsettled: &Mutex<BTreeSet<u64>>) -> MutexGuard<'_, BTreeSet<u64>> {
    unsettled.lock().unwrap_or_else(|e| e.into_inner())
}

async fn settle_loop(
    unsettled: Arc<Mutex<BTreeSet<u64>>>,
    mut queue: mpsc::UnboundedReceiver<Settle>,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, usize::MAX).await > 0 {
        let mut acks = Vec::with_capacity(batch.len());
        let mut settled = Vec::with_capacity(batch.len());
        for settle in batch.drain(..) {
            settled.push(settle.delivery.delivery_tag);
            if settle.settlement == Settlement::Ack {
                acks.push(settle);
                continue;
            }
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            if let Err(err) = settle.delivery.acker.nack(requeue).await {
                tracing::debug!(%err, "nack failed; the broker will redeliver");
            }
        }
        let oldest_unsettled = {
            let mut unsettled = lock(&unsettled);
            for tag in settled {
                unsettled.remove(&tag);
            }
            unsettled.first().copied().unwrap_or(u64::MAX)
        };
        let (covered, alone): (Vec<Settle>, Vec<Settle>) = acks
            .into_iter()
            .partition(|settle| settle.delivery.delivery_tag < oldest_unsettled);
        if let Some(last) = covered.iter().max_by_key(|s| s.delivery.delivery_tag) {
            let multiple = BasicAckOptions { multiple: true };
            if let Err(err) = last.delivery.acker.ack(multiple).await {
                tracing::debug!(%err, "ack failed; the broker will redeliver");
            }
        }
        for settle in &alone {
            if let Err(err) = settle.delivery.acker.ack(BasicAckOptions::default()).await {
                tracing::debug!(%err, "ack failed; the broker will redeliver");
            }
        }
        // Slots go back only now: a shutdown that has every slot back has nothing
        // left to ack.
        drop((covered, alone));
    }
}
