//! `taskmill worker`: run the chosen roles until SIGINT/SIGTERM.

use std::time::Duration;

use clap::{Args, ValueEnum};
use taskmill::{CancellationToken, Config, Roles, Worker};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Intake,
    Worker,
    Completion,
    Sweeper,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Roles to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub roles: Vec<Role>,
    /// Worker pools to serve (repeatable; default `default`).
    #[arg(long = "queue")]
    pub queues: Vec<String>,
    /// Pools job requests may name besides `default` and the pools pods serve.
    #[arg(long, env = "TASKMILL_KNOWN_POOLS", value_delimiter = ',')]
    pub known_pools: Vec<String>,
    /// Handlers running at once per pool.
    #[arg(long, env = "TASKMILL_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds in-flight handlers get to finish on shutdown.
    #[arg(long, env = "TASKMILL_GRACE_SECS", default_value_t = 30)]
    pub grace_secs: u64,
    /// Seconds a claim lasts without renewal.
    #[arg(long, env = "TASKMILL_LEASE_SECS", default_value_t = 300)]
    pub lease_secs: u64,
    /// Job requests over this many bytes are parked.
    #[arg(long, env = "TASKMILL_MAX_REQUEST_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Seconds between sweeps for stuck work.
    #[arg(long, env = "TASKMILL_SWEEP_SECS", default_value_t = 30)]
    pub sweep_secs: u64,
    /// Seconds without progress after which a task that should be moving is stuck.
    #[arg(long, env = "TASKMILL_STUCK_SECS", default_value_t = 300)]
    pub stuck_secs: u64,
    /// Shards the sweeper scans in parallel.
    #[arg(long, env = "TASKMILL_SWEEPER_SHARDS", default_value_t = 4)]
    pub sweeper_shards: u32,
    /// Seconds one attempt may run when neither the job nor the handler says.
    #[arg(long, env = "TASKMILL_TASK_TIMEOUT_SECS", default_value_t = 60)]
    pub task_timeout_secs: u64,
    /// The broker's consumer_timeout, in seconds (handlers nearing it are logged).
    #[arg(long, env = "TASKMILL_CONSUMER_TIMEOUT_SECS", default_value_t = 1800)]
    pub consumer_timeout_secs: u64,
    /// Do not run migrations at start.
    #[arg(long)]
    pub no_migrate: bool,
}

pub fn roles(selected: &[Role]) -> Roles {
    if selected.is_empty() {
        return Roles::ALL;
    }
    Roles {
        intake: selected.contains(&Role::Intake),
        worker: selected.contains(&Role::Worker),
        completion: selected.contains(&Role::Completion),
        sweeper: selected.contains(&Role::Sweeper),
    }
}

pub async fn run(
    mut config: Config,
    args: WorkerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.concurrency = args.concurrency;
    config.grace_period = Duration::from_secs(args.grace_secs);
    config.lease = Duration::from_secs(args.lease_secs);
    config.max_request_bytes = args.max_request_bytes;
    config.migrate_on_start = !args.no_migrate;
    config.sweep_interval = Duration::from_secs(args.sweep_secs.max(1));
    config.stuck_after = Duration::from_secs(args.stuck_secs);
    config.sweeper_shards = args.sweeper_shards.max(1);
    config.consumer_timeout = Duration::from_secs(args.consumer_timeout_secs);
    config.task_timeout = Duration::from_secs(args.task_timeout_secs.max(1));
    config.known_pools = args.known_pools;
    let mut builder = Worker::builder().config(config).roles(roles(&args.roles));
    for queue in args.queues {
        builder = builder.queue(queue);
    }
    builder.build().run(shutdown).await?;
    tracing::info!("worker stopped");
    Ok(())
}
