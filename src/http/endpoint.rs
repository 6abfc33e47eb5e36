//! The endpoint's state: what its pages and probes read of the pod.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::amqp::link::BrokerLink;
use crate::amqp::topology::Topology;
use crate::config::Token;
use crate::roles::Vitals;
use crate::store::Store;

/// What the endpoint reads: shared with the pod, owned by nobody here.
pub(crate) struct Endpoint {
    pub store: Store,
    pub topology: Topology,
    pub link: Arc<BrokerLink>,
    pub vitals: Arc<Vitals>,
    /// The pools the pod serves: their work queues are reported.
    pub pools: Vec<String>,
    /// What the dashboard's write actions need; none: read-only.
    pub token: Option<Token>,
    /// The pod's shutdown: a pod stopping is not ready for more work.
    pub stopping: CancellationToken,
    /// Set once the database had every migration: they are never unapplied while a
    /// pod runs, so the probe stops asking.
    pub(super) migrated: AtomicBool,
}

impl Endpoint {
    pub fn new(
        store: Store,
        topology: Topology,
        link: Arc<BrokerLink>,
        vitals: Arc<Vitals>,
        pools: Vec<String>,
        token: Option<Token>,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            store,
            topology,
            link,
            vitals,
            pools,
            token,
            stopping,
            migrated: AtomicBool::new(false),
        }
    }
}
