//! The endpoint's state: what its pages and probes read of the pod.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::access::Access;
use crate::amqp::link::BrokerLink;
use crate::amqp::topology::Topology;
use crate::roles::Vitals;
use crate::store::Store;

/// Connections of the dashboard's own store.
const DASHBOARD_CONNECTIONS: u32 = 2;
/// How long a dashboard page's reads may take, waiting for a connection included; on
/// PostgreSQL also each statement's `statement_timeout`.
pub(super) const PAGE_WAIT: Duration = Duration::from_secs(5);

/// What the endpoint reads: shared with the pod, owned by nobody here.
pub(crate) struct Endpoint {
    /// The pod's store: the probes, the scrape and the dashboard's write actions.
    pub store: Store,
    /// A small store of the dashboard's own, for its pages: however many are open,
    /// they never take a connection the pipeline needs.
    pub reader: Store,
    pub topology: Topology,
    pub link: Arc<BrokerLink>,
    pub vitals: Arc<Vitals>,
    /// The pools the pod serves: their work queues are reported.
    pub pools: Vec<String>,
    /// The dashboard's token, and whether it allows writing.
    pub access: Access,
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
        access: Access,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            reader: store.reader(DASHBOARD_CONNECTIONS, PAGE_WAIT),
            store,
            topology,
            link,
            vitals,
            pools,
            access,
            stopping,
            migrated: AtomicBool::new(false),
        }
    }
}
