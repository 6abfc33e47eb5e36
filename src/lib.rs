#![warn(missing_docs)]
//! taskmill: a durable job queue for Rust services on RabbitMQ and SQL.
//!
//! A producer publishes a job request; the intake role splits it into task rows and
//! task messages; the worker role runs them and records each outcome before acking;
//! failures come back through the delay ladder's dead-letter queues; the completion role
//! reads each job's counters and ends it exactly once; the sweeper re-sends what got
//! lost. A [`Pod`] runs any of these roles; a [`Client`] submits and waits, and
//! [`submit_in`] submits inside the producer's own database transaction.
//! [`store`] holds every SQL statement and [`amqp::topology`] every queue name. The
//! repository's `docs/protocol.md` describes the wire protocol and
//! `docs/architecture.md` the guarantees and how each is kept.

pub mod amqp;
pub mod builtin;
pub mod caps;
// The command line's doc comments are clap's help text, which writes `[VARIABLE,
// default]` and `<VALUE>`: neither links nor markup for rustdoc.
#[doc(hidden)]
#[allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
pub mod cli;
pub mod client;
mod clock;
pub mod config;
pub mod error;
pub mod external;
mod http;
pub mod known_pools;
pub mod messages;
mod metrics;
mod operations;
mod parting;
pub mod phases;
pub mod pod;
pub mod protocol;
pub mod registry;
pub mod retention;
mod retry;
mod roles;
pub mod schedule;
pub mod state;
pub mod store;
pub mod summary;
pub(crate) mod transactional;

pub use client::{Client, JobParts, Watch};
pub use config::{Config, QueueType};
pub use error::Error;
pub use pod::{Pod, PodBuilder, Roles};
pub use registry::{JobType, Registry, TaskContext, TaskError};
pub use roles::intake::FEED_DEPTH;
pub use transactional::submit_in;

pub use protocol::{FailurePolicy, JobEvent, JobRequest, ResultsWithheld, Target, TaskResult};

pub use state::{JobStage, TaskStatus};
pub use tokio_util::sync::CancellationToken;
