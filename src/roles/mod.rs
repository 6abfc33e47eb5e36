//! The four roles of the pipeline — [`intake`], [`worker`], [`completion`],
//! [`sweeper`] — and what they share. A role never imports another role or the pod:
//! the pod starts each under the broker link's supervisor with what it owns here.

pub(crate) mod completion;
pub(crate) mod intake;
pub(crate) mod sweeper;
pub(crate) mod worker;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::amqp::topology::Topology;
use crate::config::Config;
use crate::pools::KnownPools;
use crate::registry::Registry;
use crate::store::Store;

/// What every role of a pod shares.
pub(crate) struct Shared {
    pub config: Config,
    pub store: Store,
    pub topology: Topology,
    pub registry: Registry,
    pub pools: KnownPools,
}

/// Waits for a free slot, or for shutdown (`None`). Slots can stay taken for long —
/// a handler, or a publish whose confirm is late — and shutdown must not wait behind
/// them.
pub(crate) async fn take_slot(
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        _ = shutdown.cancelled() => None,
        slot = slots.clone().acquire_owned() => Some(slot.expect("slots are never closed")),
    }
}
