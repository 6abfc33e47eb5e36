//! `taskmill worker`: run a worker pod — the chosen roles — until SIGINT/SIGTERM.

use std::time::Duration;

use crate::{CancellationToken, Config, Pod, Roles};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoleName {
    Intake,
    Worker,
    Completion,
    Sweeper,
}

/// Every setting also comes from the environment (`Config::from_env`); a flag given
/// overrides its variable.
#[derive(Args, Debug)]
pub struct PodArgs {
    /// Roles to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub roles: Vec<RoleName>,
    /// Pools to serve (repeatable; default `default`).
    #[arg(long = "pool", alias = "queue")]
    pub pools: Vec<String>,
    /// Pools job requests may name besides `default` and the pools pods serve
    /// [TASKMILL_KNOWN_POOLS].
    #[arg(long, value_delimiter = ',')]
    pub known_pools: Option<Vec<String>>,
    /// Handlers running at once per pool [TASKMILL_CONCURRENCY, 32].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Task messages held per pool: waiting, running, being recorded and acked; at
    /// least --concurrency [TASKMILL_PREFETCH, 256].
    #[arg(long)]
    pub prefetch: Option<usize>,
    /// Seconds in-flight handlers get to finish on shutdown [TASKMILL_GRACE_SECS, 30].
    #[arg(long)]
    pub grace_secs: Option<u64>,
    /// Seconds a claim lasts without renewal [TASKMILL_LEASE_SECS, 300].
    #[arg(long)]
    pub lease_secs: Option<u64>,
    /// Job requests over this many bytes are parked [TASKMILL_MAX_REQUEST_BYTES, 16 MiB].
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// The cap on every payload taskmill makes: a task's payload or result, a reduce or
    /// finalize task's input, a job's result [TASKMILL_MAX_PAYLOAD_BYTES, 8 MiB].
    #[arg(long)]
    pub max_payload_bytes: Option<usize>,
    /// Seconds between sweeps for stuck work [TASKMILL_SWEEP_SECS, 30].
    #[arg(long)]
    pub sweep_secs: Option<u64>,
    /// Seconds without progress after which a task that should be moving is stuck
    /// [TASKMILL_STUCK_SECS, 300].
    #[arg(long)]
    pub stuck_secs: Option<u64>,
    /// Shards the sweeper scans in parallel [TASKMILL_SWEEPER_SHARDS, 4].
    #[arg(long)]
    pub sweeper_shards: Option<u32>,
    /// Seconds one attempt may run when neither the job nor the handler says
    /// [TASKMILL_TASK_TIMEOUT_SECS, 60].
    #[arg(long)]
    pub task_timeout_secs: Option<u64>,
    /// The broker's consumer_timeout, in seconds: handlers nearing it are logged
    /// [TASKMILL_CONSUMER_TIMEOUT_SECS, 1800].
    #[arg(long)]
    pub consumer_timeout_secs: Option<u64>,
    /// Do not run migrations at start.
    #[arg(long)]
    pub no_migrate: bool,
    /// Where to serve /healthz, /readyz, /metrics and the dashboard
    /// [TASKMILL_HTTP_ADDR, 0.0.0.0:9464; the default, when in use, falls back to a
    /// free port; an address given must be free].
    #[arg(long, conflicts_with = "no_http")]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Serve no HTTP endpoint (or TASKMILL_HTTP_ADDR=off).
    #[arg(long)]
    pub no_http: bool,
}

impl PodArgs {
    /// The flags given, over the configuration read from the environment.
    fn apply(self, config: &mut Config) {
        let seconds = |flag: Option<u64>, setting: &mut Duration| {
            if let Some(secs) = flag {
                *setting = Duration::from_secs(secs);
            }
        };
        seconds(self.grace_secs, &mut config.grace_period);
        seconds(self.lease_secs, &mut config.lease);
        seconds(self.sweep_secs, &mut config.sweep_interval);
        seconds(self.stuck_secs, &mut config.stuck_after);
        seconds(self.task_timeout_secs, &mut config.task_timeout);
        seconds(self.consumer_timeout_secs, &mut config.consumer_timeout);
        if let Some(pools) = self.known_pools {
            config.known_pools = pools;
        }
        if let Some(concurrency) = self.concurrency {
            config.concurrency = concurrency;
        }
        if let Some(prefetch) = self.prefetch {
            config.prefetch = prefetch;
        }
        if let Some(bytes) = self.max_request_bytes {
            config.max_request_bytes = bytes;
        }
        if let Some(bytes) = self.max_payload_bytes {
            config.max_payload_bytes = bytes;
        }
        if let Some(shards) = self.sweeper_shards {
            config.sweeper_shards = shards;
        }
        config.migrate_on_start &= !self.no_migrate;
        if self.http_addr.is_some() || self.no_http {
            config.http_addr = self.http_addr;
            config.http_addr_fallback = false;
        }
    }
}

pub fn roles(selected: &[RoleName]) -> Roles {
    if selected.is_empty() {
        return Roles::ALL;
    }
    Roles {
        intake: selected.contains(&RoleName::Intake),
        worker: selected.contains(&RoleName::Worker),
        completion: selected.contains(&RoleName::Completion),
        sweeper: selected.contains(&RoleName::Sweeper),
    }
}

pub async fn run(
    mut config: Config,
    args: PodArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let roles = roles(&args.roles);
    let pools = args.pools.clone();
    args.apply(&mut config);
    let mut builder = Pod::builder().config(config).roles(roles);
    for pool in pools {
        builder = builder.pool(pool);
    }
    builder.build().run(shutdown).await?;
    tracing::info!("pod stopped");
    Ok(())
}
