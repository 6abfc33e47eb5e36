//! A pod: every role of taskmill in one process, sharing one broker connection and one
//! database pool. [`Pod::builder`] registers handlers and chooses roles; `run`
//! serves until the shutdown token is cancelled.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use taskmill::{CancellationToken, Config, Pod, TaskContext};
//! let pod = Pod::builder()
//!     .config(Config::from_env()?)
//!     .handler("resize", |ctx: TaskContext| async move { Ok(ctx.payload) })
//!     .build();
//! pod.run(CancellationToken::new()).await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::amqp::broker::Publisher;
use crate::amqp::link::BrokerLink;
use crate::amqp::topology::Topology;
use crate::config::{Config, DEFAULT_QUEUE};
use crate::error::Error;
use crate::external::Backend;
use crate::http;
use crate::known_pools::KnownPools;
use crate::registry::{HandlerResult, JobType, Registry, TaskContext};
use crate::roles::{Role, Running, Shared, Vitals};
use crate::schedule::{self, Schedule};
use crate::database;
use crate::store::Store;

/// Which roles a pod runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    /// Turn job requests into jobs and publish their tasks.
    pub intake: bool,
    /// Run the tasks of the pod's pools.
    pub worker: bool,
    /// End jobs whose tasks are over, and relay their unpublished events.
    pub completion: bool,
    /// Re-send lost or stuck work and fail stale formations; and remove ended jobs
    /// past their retention. One pod at a time holds each one's lease.
    pub sweeper: bool,
}

impl Roles {
    /// Every role: the default.
    pub const ALL: Roles = Roles {
        intake: true,
        worker: true,
        completion: true,
        sweeper: true,
    };

    /// No role: a base to turn single roles on, as in
    /// `Roles { worker: true, ..Roles::NONE }`.
    pub const NONE: Roles = Roles {
        intake: false,
        worker: false,
        completion: false,
        sweeper: false,
    };
}

impl Default for Roles {
    fn default() -> Self {
        Self::ALL
    }
}

/// How long a pod's roles may take to stop after its shutdown token is cancelled: the
/// grace period for handlers in flight, plus a margin for settling and closing. Past
/// it, whatever still waits (on a broker that stopped answering, say) is abandoned:
/// its messages are unacked and return to their pools. Closing the connection takes
/// at most [`crate::amqp::broker::CLOSE_TIMEOUT`] more, so a pod stops within grace + 3 s.
fn shutdown_deadline(config: &Config) -> Duration {
    config.grace_period + SHUTDOWN_MARGIN
}

const SHUTDOWN_MARGIN: Duration = Duration::from_secs(2);

/// Configures a [`Pod`]; made by [`Pod::builder`].
pub struct PodBuilder {
    config: Config,
    registry: Registry,
    roles: Roles,
    pools: Vec<String>,
    store: Option<Store>,
    schedules: Vec<Schedule>,
}

impl PodBuilder {
    /// Replaces the whole configuration, including a [`Self::concurrency`] set before.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Registers the handler for a task type.
    pub fn handler<F, Fut>(mut self, task_type: impl Into<String>, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.registry.add_handler(task_type, handler);
        self
    }

    /// Limits how long one attempt of `task_type` may run (a job's `task_timeout_ms`
    /// overrides it; without either, `Config::task_timeout` applies).
    pub fn task_timeout(mut self, task_type: impl Into<String>, timeout: Duration) -> Self {
        self.registry.set_timeout(task_type, timeout);
        self
    }

    /// Registers a splitter: it makes the task payloads of a job type from `params`
    /// when a request carries no `tasks`.
    pub fn splitter<F>(mut self, job_type: impl Into<String>, splitter: F) -> Self
    where
        F: Fn(&Value) -> Result<Vec<Value>, String> + Send + Sync + 'static,
    {
        self.registry.add_splitter(job_type, splitter);
        self
    }

    /// Hands every task of `task_type` to an external system instead of a handler; the
    /// syncer (which runs with the sweeper role) keeps the tasks in step with it
    /// (`docs/protocol.md`, external tasks).
    pub fn backend(mut self, task_type: impl Into<String>, backend: impl Backend) -> Self {
        self.registry.add_backend(task_type, Arc::new(backend));
        self
    }

    /// Registers a multi-stage job type: its splitter, map, reduce and finalize handlers.
    pub fn job_type(mut self, job_type: JobType) -> Self {
        self.registry.add_job_type(job_type);
        self
    }

    /// Chooses the roles to run; [`Roles::ALL`] by default.
    pub fn roles(mut self, roles: Roles) -> Self {
        self.roles = roles;
        self
    }

    /// Adds a pool to serve (`default` when none is given).
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pools.push(pool.into());
        self
    }

    /// Sets [`Config::concurrency`]: handlers running at once per pool, also the
    /// prefetch. Call it after [`Self::config`], which would replace it.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.config.concurrency = concurrency;
        self
    }

    /// Submits `schedule`'s request on every tick of its cron pattern. The pod writes
    /// the schedule to the database as it starts (an unchanged one keeps its ticks);
    /// whichever pod runs the request relay fires it, once per tick.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Uses an existing store instead of connecting to `config.database_url`.
    pub fn store(mut self, store: database::Store) -> Self {
        self.store = Some(store.0);
        self
    }

    /// The pod. Settings that would stall or panic are raised to their least workable
    /// value (one handler, one shard, a one-second sweep interval and task timeout),
    /// and `prefetch` fits `basic.qos` and holds at least `concurrency` messages. It
    /// serves `default` when no pool was added.
    pub fn build(self) -> Pod {
        let pools = if self.pools.is_empty() {
            vec![DEFAULT_QUEUE.to_owned()]
        } else {
            self.pools
        };
        Pod {
            config: self.config.normalized(),
            registry: self.registry,
            roles: self.roles,
            pools,
            store: self.store,
            schedules: self.schedules,
        }
    }
}

/// A pod running taskmill's roles. See the module docs.
pub struct Pod {
    config: Config,
    registry: Registry,
    roles: Roles,
    pools: Vec<String>,
    store: Option<Store>,
    schedules: Vec<Schedule>,
}

impl Pod {
    /// A builder with the built-in task types registered and the default
    /// configuration (`.config(Config::from_env()?)` reads the environment).
    pub fn builder() -> PodBuilder {
        PodBuilder {
            config: Config::default(),
            registry: {
                let mut registry = Registry::default();
                crate::builtin::register(&mut registry);
                registry
            },
            roles: Roles::ALL,
            pools: Vec::new(),
            store: None,
            schedules: Vec::new(),
        }
    }

    /// Connects, migrates (if configured), declares the topology and runs the roles
    /// until `shutdown` is cancelled or one of them fails; a failing role stops the
    /// others.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let store = match self.store {
            Some(store) => store,
            None => Store::connect(&self.config.database_url, self.config.db_pool_size).await?,
        }
        .with_payload_cap(self.config.max_payload_bytes);
        let topology = Topology::new(self.config.prefix.clone(), self.config.queue_type)
            .with_parking_max(self.config.parking_max);
        let link = Arc::new(BrokerLink::new(self.config.amqp_url.clone()));
        let vitals = Arc::new(Vitals::default());
        // Up before the migrations and the first connect, so that a pod waiting for
        // either is alive to its liveness probe and says why it is not ready; down
        // only when `run` returns, so the metrics cover the shutdown too.
        let serving = CancellationToken::new();
        let _stop_serving = serving.clone().drop_guard();
        crate::metrics::register_job_types(self.registry.job_types());
        if let Some(addr) = self.config.http_addr {
            crate::metrics::prometheus();
            crate::metrics::parking_max(self.config.parking_max);
            let listener = http::bind(addr, self.config.http_addr_fallback)
                .await
                .map_err(|source| Error::Serve { addr, source })?;
            let endpoint = http::Endpoint::new(
                store.clone(),
                topology.clone(),
                link.clone(),
                vitals.clone(),
                if self.roles.worker {
                    self.pools.clone()
                } else {
                    Vec::new()
                },
                http::Access::new(
                    self.config.dashboard_token.clone(),
                    listener
                        .local_addr()
                        .map_err(|source| Error::Serve { addr, source })?,
                ),
                shutdown.clone(),
            );
            tokio::spawn(http::serve(listener, Arc::new(endpoint), serving));
        }
        if self.config.migrate_on_start {
            store.migrate().await?;
        }
        for schedule in &self.schedules {
            if store
                .put_schedule(&schedule::row_of(schedule, chrono::Utc::now())?)
                .await?
            {
                tracing::info!(schedule = schedule.name(), cron = %schedule.cron(), "schedule set");
            }
        }
        let Some(connection) = link.connection(&shutdown).await else {
            return Ok(());
        };
        {
            let setup = Publisher::open(&connection).await?;
            topology.declare_core(&setup.channel().await?).await?;
            setup.close().await;
        }
        if self.roles.worker {
            // Before any intake starts: a request for a pool this pod serves is
            // accepted from the first one on.
            store.register_pools(&self.pools).await?;
        }
        let shared = Arc::new(Shared {
            pools: KnownPools::new(&self.config.known_pools),
            config: self.config,
            store,
            topology,
            registry: self.registry,
        });
        let deadline = shutdown_deadline(&shared.config);
        let mut running = Running::new(
            shared.clone(),
            link.clone(),
            vitals.clone(),
            shutdown.child_token(),
        );
        if self.roles.intake {
            running.start(Role::intake());
        }
        if self.roles.worker {
            for pool in self.pools {
                running.start(Role::worker(pool, &shared.config));
            }
        }
        if self.roles.completion {
            running.start(Role::Completion);
        }
        if self.roles.sweeper {
            running.start(Role::Sweeper);
            running.start(Role::Cleaner);
            // External tasks are synced where they can be: by a pod that has their backend.
            if shared.registry.has_backends() {
                running.start(Role::Syncer);
            }
        }
        vitals.mark_started();
        let first_error = running.join(deadline).await;
        link.close().await;
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}
