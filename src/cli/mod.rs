//! The `taskmill` command line: one file per subcommand. It lives in the library so
//! that it can use the internals a library user never sees; the binary only calls
//! [`main`]. It parses the command line, sets up logging and the shutdown token, and
//! hands over to the subcommand. An error ends it with one line on stderr (the error
//! and its causes), never a backtrace: it is a message for an operator.

pub(crate) mod bench;
pub(crate) mod cancel;
pub(crate) mod dead;
pub(crate) mod demo;
pub(crate) mod jobs;
pub(crate) mod migrate;
pub(crate) mod pod;
pub(crate) mod progress;
pub(crate) mod prune;
pub(crate) mod results;
pub(crate) mod retry;
pub(crate) mod schedule;
pub(crate) mod status;
pub(crate) mod submit;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::CancellationToken;
use crate::QueueType;
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "taskmill",
    version,
    about = "A durable job queue on RabbitMQ and SQL"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Connection settings; each also comes from the environment (`Config::from_env`, with
/// every other setting), and a flag given overrides its variable.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// RabbitMQ URL [AMQP_URL, amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long, global = true)]
    pub amqp_url: Option<String>,
    /// Database URL: `sqlite://FILE?mode=rwc` or `postgres://...`
    /// [DATABASE_URL, sqlite://taskmill.db?mode=rwc].
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Prefix of every exchange and queue name [TASKMILL_PREFIX, taskmill].
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// Queue type for the queues taskmill declares [TASKMILL_QUEUE_TYPE, classic].
    #[arg(long, global = true, value_enum)]
    pub queue_type: Option<QueueType>,
    /// Log lines as text or JSON; by default text on a terminal, JSON lines otherwise.
    #[arg(long, global = true, value_enum, env = "TASKMILL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// How the binary writes its log lines (to stderr).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one readable line per event.
    Text,
    /// For log collectors: one JSON object per line, span fields (job and task ids)
    /// included.
    Json,
}

impl LogFormat {
    /// The format asked for, else text when stderr is a terminal and JSON otherwise.
    pub fn chosen(asked: Option<Self>, stderr_is_terminal: bool) -> Self {
        asked.unwrap_or(if stderr_is_terminal {
            Self::Text
        } else {
            Self::Json
        })
    }
}

impl GlobalArgs {
    /// The environment's configuration with the flags given on top.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::from_env()?;
        if let Some(url) = &self.amqp_url {
            config.amqp_url = url.clone();
        }
        if let Some(url) = &self.database_url {
            config.database_url = url.clone();
        }
        if let Some(prefix) = &self.prefix {
            config.prefix = prefix.clone();
        }
        if let Some(queue_type) = self.queue_type {
            config.queue_type = queue_type;
        }
        Ok(config)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply database migrations.
    Migrate,
    /// Run a worker pod: taskmill's roles, until SIGINT/SIGTERM.
    Worker(pod::PodArgs),
    /// Submit a job; print its id.
    Submit(submit::SubmitArgs),
    /// Show a job's stage and task counts.
    Status(status::StatusArgs),
    /// List the newest jobs with their progress, failures, age and rate.
    Jobs(jobs::JobsArgs),
    /// Stream a job's task results and errors in task order.
    Results(results::ResultsArgs),
    /// Cancel a running job.
    Cancel(cancel::CancelArgs),
    /// Run a failed job's failed and cancelled tasks again, with fresh attempts.
    Retry(retry::RetryArgs),
    /// Run every role in-process, submit a demo job, wait, and print a summary.
    Demo(demo::DemoArgs),
    /// Remove ended jobs past their retention (or older than asked) with all their rows.
    Prune(prune::PruneArgs),
    /// The parking lot: list, replay or purge messages that could not be processed.
    Dead(dead::DeadArgs),
    /// Periodic jobs: add, list or remove a schedule.
    Schedule(schedule::ScheduleArgs),
    /// Measure the machine's limits and taskmill against them.
    Bench(bench::BenchArgs),
}

/// Runs the `taskmill` command line as the process: its exit code.
pub fn main() -> i32 {
    // Before the runtime starts its threads: arenas are made as threads first allocate.
    malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(Cli::parse())) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("taskmill: {err:#}");
            1
        }
    }
}

/// Caps glibc's malloc at one arena per core, unless `MALLOC_ARENA_MAX` says otherwise.
/// glibc's own cap is eight per core, and a pod's threads (the runtime's, and on SQLite
/// one per connection) each end up with an arena that keeps what it once held: a
/// 100,000-task job on SQLite peaked at 91–94 MiB with glibc's cap and at 66–76 MiB
/// with this one on 2 cores, in the same time. One arena for all kept it at 62 MiB but
/// made that job 30–60% slower, its threads waiting on the one arena's lock.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // SAFETY: mallopt only sets a tunable, and no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc_arenas() {}

/// Runs the command; its exit code.
async fn run(cli: Cli) -> anyhow::Result<i32> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| EnvFilter::new("warn,taskmill=info")),
        )
        .with_writer(std::io::stderr);
    match LogFormat::chosen(cli.global.log_format, std::io::stderr().is_terminal()) {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let config = cli.global.config()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match cli.command {
        Command::Migrate => self::migrate::run(&config).await.map(|()| 0),
        Command::Worker(args) => self::pod::run(config, args, shutdown).await.map(|()| 0),
        Command::Submit(args) => self::submit::run(&config, args, shutdown).await,
        Command::Status(args) => self::status::run(&config, args).await,
        Command::Jobs(args) => self::jobs::run(&config, args).await.map(|()| 0),
        Command::Results(args) => self::results::run(&config, args).await,
        Command::Cancel(args) => self::cancel::run(&config, args).await,
        Command::Retry(args) => self::retry::run(&config, args).await,
        Command::Demo(args) => self::demo::run(config, args, shutdown).await,
        Command::Prune(args) => self::prune::run(&config, args, shutdown).await,
        Command::Dead(args) => self::dead::run(&config, args).await.map(|()| 0),
        Command::Schedule(args) => self::schedule::run(&config, args).await,
        Command::Bench(args) => self::bench::run(&config, args).await.map(|()| 0),
    }
}

/// The first SIGINT/SIGTERM starts a graceful shutdown; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    for round in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if round == 0 {
            tracing::info!("shutting down gracefully; signal again to exit at once");
            shutdown.cancel();
        } else {
            std::process::exit(130);
        }
    }
}
