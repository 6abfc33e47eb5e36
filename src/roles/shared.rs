//! What every role of a pod shares, below the roles: the pod's configuration, store,
//! topology, handlers and known pools, and the slot discipline of a consumer.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::amqp::topology::Topology;
use crate::config::Config;
use crate::known_pools::KnownPools;
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
