//! taskmill: a durable job queue for Rust services on RabbitMQ and SQL.
//!
//! A producer publishes a job request; [`intake`] splits it into task rows and task
//! messages; [`worker`] runs them and records each outcome before acking; failures come
//! back through the delay ladder's dead-letter queues; [`completion`] reads each job's counters and
//! ends each job exactly once. [`store`] holds every SQL statement and [`topology`] every
//! queue name. The repository's `docs/protocol.md` describes the wire protocol and
//! `docs/architecture.md` the guarantees and how each is kept.

mod acks;
pub mod broker;
pub mod builtin;
pub mod client;
mod clock;
pub mod completion;
pub mod config;
mod dispatch;
pub mod error;
pub mod events;
pub mod intake;
pub mod link;
pub mod parking;
pub mod pod;
pub mod pools;
pub mod protocol;
pub mod registry;
pub mod retry;
pub mod state;
pub mod store;
pub mod sweeper;
pub mod topology;
pub mod worker;

pub use client::{Client, Watch};
pub use config::{Config, QueueType};
pub use error::Error;
pub use pod::{Roles, Worker, WorkerBuilder};
pub use registry::{Registry, TaskContext, TaskError};

pub use protocol::{FailurePolicy, JobEvent, JobRequest, Target};

pub use state::{JobStage, TaskStatus};
pub use tokio_util::sync::CancellationToken;
