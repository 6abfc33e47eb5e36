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

use super::broker::BrokerError;

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
            if let Err(err) = settle_one(&settle.delivery, Settlement::Requeue).await {
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
        let tags: Vec<u64> = acks.iter().map(|s| s.delivery.delivery_tag).collect();
        let (multiple, alone) = coalesce(&tags, oldest_unsettled);
        for settle in &acks {
            let tag = settle.delivery.delivery_tag;
            let options = if Some(tag) == multiple {
                BasicAckOptions { multiple: true }
            } else if alone.contains(&tag) {
                BasicAckOptions::default()
            } else {
                continue;
            };
            if let Err(err) = settle.delivery.acker.ack(options).await {
                tracing::debug!(%err, "ack failed; the broker will redeliver");
            }
        }
        // Slots go back only now: a shutdown that has every slot back has nothing
        // left to ack.
        drop(acks);
    }
}

/// Splits the tags to ack into one `multiple` ack — the highest tag below the oldest
/// delivery still unsettled, which covers every delivery below it — and the tags at or
/// above it, which must be acked one by one so no running delivery is covered.
fn coalesce(acked: &[u64], oldest_unsettled: u64) -> (Option<u64>, Vec<u64>) {
    let multiple = acked
        .iter()
        .copied()
        .filter(|&tag| tag < oldest_unsettled)
        .max();
    let alone = acked
        .iter()
        .copied()
        .filter(|&tag| tag >= oldest_unsettled)
        .collect();
    (multiple, alone)
}

/// Acks one delivery, or returns it to the queue.
async fn settle_one(delivery: &Delivery, settlement: Settlement) -> Result<(), BrokerError> {
    match settlement {
        Settlement::Ack => {
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Settlement::Requeue => {
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            delivery.acker.nack(requeue).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::coalesce;

    #[test]
    fn acks_below_the_oldest_unsettled_become_one_multiple_ack() {
        assert_eq!(coalesce(&[3, 1, 2], 10), (Some(3), vec![]));
    }

    #[test]
    fn acks_above_a_running_delivery_go_alone() {
        // Delivery 4 is still running: 5 and 7 must not be covered by a multiple ack.
        assert_eq!(coalesce(&[1, 2, 5, 7], 4), (Some(2), vec![5, 7]));
        assert_eq!(coalesce(&[5, 6], 4), (None, vec![5, 6]));
    }

    #[test]
    fn nothing_unsettled_lets_everything_coalesce() {
        assert_eq!(coalesce(&[9, 8], u64::MAX), (Some(9), vec![]));
        assert_eq!(coalesce(&[], u64::MAX), (None, vec![]));
    }
}
