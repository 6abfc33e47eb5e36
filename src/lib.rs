#![warn(missing_docs)]
//! taskmill: a durable job queue for Rust services on RabbitMQ and SQL.
//!
//! A producer publishes a job request; the intake role splits it into task rows and
//! task messages; the worker role runs them and records each outcome before acking;
//! failures come back through the delay ladder's dead-letter queues; the completion role
//! reads each job's counters and ends it exactly once; the sweeper re-sends what got
//! lost. A [`Pod`] runs any of these roles; a [`Client`] submits and waits, and
//! [`submit_in`] submits inside the producer's own database transaction. The
//! repository's `docs/protocol.md` describes the wire protocol and
//! `docs/architecture.md` the guarantees and how each is kept.
//!
//! Everything a user needs is at the crate's root. The modules behind it are the
//! crate's own: the integration tests reach them through the `testing` feature, which
//! is no interface to build on.

/// Declares modules internal: crate-private, or public and hidden from the docs with
/// the `testing` feature.
macro_rules! internal {
    ($($module:ident),* $(,)?) => {$(
        #[cfg(feature = "testing")]
        #[doc(hidden)]
        pub mod $module;
        #[cfg(not(feature = "testing"))]
        mod $module;
    )*};
}

internal!(
    amqp,
    builtin,
    caps,
    client,
    clock,
    config,
    database,
    error,
    external,
    http,
    known_pools,
    messages,
    metrics,
    operations,
    parting,
    phases,
    pod,
    protocol,
    registry,
    retention,
    retry,
    roles,
    schedule,
    state,
    store,
    summary,
    transactional,
);

// The command line's doc comments are clap's help text, which writes `[VARIABLE,
// default]` and `<VALUE>`: neither links nor markup for rustdoc.
#[doc(hidden)]
#[allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
pub mod cli;

/// The protocol's limits and taskmill's defaults, as numbers to check a request
/// against or to read in the docs that name them.
pub mod limits {
    pub use crate::amqp::broker::{CONFIRM_TIMEOUT, CONNECT_TIMEOUT};
    pub use crate::caps::ENVELOPE_BYTES;
    pub use crate::client::WATCH_EXPIRES;
    pub use crate::config::{DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEFAULT_HTTP_ADDR};
    pub use crate::external::FETCH_BATCH;
    pub use crate::parting::{PART_BYTES, PART_TASKS};
    pub use crate::phases::DEFAULT_REDUCE_SHARDS;
    pub use crate::protocol::{
        DEFAULT_MAX_RETRIES, DEFAULT_RETRY_DELAY_MS, MAX_RUN_AT_AHEAD, RESULTS_IN_EVENT_MAX_BYTES,
        RESULTS_IN_EVENT_MAX_TASKS, SCHEMA_VERSION,
    };
    pub use crate::schedule::MAX_CATCH_UP;
}

pub use amqp::broker::BrokerError;
pub use client::{Client, JobParts, Watch};
pub use config::{Config, ConfigError, QueueType, Retention, Token};
pub use database::Store;
pub use error::Error;
pub use external::{Backend, BackendError, ExternalState, ExternalStatus, HttpBackend, Report};
pub use pod::{Pod, PodBuilder, Roles};
pub use protocol::{
    DecodeError, FailurePolicy, JobEvent, JobRequest, ResultsWithheld, Target, TaskResult,
};
pub use registry::{JobType, TaskContext, TaskError};
pub use schedule::{CatchUp, Schedule};
pub use state::{JobStage, TaskStatus};
pub use store::StoreError;
pub use tokio_util::sync::CancellationToken;
pub use transactional::submit_in;
