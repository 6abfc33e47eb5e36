//! Configuration: one typed struct, read once from the environment by
//! [`Config::from_env`] (every variable docs/reference.md lists), and overridden by
//! CLI flags in the binary.

use std::net::SocketAddr;
use std::time::Duration;

/// The default [`Config::amqp_url`]: RabbitMQ on 127.0.0.1:5672, user `guest`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The default [`Config::database_url`]: the SQLite file `taskmill.db` in the working
/// directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://taskmill.db?mode=rwc";
/// The default [`Config::prefix`].
pub const DEFAULT_PREFIX: &str = "taskmill";
/// The parking lot's bound unless `TASKMILL_PARKING_MAX` says otherwise: Sidekiq's
/// dead set keeps 10,000 jobs too.
pub const DEFAULT_PARKING_MAX: u32 = 10_000;
/// The pool a request goes to when it names none; requests may always name it.
pub const DEFAULT_QUEUE: &str = "default";
/// Task messages a worker holds per pool by default (see [`Config::prefetch`]).
pub const DEFAULT_PREFETCH: usize = 256;

/// The default [`Config::http_addr`]: every interface, port 9464.
pub const DEFAULT_HTTP_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9464);

/// Classic queues suit one node; quorum queues replicate across a RabbitMQ cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// Classic queues: the default.
    #[default]
    Classic,
    /// Quorum queues (`TASKMILL_QUEUE_TYPE=quorum`); watch queues stay classic.
    Quorum,
}

/// An environment variable that does not hold what it should.
#[derive(Debug, thiserror::Error)]
#[error("{variable}={value:?}: {expected}")]
pub struct ConfigError {
    /// The variable's name.
    pub variable: &'static str,
    /// What it held.
    pub value: String,
    /// What it should hold, such as `a whole number`.
    pub expected: &'static str,
}

/// Everything a pod or client is configured with: [`Config::default`] holds the
/// defaults, [`Config::from_env`] reads the environment over them.
#[derive(Clone, Debug)]
pub struct Config {
    /// The broker's URL (`AMQP_URL`); [`DEFAULT_AMQP_URL`] by default. Several,
    /// comma-separated, for the nodes of a cluster: a pod starts at one of them at
    /// random and, when its node is away, reconnects to the next that answers.
    pub amqp_url: String,
    /// The database's URL, PostgreSQL or SQLite (`DATABASE_URL`);
    /// [`DEFAULT_DATABASE_URL`] by default.
    pub database_url: String,
    /// Every exchange and queue name starts with it, so several deployments can share
    /// a broker.
    pub prefix: String,
    /// The type of the queues the deployment declares (`TASKMILL_QUEUE_TYPE`); classic by
    /// default.
    pub queue_type: QueueType,
    /// Job requests larger than this are parked unread.
    pub max_request_bytes: usize,
    /// The cap on every payload taskmill makes: a task's payload or
    /// result, a reduce or finalize task's input, a job's result. Never above
    /// `max_request_bytes` less [`ENVELOPE_BYTES`](crate::caps::ENVELOPE_BYTES).
    pub max_payload_bytes: usize,
    /// Handlers running at once per worker pod and pool.
    pub concurrency: usize,
    /// Task messages a worker pod holds per pool (the channel's prefetch): waiting for a
    /// handler, running, or being recorded and acked. Past `concurrency`, the rest keep
    /// the database and broker busy while handlers run: a handler's slot frees when it
    /// returns, not when its outcome is committed and acked. Never below `concurrency`.
    pub prefetch: usize,
    /// A running task's claim lasts this long unless renewed; past it, another worker
    /// may take the task over.
    pub lease: Duration,
    /// Starts of one attempt before the task is failed as a crash loop.
    pub max_starts: i32,
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
    /// A job still forming this long after its creation, or (sent in parts) after its
    /// last part or seal, lost its request or parts: it is failed.
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
    /// Where a pod serves its probes, metrics and dashboard (`TASKMILL_HTTP_ADDR`;
    /// `off` for nowhere); [`DEFAULT_HTTP_ADDR`] by default. Port 0 picks a free one.
    pub http_addr: Option<SocketAddr>,
    /// When `http_addr` is in use (another pod on the same host), serve on a free port
    /// of the same interface instead, with a warning that names it. On by default, so
    /// that several pods run on one machine at their defaults; `TASKMILL_HTTP_ADDR`
    /// and `--http-addr` turn it off: an address asked for is served there or the pod
    /// stops at start.
    pub http_addr_fallback: bool,
    /// What the dashboard needs to show anything, and with which its write actions
    /// (replay, cancel, retry) are allowed (`TASKMILL_DASHBOARD_TOKEN`). Without it a
    /// pod makes a token of its own at start, logs the dashboard's URL with it, and
    /// the dashboard is read-only.
    pub dashboard_token: Option<Token>,
    /// How long ended jobs are kept once their event is delivered ([`Retention`]).
    pub retention: Retention,
    /// How often the cleaner looks for jobs past their retention.
    pub clean_interval: Duration,
    /// On PostgreSQL, the span of job creation times whose tasks share a partition
    /// (`TASKMILL_PARTITION_SPAN`); a day by default.
    pub partition_span: Duration,
    /// The parking lot's bound in messages (`TASKMILL_PARKING_MAX`; 10,000 by default):
    /// past it a message that would be parked is dropped with an error log instead.
    pub parking_max: u32,
}

/// How long ended jobs and all their rows are kept after they end (and their event
/// is delivered): `None` keeps them for ever. The defaults follow River's job
/// cleaner: a day for jobs that ended as asked, a week for failed ones, which
/// someone may still want to read or retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Jobs that ended `done` or `cancelled` (`TASKMILL_RETENTION`); 24 h by default.
    pub ended: Option<Duration>,
    /// Jobs that ended `failed` (`TASKMILL_RETENTION_FAILED`); 7 days by default.
    pub failed: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            ended: Some(Duration::from_secs(24 * 3600)),
            failed: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

impl Retention {
    /// Keeps every job for ever.
    pub const FOREVER: Retention = Retention {
        ended: None,
        failed: None,
    };
}

/// A retention setting: a duration such as `90s`, `30m`, `24h` or `7d`, or `off`
/// (kept for ever).
pub fn parse_retention(value: &str) -> Option<Option<Duration>> {
    match value.trim() {
        "off" | "forever" => Some(None),
        value => humantime::parse_duration(value).ok().map(Some),
    }
}

/// A secret that never shows in `Debug` output or logs, compared in constant time.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// A token; `None` for an empty one, which would let anyone in.
    pub fn new(secret: impl Into<String>) -> Option<Self> {
        let secret = secret.into();
        (!secret.is_empty()).then_some(Self(secret))
    }

    /// A new random token: 122 random bits (a v4 UUID), as 32 hex digits.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Whether `given` is this token, in time that depends on the lengths only.
    pub fn matches(&self, given: &str) -> bool {
        self.matches_bytes(given.as_bytes())
    }

    /// [`Self::matches`] for bytes.
    pub(crate) fn matches_bytes(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(given).into()
    }

    /// The secret itself: for the one log line that hands a generated token to the
    /// operator, and for a cookie carrying it back.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            prefix: DEFAULT_PREFIX.to_owned(),
            queue_type: QueueType::Classic,
            max_request_bytes: 16 * 1024 * 1024,
            max_payload_bytes: crate::caps::DEFAULT_MAX_PAYLOAD_BYTES,
            concurrency: 32,
            prefetch: DEFAULT_PREFETCH,
            lease: Duration::from_secs(300),
            max_starts: 5,
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
            http_addr: Some(DEFAULT_HTTP_ADDR),
            http_addr_fallback: true,
            dashboard_token: None,
            retention: Retention::default(),
            clean_interval: Duration::from_secs(60),
            partition_span: Duration::from_secs(24 * 3600),
            parking_max: DEFAULT_PARKING_MAX,
        }
    }
}

impl Config {
    /// The defaults, overridden by every variable that is set. The variables, their
    /// defaults and their flags are listed once, in the repository's
    /// `docs/reference.md` (a test holds that list to this function). A value that does
    /// not parse is an error, not a silent default.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Config::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        let vars = Vars(&var);
        if let Some(url) = var("AMQP_URL") {
            config.amqp_url = url;
        }
        if let Some(url) = var("DATABASE_URL") {
            config.database_url = url;
        }
        if let Some(prefix) = var("TASKMILL_PREFIX") {
            config.prefix = prefix;
        }
        if let Some(kind) = var("TASKMILL_QUEUE_TYPE") {
            config.queue_type = match kind.as_str() {
                "classic" => QueueType::Classic,
                "quorum" => QueueType::Quorum,
                _ => {
                    return Err(ConfigError {
                        variable: "TASKMILL_QUEUE_TYPE",
                        value: kind,
                        expected: "classic or quorum",
                    })
                }
            };
        }
        if let Some(pools) = var("TASKMILL_KNOWN_POOLS") {
            config.known_pools = list(&pools);
        }
        vars.number("TASKMILL_CONCURRENCY", &mut config.concurrency)?;
        vars.number("TASKMILL_PREFETCH", &mut config.prefetch)?;
        vars.seconds("TASKMILL_GRACE_SECS", &mut config.grace_period)?;
        vars.seconds("TASKMILL_LEASE_SECS", &mut config.lease)?;
        vars.number("TASKMILL_MAX_REQUEST_BYTES", &mut config.max_request_bytes)?;
        vars.number("TASKMILL_MAX_PAYLOAD_BYTES", &mut config.max_payload_bytes)?;
        vars.seconds("TASKMILL_SWEEP_SECS", &mut config.sweep_interval)?;
        vars.seconds("TASKMILL_STUCK_SECS", &mut config.stuck_after)?;
        vars.number("TASKMILL_SWEEPER_SHARDS", &mut config.sweeper_shards)?;
        vars.seconds("TASKMILL_FORMATION_SECS", &mut config.formation_timeout)?;
        vars.seconds("TASKMILL_TASK_TIMEOUT_SECS", &mut config.task_timeout)?;
        vars.seconds(
            "TASKMILL_CONSUMER_TIMEOUT_SECS",
            &mut config.consumer_timeout,
        )?;
        if let Some(addr) = var("TASKMILL_HTTP_ADDR") {
            config.http_addr = match addr.trim() {
                "off" => None,
                addr => Some(addr.parse().map_err(|_| ConfigError {
                    variable: "TASKMILL_HTTP_ADDR",
                    value: addr.to_owned(),
                    expected: "an address and port such as 0.0.0.0:9464, or off",
                })?),
            };
            config.http_addr_fallback = false;
        }
        if let Some(token) = var("TASKMILL_DASHBOARD_TOKEN") {
            config.dashboard_token = Token::new(token);
        }
        vars.retention("TASKMILL_RETENTION", &mut config.retention.ended)?;
        vars.retention("TASKMILL_RETENTION_FAILED", &mut config.retention.failed)?;
        vars.seconds("TASKMILL_CLEAN_SECS", &mut config.clean_interval)?;
        vars.number("TASKMILL_PARKING_MAX", &mut config.parking_max)?;
        if let Some(span) = var("TASKMILL_PARTITION_SPAN") {
            config.partition_span = humantime::parse_duration(span.trim())
                .ok()
                .filter(|span| *span >= Duration::from_secs(1))
                .ok_or(ConfigError {
                    variable: "TASKMILL_PARTITION_SPAN",
                    value: span,
                    expected: "a duration of a second or more, such as 6h or 1d",
                })?;
        }
        Ok(config)
    }

    /// The settings a pod runs with: numbers that would stall or panic are raised to
    /// their least workable value (one handler, one shard, a one-second sweep interval
    /// and task timeout); `prefetch` fits `basic.qos` and holds at least `concurrency`
    /// messages, which holds at least one.
    pub(crate) fn normalized(mut self) -> Self {
        self.concurrency = self.concurrency.clamp(1, u16::MAX as usize);
        self.prefetch = self.prefetch.clamp(self.concurrency, u16::MAX as usize);
        self.sweeper_shards = self.sweeper_shards.max(1);
        self.sweep_interval = self.sweep_interval.max(Duration::from_millis(1));
        self.clean_interval = self.clean_interval.max(Duration::from_millis(1));
        self.task_timeout = self.task_timeout.max(Duration::from_millis(1));
        // A task message holding a payload at the cap must pass the workers' limit.
        self.max_payload_bytes = self.max_payload_bytes.clamp(
            1,
            self.max_request_bytes
                .saturating_sub(crate::caps::ENVELOPE_BYTES)
                .max(1),
        );
        self
    }
}

/// A comma-separated list, blanks dropped.
pub fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

struct Vars<'a, F>(&'a F);

impl<F: Fn(&str) -> Option<String>> Vars<'_, F> {
    fn number<T: std::str::FromStr>(
        &self,
        variable: &'static str,
        into: &mut T,
    ) -> Result<(), ConfigError> {
        let Some(value) = (self.0)(variable) else {
            return Ok(());
        };
        *into = value.trim().parse().map_err(|_| ConfigError {
            variable,
            value,
            expected: "a whole number",
        })?;
        Ok(())
    }

    fn retention(
        &self,
        variable: &'static str,
        into: &mut Option<Duration>,
    ) -> Result<(), ConfigError> {
        let Some(value) = (self.0)(variable) else {
            return Ok(());
        };
        *into = parse_retention(&value).ok_or(ConfigError {
            variable,
            value,
            expected: "a duration such as 90s, 30m, 24h or 7d, or off",
        })?;
        Ok(())
    }

    fn seconds(&self, variable: &'static str, into: &mut Duration) -> Result<(), ConfigError> {
        let mut seconds = into.as_secs();
        self.number(variable, &mut seconds)?;
        *into = Duration::from_secs(seconds);
        Ok(())
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
    use std::collections::HashMap;
    use std::time::Duration;

    use super::{redacted, Config, QueueType};

    fn from(vars: &[(&str, &str)]) -> Result<Config, super::ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn every_documented_variable_is_read() {
        let config = from(&[
            ("AMQP_URL", "amqp://a"),
            ("DATABASE_URL", "postgres://d"),
            ("TASKMILL_PREFIX", "p"),
            ("TASKMILL_QUEUE_TYPE", "quorum"),
            ("TASKMILL_KNOWN_POOLS", "gpu, cpu,,"),
            ("TASKMILL_CONCURRENCY", "7"),
            ("TASKMILL_PREFETCH", "16"),
            ("TASKMILL_GRACE_SECS", "8"),
            ("TASKMILL_LEASE_SECS", "9"),
            ("TASKMILL_MAX_REQUEST_BYTES", "10"),
            ("TASKMILL_SWEEP_SECS", "11"),
            ("TASKMILL_STUCK_SECS", "12"),
            ("TASKMILL_SWEEPER_SHARDS", "13"),
            ("TASKMILL_TASK_TIMEOUT_SECS", "14"),
            ("TASKMILL_CONSUMER_TIMEOUT_SECS", "15"),
            ("TASKMILL_FORMATION_SECS", "16"),
            ("TASKMILL_HTTP_ADDR", "127.0.0.1:17"),
            ("TASKMILL_DASHBOARD_TOKEN", "s3cret"),
            ("TASKMILL_RETENTION", "90m"),
            ("TASKMILL_RETENTION_FAILED", "off"),
            ("TASKMILL_CLEAN_SECS", "18"),
            ("TASKMILL_PARTITION_SPAN", "6h"),
            ("TASKMILL_PARKING_MAX", "19"),
        ])
        .unwrap();
        assert_eq!(config.amqp_url, "amqp://a");
        assert_eq!(config.database_url, "postgres://d");
        assert_eq!(config.prefix, "p");
        assert_eq!(config.queue_type, QueueType::Quorum);
        assert_eq!(config.known_pools, ["gpu", "cpu"]);
        assert_eq!(config.concurrency, 7);
        assert_eq!(config.prefetch, 16);
        assert_eq!(config.grace_period, Duration::from_secs(8));
        assert_eq!(config.lease, Duration::from_secs(9));
        assert_eq!(config.max_request_bytes, 10);
        assert_eq!(config.sweep_interval, Duration::from_secs(11));
        assert_eq!(config.stuck_after, Duration::from_secs(12));
        assert_eq!(config.sweeper_shards, 13);
        assert_eq!(config.task_timeout, Duration::from_secs(14));
        assert_eq!(config.consumer_timeout, Duration::from_secs(15));
        assert_eq!(config.formation_timeout, Duration::from_secs(16));
        assert_eq!(config.http_addr, Some("127.0.0.1:17".parse().unwrap()));
        assert_eq!(config.retention.ended, Some(Duration::from_secs(90 * 60)));
        assert_eq!(config.retention.failed, None);
        assert_eq!(config.clean_interval, Duration::from_secs(18));
        assert_eq!(config.partition_span, Duration::from_secs(6 * 3600));
        assert_eq!(config.parking_max, 19);
        assert!(!config.http_addr_fallback, "an address asked for is kept");
        let token = config.dashboard_token.unwrap();
        assert!(token.matches("s3cret") && !token.matches("s3cre") && !token.matches(""));
        assert_eq!(format!("{token:?}"), "Token(***)");
        assert_eq!(
            from(&[("TASKMILL_HTTP_ADDR", "off")]).unwrap().http_addr,
            None
        );
    }

    #[test]
    fn unset_variables_keep_the_defaults() {
        let config = from(&[]).unwrap();
        let default = Config::default();
        assert_eq!(config.concurrency, default.concurrency);
        assert_eq!(config.amqp_url, default.amqp_url);
        assert_eq!(config.task_timeout, default.task_timeout);
        assert!(config.http_addr_fallback);
    }

    #[test]
    fn a_value_that_does_not_parse_is_an_error() {
        let err = from(&[("TASKMILL_CONCURRENCY", "lots")]).unwrap_err();
        assert_eq!(err.variable, "TASKMILL_CONCURRENCY");
        assert!(from(&[("TASKMILL_QUEUE_TYPE", "stream")]).is_err());
        assert!(from(&[("TASKMILL_GRACE_SECS", "-1")]).is_err());
        assert!(from(&[("TASKMILL_HTTP_ADDR", "9464")]).is_err());
        assert!(from(&[("TASKMILL_RETENTION", "a while")]).is_err());
        assert!(from(&[("TASKMILL_RETENTION_FAILED", "-7d")]).is_err());
        assert!(from(&[("TASKMILL_PARTITION_SPAN", "0s")]).is_err());
    }

    #[test]
    fn normalized_settings_cannot_stall_a_pod() {
        let config = Config {
            concurrency: 0,
            sweeper_shards: 0,
            sweep_interval: Duration::ZERO,
            task_timeout: Duration::ZERO,
            ..Config::default()
        }
        .normalized();
        assert_eq!((config.concurrency, config.sweeper_shards), (1, 1));
        // A small request limit leaves the payload cap all but a task message's
        // envelope of it.
        let small = Config {
            max_request_bytes: 65_536,
            ..Config::default()
        }
        .normalized();
        assert_eq!(
            small.max_payload_bytes,
            65_536 - crate::caps::ENVELOPE_BYTES
        );
        assert!(!config.sweep_interval.is_zero() && !config.task_timeout.is_zero());
        let wide = Config {
            concurrency: 1 << 20,
            ..Config::default()
        }
        .normalized();
        assert_eq!(
            (wide.concurrency, wide.prefetch),
            (u16::MAX as usize, u16::MAX as usize)
        );
        let shallow = Config {
            concurrency: 64,
            prefetch: 8,
            ..Config::default()
        }
        .normalized();
        assert_eq!(
            shallow.prefetch, 64,
            "a handler never waits for a message slot"
        );
    }

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
