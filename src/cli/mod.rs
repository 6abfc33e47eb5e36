//! The `taskmill` command line: one file per subcommand.

pub mod bench;
pub mod cancel;
pub mod dead;
pub mod demo;
pub mod jobs;
pub mod migrate;
pub mod pod;
pub mod progress;
pub mod prune;
pub mod results;
pub mod retry;
pub mod schedule;
pub mod status;
pub mod submit;

use clap::{Args, Parser, Subcommand};
use taskmill::config::Config;
use taskmill::QueueType;

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
