//! The `taskmill` command line: one file per subcommand.

pub mod bench;
pub mod cancel;
pub mod dead;
pub mod demo;
pub mod migrate;
pub mod status;
pub mod submit;
pub mod worker;

use clap::{Args, Parser, Subcommand};
use taskmill::config::{Config, DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEFAULT_PREFIX};
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

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// RabbitMQ URL.
    #[arg(long, global = true, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,
    /// Database URL: `sqlite://FILE?mode=rwc` or `postgres://...`.
    #[arg(long, global = true, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Prefix of every exchange and queue name.
    #[arg(long, global = true, env = "TASKMILL_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Queue type for the queues taskmill declares.
    #[arg(long, global = true, env = "TASKMILL_QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,
}

impl GlobalArgs {
    pub fn config(&self) -> Config {
        Config {
            amqp_url: self.amqp_url.clone(),
            database_url: self.database_url.clone(),
            prefix: self.prefix.clone(),
            queue_type: self.queue_type,
            ..Config::default()
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply database migrations.
    Migrate,
    /// Run taskmill's roles until SIGINT/SIGTERM.
    Worker(worker::WorkerArgs),
    /// Submit a job; print its id.
    Submit(submit::SubmitArgs),
    /// Show a job's stage and task counts.
    Status(status::StatusArgs),
    /// Cancel a running job.
    Cancel(cancel::CancelArgs),
    /// Run every role in-process, submit a demo job, wait, and print a summary.
    Demo(demo::DemoArgs),
    /// The parking lot: list, replay or purge messages that could not be processed.
    Dead(dead::DeadArgs),
    /// Measure the machine's limits and taskmill against them.
    Bench(bench::BenchArgs),
}
