//! The values the store's API speaks in, below every file of the store: the rows to
//! insert, the outcomes to record, and what a transition did.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::phases::{Phase, PhasePlan};
use crate::protocol::{FailurePolicy, JobEvent, Target};
use crate::state::TaskStatus;
use entity::{job, job_event};

/// A job as the intake creates it.
#[derive(Clone, Debug)]
pub struct NewJob {
    /// The job id: the request's, else its AMQP `message_id`, else a new UUID.
    pub id: String,
    /// The request's job type.
    pub job_type: String,
    /// The worker pool its tasks go to.
    pub queue: String,
    /// The request's `params`.
    pub params: Value,
    /// Retries per task after its first attempt.
    pub max_retries: i32,
    /// In milliseconds: attempt n, failing, waits n × this.
    pub retry_delay_ms: i64,
    /// What a task failing for good does to the job.
    pub on_failure: FailurePolicy,
    /// Where the job's event also goes, if anywhere.
    pub on_complete: Option<Target>,
    /// See [`crate::protocol::JobRequest::digest`].
    pub request_digest: String,
    /// The limit on one attempt in milliseconds, when the request set one.
    pub task_timeout_ms: Option<i64>,
    /// The job event should carry the tasks' results.
    pub results_in_event: bool,
    /// The stages after the map stage, for a multi-stage job type.
    pub stage_plan: Option<PhasePlan>,
    /// Not before then: the request's `run_at`.
    pub run_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// One task row to insert.
#[derive(Clone, Debug)]
pub struct NewTask {
    /// The task's position in the job, from 0.
    pub ordinal: i32,
    /// The handler that runs it.
    pub task_type: String,
    /// Its JSON input.
    pub payload: Value,
}

/// Which jobs [`Store::jobs`](super::handle::Store::jobs) lists.
#[derive(Clone, Debug)]
pub struct JobFilter {
    /// Only jobs at this stage.
    pub stage: Option<crate::state::JobStage>,
    /// Only jobs of this type.
    pub job_type: Option<String>,
    /// At most this many, the newest first.
    pub limit: u64,
}

/// A job made in one go: its row and every task row ([`Store::create_whole_jobs`](super::handle::Store::create_whole_jobs)).
#[derive(Clone, Debug)]
pub struct WholeJob {
    /// Its job row.
    pub job: NewJob,
    /// All its tasks, at least one.
    pub tasks: Vec<NewTask>,
}

/// What [`Store::start_job`](super::handle::Store::start_job) did.
#[derive(Debug)]
pub enum StartOutcome {
    /// The job is `running`: its tasks can be published.
    Running(Box<job::Model>),
    /// The job is `running` and its map tasks, all done while it formed, made the
    /// next phase's tasks: a feeder should publish them.
    Advanced(Box<PhaseChange>),
    /// The job had no tasks and ended at once; its event is in the outbox.
    Ended(job_event::Model),
}

/// A multi-stage job that entered a phase ([`crate::phases`]).
#[derive(Clone, Debug)]
pub struct PhaseChange {
    /// The job row as it is now: the new phase's tasks are stored, their messages not
    /// yet published.
    pub job: job::Model,
    /// The phase it entered.
    pub phase: Phase,
    /// Its `job.stage` event, published after the commit (at most once: it reports
    /// progress; nothing waits on it).
    pub event: JobEvent,
}

/// What a completion check did with the jobs it looked at.
#[derive(Debug, Default)]
pub struct Checked {
    /// Events of the jobs it ended, in the outbox, claimed by the caller.
    pub ended: Vec<job_event::Model>,
    /// The multi-stage jobs it moved to their next phase.
    pub advanced: Vec<PhaseChange>,
}

/// A job and how many of its tasks are in each status.
#[derive(Clone, Debug)]
pub struct JobStatus {
    /// The job row.
    pub job: job::Model,
    /// Task counts by status name; a status no task has is absent.
    pub tasks_by_status: BTreeMap<String, i64>,
    /// The same for the tasks of a multi-stage job's current phase; empty for a job of
    /// one stage.
    pub phase_tasks_by_status: BTreeMap<String, i64>,
}

/// A successful claim.
#[derive(Clone, Copy, Debug)]
pub struct Claim {
    /// Starts of this attempt's handler so far (a fresh claim counts its own).
    pub starts: i32,
    /// The attempt was running already, in a worker that died or lost its channel
    /// (or whose lease ran out): it may be what killed that worker.
    pub taken_over: bool,
}

/// How a running attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskOutcome {
    /// `done`, with the handler's result.
    Done(Value),
    /// `failed` for good, with the error.
    Failed(String),
    /// `retrying`: the error, kept in `info` while the next attempt waits.
    Retrying(String),
}

impl TaskOutcome {
    /// What a failed attempt comes to: the one retry-or-fail rule. Attempt `attempt`
    /// is retried while it is at most `max_retries`, so a task runs at most
    /// `max_retries + 1` times; after that it fails for good.
    pub fn of_failure(error: String, attempt: i32, max_retries: i32) -> Self {
        if attempt <= max_retries {
            Self::Retrying(error)
        } else {
            Self::Failed(error)
        }
    }

    /// The status this outcome gives the task.
    pub fn status(&self) -> TaskStatus {
        match self {
            Self::Done(_) => TaskStatus::Done,
            Self::Failed(_) => TaskStatus::Failed,
            Self::Retrying(_) => TaskStatus::Retrying,
        }
    }
}

/// What [`Store::finish_tasks`](super::handle::Store::finish_tasks) did.
#[derive(Debug, Default)]
pub struct Recorded {
    /// The tasks whose outcome was written; the others were duplicates, stale, or
    /// cancelled meanwhile.
    pub ids: std::collections::HashSet<i64>,
    /// The events (in the outbox, claimed by the caller) of the jobs those outcomes
    /// ended in the same transaction.
    pub ended: Vec<job_event::Model>,
    /// The jobs the completion role must still check, from a finished event: a
    /// multi-stage job whose phase is over, or a job whose ending failed here. Every
    /// other job the outcomes touched is either ended or, by its counters read under
    /// its row lock, still going.
    pub to_check: std::collections::BTreeSet<String>,
}

/// The outcome of attempt `attempt` (of run `run`) of task `task_id` of job `job_id`.
#[derive(Clone, Debug)]
pub struct Transition {
    /// The task's job.
    pub job_id: String,
    /// The task's row id.
    pub task_id: i64,
    /// The attempt that ended: only a task running this attempt changes.
    pub attempt: i32,
    /// The job's run the attempt belongs to: a task reset by a later run is left
    /// alone.
    pub run: i32,
    /// How it ended.
    pub outcome: TaskOutcome,
}
