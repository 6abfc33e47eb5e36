//! The roles of the pipeline — [`intake`], [`worker`], [`completion`], [`sweeper`],
//! [`syncer`] for external tasks and [`cleaner`] for retention — what they share, and their one lifecycle: a pod [`Running::start`]s
//! each [`Role`] under the broker link's supervisor (restarted on a live connection
//! whenever it fails), the token stops them all, and [`Running::join`] reports the
//! first failure. A role never imports another role or the pod.

pub(crate) mod cleaner;
pub(crate) mod completion;
mod feed;
pub(crate) mod intake;
mod periodic;
mod settle;
mod shared;
pub(crate) mod sweeper;
pub(crate) mod syncer;
mod vitals;
pub(crate) mod worker;

#[cfg(feature = "testing")]
pub use feed::FEED_DEPTH;

pub(crate) use shared::Shared;
pub(crate) use vitals::Vitals;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::consumer::reporting_consumption;
use crate::amqp::link::{supervise, BrokerLink};
use crate::config::Config;
use crate::error::Error;

/// One role of a pod, with what it keeps across reconnects.
pub(crate) enum Role {
    /// Job requests in flight hold these slots, so that requests started before a
    /// reconnect still count against the limit.
    Intake {
        slots: Arc<Semaphore>,
    },
    /// The worker of one pool.
    Worker {
        pool: String,
        capacity: Arc<worker::Capacity>,
    },
    Completion,
    Sweeper,
    /// Runs in the sweeper's pods that have a backend for external tasks.
    Syncer,
    /// Runs in the sweeper's pods.
    Cleaner,
}

impl Role {
    pub fn intake() -> Self {
        Self::Intake {
            slots: intake::slots(),
        }
    }

    /// The worker of `pool`, holding the pod's normalized `prefetch` and
    /// `concurrency`.
    pub fn worker(pool: String, config: &Config) -> Self {
        Self::Worker {
            pool,
            capacity: worker::Capacity::new(config.prefetch, config.concurrency),
        }
    }

    /// The name and, for a worker, its pool: how the readiness probe names it.
    fn label(&self) -> String {
        match self {
            Self::Worker { pool, .. } => format!("worker {pool}"),
            _ => self.name().to_owned(),
        }
    }

    /// Whether the role consumes a queue (and so is live only once it does).
    fn consumes(&self) -> bool {
        match self {
            Self::Intake { .. } | Self::Worker { .. } | Self::Completion => true,
            Self::Sweeper | Self::Syncer | Self::Cleaner => false,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Intake { .. } => "intake",
            Self::Worker { .. } => "worker",
            Self::Completion => "completion",
            Self::Sweeper => "sweeper",
            Self::Syncer => "syncer",
            Self::Cleaner => "cleaner",
        }
    }

    /// One run on one connection: `Ok` once `shutdown` stopped it.
    async fn run(
        &self,
        shared: Arc<Shared>,
        connection: Arc<Connection>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        match self {
            Self::Intake { slots } => {
                intake::run(shared, connection, slots.clone(), shutdown).await
            }
            Self::Worker { pool, capacity } => {
                worker::run(shared, connection, pool.clone(), capacity.clone(), shutdown).await
            }
            Self::Completion => completion::run(shared, connection, shutdown).await,
            Self::Sweeper => sweeper::run(shared, connection, shutdown).await,
            Self::Syncer => syncer::run(shared, connection, shutdown).await,
            Self::Cleaner => cleaner::run(shared, shutdown).await,
        }
    }
}

/// The roles a pod runs.
pub(crate) struct Running {
    shared: Arc<Shared>,
    link: Arc<BrokerLink>,
    vitals: Arc<Vitals>,
    /// Cancelled by the pod's shutdown, or by the first role to fail.
    token: CancellationToken,
    roles: JoinSet<Result<(), Error>>,
}

impl Running {
    pub fn new(
        shared: Arc<Shared>,
        link: Arc<BrokerLink>,
        vitals: Arc<Vitals>,
        token: CancellationToken,
    ) -> Self {
        Self {
            shared,
            link,
            vitals,
            token,
            roles: JoinSet::new(),
        }
    }

    /// Runs `role` until the token is cancelled, restarting it after a failure; its
    /// vitals say whether a run of it is live: consuming, for a role that consumes.
    pub fn start(&mut self, role: Role) {
        if let Role::Worker { pool, capacity } = &role {
            self.vitals.track_pool(pool.clone(), capacity.clone());
        }
        let up = self.vitals.track(role.label());
        let role = Arc::new(role);
        let (shared, token) = (self.shared.clone(), self.token.clone());
        self.roles.spawn(supervise(
            role.name(),
            self.link.clone(),
            self.token.clone(),
            move |connection| {
                let (role, shared, token) = (role.clone(), shared.clone(), token.clone());
                let up = up.clone();
                async move {
                    // A consuming role is live once the broker delivers to it, which
                    // its consumer reports; a periodic one as soon as it runs.
                    if !role.consumes() {
                        up.store(true, Ordering::Relaxed);
                    }
                    let ran =
                        reporting_consumption(up.clone(), role.run(shared, connection, token))
                            .await;
                    up.store(false, Ordering::Relaxed);
                    ran
                }
            },
        ));
    }

    /// Waits for every role; the first failure stops the others. Once the token is
    /// cancelled, roles get `deadline` to return before they are aborted, so a pod
    /// always stops in bounded time, whatever state its connections are in.
    pub async fn join(mut self, deadline: Duration) -> Option<Error> {
        let mut first_error = None;
        let mut stop_by = None;
        loop {
            let joined = tokio::select! {
                joined = self.roles.join_next() => joined,
                _ = self.token.cancelled(), if stop_by.is_none() => {
                    stop_by = Some(tokio::time::Instant::now() + deadline);
                    continue;
                }
                _ = tokio::time::sleep_until(stop_by.unwrap_or_else(tokio::time::Instant::now)), if stop_by.is_some() => {
                    tracing::warn!(?deadline, roles = self.roles.len(), "roles still stopping past the shutdown deadline; abandoning them (their messages return to the broker)");
                    self.roles.abort_all();
                    while self.roles.join_next().await.is_some() {}
                    return first_error;
                }
            };
            let Some(joined) = joined else {
                return first_error;
            };
            let result =
                joined.unwrap_or_else(|err| Err(Error::Other(format!("role panicked: {err}"))));
            if let Err(err) = result {
                tracing::error!(%err, "role failed; stopping the pod");
                first_error.get_or_insert(err);
                self.token.cancel();
            }
        }
    }
}
