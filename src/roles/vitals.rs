//! Vitals: what a pod's roles show of themselves while they run — which are consuming
//! and each worker pool's load — for the readiness probe and the metrics. Written by
//! the pod's running roles, read by the HTTP endpoint; never by a role about another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::roles::worker::Capacity;

/// One started role: its label and whether a run of it is live now.
struct RoleVital {
    label: String,
    up: Arc<AtomicBool>,
}

/// The vitals of one pod's roles.
#[derive(Default)]
pub(crate) struct Vitals {
    /// Set once the pod has started every role it runs: before, an empty list of
    /// roles means "not started yet", not "nothing down".
    started: AtomicBool,
    roles: Mutex<Vec<RoleVital>>,
    pools: Mutex<Vec<(String, Arc<Capacity>)>>,
}

impl Vitals {
    /// Tracks a role labelled `label`; the flag returned says whether a run of it is
    /// live (lowered by its supervisor when a run ends; raised when a run starts, or
    /// for a consuming role when its consumer starts).
    pub fn track(&self, label: String) -> Arc<AtomicBool> {
        let up = Arc::new(AtomicBool::new(false));
        self.roles.lock().expect("vitals lock").push(RoleVital {
            label,
            up: up.clone(),
        });
        up
    }

    /// Every role the pod runs is tracked.
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// Whether the pod has started its roles (see [`Self::mark_started`]).
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// Tracks a worker pool's load.
    pub fn track_pool(&self, pool: String, capacity: Arc<Capacity>) {
        self.pools
            .lock()
            .expect("vitals lock")
            .push((pool, capacity));
    }

    /// The labels of the roles with no live run (reconnecting, or restarting after a
    /// failure).
    pub fn roles_down(&self) -> Vec<String> {
        self.roles
            .lock()
            .expect("vitals lock")
            .iter()
            .filter(|role| !role.up.load(Ordering::Relaxed))
            .map(|role| role.label.clone())
            .collect()
    }

    /// Each pool served: deliveries held and handlers running now.
    pub fn pool_loads(&self) -> Vec<(String, usize, usize)> {
        self.pools
            .lock()
            .expect("vitals lock")
            .iter()
            .map(|(pool, capacity)| {
                let (held, running) = capacity.load();
                (pool.clone(), held, running)
            })
            .collect()
    }
}
