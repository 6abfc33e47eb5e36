//! The store: every SQL statement taskmill runs, each state change a named function.
//!
//! Transitions are conditional UPDATEs whose WHERE names the state they expect, so a
//! stale or duplicate message changes nothing (`rows_affected = 0`) instead of
//! counting twice. Every call is retried on transient errors (lost connection,
//! deadlock, serialization failure, a busy SQLite file) with the policy in
//! `retry.rs`; a write that timed out but landed is recognised on the retry by
//! the same conditions.

mod error;
mod feed;
mod handle;
mod job_ends;
mod jobs;
mod outbox;
mod pg_batch;
mod pools;
mod results;
mod rows;
mod stages;
mod stuck;
mod task_rows;
mod tasks;

pub use error::StoreError;
pub use handle::Store;
pub use outbox::{TargetOutcome, EVENT_CLAIM};
pub use pools::SilentPool;
pub use results::ResultStream;
pub use rows::{
    Checked, Claim, JobStatus, NewJob, NewTask, PhaseChange, StartOutcome, TaskOutcome, Transition,
    WholeJob,
};
pub use stuck::SWEEP_WRITE_BATCH;

pub use entity::{job, job_event, pool, task};
