//! Configuration: one typed struct, read once from the environment (and overridden by
//! CLI flags in the binary).

use std::time::Duration;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://taskmill.db?mode=rwc";
pub const DEFAULT_PREFIX: &str = "taskmill";
pub const DEFAULT_QUEUE: &str = "default";

/// Classic queues suit one node; quorum queues replicate across a RabbitMQ cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub amqp_url: String,
    pub database_url: String,
    /// Every exchange and queue name starts with it, so several deployments can share
    /// a broker.
    pub prefix: String,
    pub queue_type: QueueType,
    /// Job requests larger than this are parked unread.
    pub max_request_bytes: usize,
    /// Handlers running at once per worker pod and queue.
    pub concurrency: usize,
    /// A running task's claim lasts this long unless renewed; past it, another worker
    /// may take the task over.
    pub lease: Duration,
    /// Claims of one attempt before the task is failed as a crash loop.
    pub max_deliveries: i32,
    /// How long shutdown waits for in-flight handlers.
    pub grace_period: Duration,
    /// Run migrations when a pod starts.
    pub migrate_on_start: bool,
    /// Database connection pool size.
    pub db_pool_size: u32,
    /// How often the sweeper looks for stuck work.
    pub sweep_interval: Duration,
    /// A task that should be moving but has not changed for this long is stuck.
    pub stuck_after: Duration,
    /// Shards the sweeper scans in parallel (task id modulo).
    pub sweeper_shards: u32,
    /// A job still forming after this long lost its request: it is failed.
    pub formation_timeout: Duration,
    /// How long one attempt may run when neither the job nor the handler's
    /// registration says: then the handler is told to stop, dropped shortly after, and
    /// the attempt fails (retryably) as timed out.
    pub task_timeout: Duration,
    /// The broker's `consumer_timeout`: a delivery unacked for longer gets its channel
    /// closed. Handlers nearing it are logged, so the setting can be raised in time.
    pub consumer_timeout: Duration,
    /// Pools requests may name besides `default` and those a pod has served: for
    /// pools whose pods start after the intake.
    pub known_pools: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            prefix: DEFAULT_PREFIX.to_owned(),
            queue_type: QueueType::Classic,
            max_request_bytes: 16 * 1024 * 1024,
            concurrency: 32,
            lease: Duration::from_secs(300),
            max_deliveries: 5,
            grace_period: Duration::from_secs(30),
            migrate_on_start: true,
            db_pool_size: 16,
            sweep_interval: Duration::from_secs(30),
            stuck_after: Duration::from_secs(300),
            sweeper_shards: 4,
            formation_timeout: Duration::from_secs(1800),
            consumer_timeout: Duration::from_secs(1800),
            task_timeout: Duration::from_secs(60),
            known_pools: Vec::new(),
        }
    }
}

impl Config {
    /// Defaults overridden by `AMQP_URL`, `DATABASE_URL`, `TASKMILL_PREFIX`,
    /// `TASKMILL_QUEUE_TYPE` (`classic` or `quorum`) and `TASKMILL_KNOWN_POOLS`
    /// (comma-separated).
    pub fn from_env() -> Self {
        let mut config = Self::default();
        if let Ok(url) = std::env::var("AMQP_URL") {
            config.amqp_url = url;
        }
        if let Ok(url) = std::env::var("DATABASE_URL") {
            config.database_url = url;
        }
        if let Ok(prefix) = std::env::var("TASKMILL_PREFIX") {
            config.prefix = prefix;
        }
        if let Ok(kind) = std::env::var("TASKMILL_QUEUE_TYPE") {
            config.queue_type = match kind.as_str() {
                "quorum" => QueueType::Quorum,
                _ => QueueType::Classic,
            };
        }
        if let Ok(pools) = std::env::var("TASKMILL_KNOWN_POOLS") {
            config.known_pools = pools
                .split(',')
                .map(str::trim)
                .filter(|pool| !pool.is_empty())
                .map(str::to_owned)
                .collect();
        }
        config
    }
}

/// A connection URL fit for output: its password, if any, replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_never_reach_output() {
        assert_eq!(
            redacted("postgres://app:s3cret@db:5432/taskmill"),
            "postgres://app:***@db:5432/taskmill"
        );
        assert_eq!(
            redacted("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redacted("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redacted("sqlite://taskmill.db?mode=rwc"),
            "sqlite://taskmill.db?mode=rwc"
        );
    }
}
