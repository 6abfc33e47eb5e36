//! The store: every SQL statement taskmill runs, each state change a named function.
//!
//! Transitions are conditional UPDATEs whose WHERE names the state they expect, so a
//! stale or duplicate message changes nothing (`rows_affected = 0`) instead of
//! counting twice. Every call is retried on transient errors (lost connection,
//! deadlock, serialization failure, a busy SQLite file) with the policy in
//! `retry.rs`; a write that timed out but landed is recognised on the retry by
//! the same conditions.

mod error;
mod external;
mod feed;
mod handle;
mod job_ends;
mod jobs;
mod leases;
mod outbox;
mod partitions;
mod parts;
mod pg_batch;
mod phases;
mod pools;
mod requests;
mod rerun;
mod results;
mod retention;
mod rows;
mod schedules;
mod stuck;
mod task_rows;
mod tasks;

pub use error::StoreError;
pub use external::{Seen, SyncChange, SyncWrite};
pub use handle::Store;
pub use outbox::TargetOutcome;
#[cfg(test)]
pub(crate) use outbox::EVENT_CLAIM;
pub use parts::{PartClaim, PartsState};
pub use requests::{write_requests, NewRequest};
pub use rerun::{retry_refused, Rerun};
pub use retention::{RemovalRule, Removed};
pub use rows::{
    Claim, JobFilter, NewJob, NewTask, PhaseChange, Recorded, StartOutcome, TaskOutcome,
    Transition, WholeJob,
};
pub use schedules::{Fired, NewSchedule};
pub use stuck::SWEEP_WRITE_BATCH;
pub use results::Throughput;

pub use entity::{job, job_event, job_request, schedule, task};

/// A running job's row as unit tests start from: one task, nothing counted yet.
#[cfg(test)]
pub(crate) fn running_job_for_tests() -> job::Model {
    let now = chrono::Utc::now();
    job::Model {
        id: "j".into(),
        job_type: "t".into(),
        queue: "default".into(),
        stage: crate::state::JobStage::Running.as_str().into(),
        params: serde_json::Value::Null,
        max_retries: 0,
        retry_delay_ms: 0,
        on_failure: crate::protocol::FailurePolicy::FailFast.as_str().into(),
        task_count: 1,
        first_task_id: None,
        done_count: 0,
        failed_count: 0,
        cancelled_count: 0,
        first_error: None,
        on_complete: None,
        tasks_published: true,
        created_at: now,
        updated_at: now,
        started_at: Some(now),
        finished_at: None,
        request_digest: None,
        task_timeout_ms: None,
        results_in_event: false,
        stage_plan: None,
        phase: None,
        phase_first_ordinal: 0,
        result: None,
        sealed_parts: None,
        sealed_tasks: None,
        run: 1,
        fed_through: -1,
        removal_started_at: None,
        tasks_kept: false,
        run_at: None,
    }
}
