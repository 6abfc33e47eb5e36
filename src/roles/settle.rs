//! How every consuming role (intake, worker, completion) ends a delivery, written
//! once: acked once its effects are committed and confirmed; parked with its reason
//! and then acked when it can never succeed (it does not decode, it names a task that
//! does not exist, the request is refused); returned to the queue when handling it
//! failed on the way; and left alone when the broker connection is lost, because the
//! broker returns every unacked delivery of a dead connection by itself, and settling
//! on it would only fail once per message during an outage the link already reports.
//!
//! Acks go through the channel's coalescer ([`Acks`]), so a batch's acks are one frame;
//! each delivery holds a slot of its role until its ack or nack is on its way.

use lapin::message::Delivery;
use tokio::sync::OwnedSemaphorePermit;

use crate::amqp::acks::{Acks, Settlement};
use crate::amqp::broker::{BrokerError, Publisher};
use crate::amqp::parking::park;
use crate::amqp::topology::Topology;
use crate::error::Error;

/// The settling side of one consumer: its acks, and where it parks.
pub(crate) struct Settler {
    publisher: Publisher,
    topology: Topology,
    queue: String,
    acks: Acks,
}

impl Settler {
    /// Settles deliveries of `queue`, parking on `publisher`.
    pub fn new(publisher: Publisher, topology: Topology, queue: String) -> Self {
        Self {
            publisher,
            topology,
            queue,
            acks: Acks::start(),
        }
    }

    /// Registers a delivery as unsettled: call it for every delivery, in the order the
    /// consumer yields them, before anything may settle it.
    pub fn received(&self, delivery: &Delivery) {
        self.acks.received(delivery);
    }

    /// Whether `err` means the broker connection is gone. A publish on a channel of a
    /// dead connection may fail first with a channel error, so the connection's own
    /// status decides too.
    pub fn connection_lost(&self, err: &Error) -> bool {
        err.is_broker_connection() || !self.publisher.connection().status().connected()
    }

    /// Parks a copy of `delivery` with `reason` (or drops it past the parking lot's
    /// bound, with an error log); the caller then settles the delivery.
    pub async fn park(&self, delivery: &Delivery, reason: &str) -> Result<(), Error> {
        Ok(park(
            &self.publisher,
            &self.topology,
            delivery,
            &self.queue,
            reason,
        )
        .await?)
    }

    /// Ends a delivery by what handling it came to; `slot` is freed once the ack or
    /// nack is on its way.
    pub fn settle(
        &self,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        handled: Result<(), Error>,
    ) {
        match handled {
            Ok(()) => self.acks.settle(delivery, Settlement::Ack, slot),
            Err(err) => self.settle_failed(delivery, slot, &err),
        }
    }

    /// Ends a delivery whose handling failed with `err`: left to the broker if the
    /// connection is lost, else returned to the queue.
    pub fn settle_failed(&self, delivery: Delivery, slot: OwnedSemaphorePermit, err: &Error) {
        if self.connection_lost(err) {
            tracing::debug!(queue = self.queue, %err, "delivery left to the broker: connection lost");
            return;
        }
        if let Error::Broker(BrokerError::Returned { .. }) = err {
            // A queue this process declared is gone (deleted, a broker reset): declare
            // it again on the next send instead of bouncing for ever.
            self.topology.forget_declared();
        }
        tracing::error!(queue = self.queue, %err, "delivery not handled; returning it to the queue");
        self.acks.settle(delivery, Settlement::Requeue, slot);
    }

    /// Parks a delivery that can never succeed, then acks it (or, if it could not be
    /// parked, settles it by that failure).
    pub async fn park_and_settle(
        &self,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        reason: &str,
    ) {
        let parked = self.park(&delivery, reason).await;
        self.settle(delivery, slot, parked);
    }

    /// Returns a delivery to the queue unhandled (its role is stopping).
    pub fn requeue(&self, delivery: Delivery, slot: OwnedSemaphorePermit) {
        self.acks.settle(delivery, Settlement::Requeue, slot);
    }
}
