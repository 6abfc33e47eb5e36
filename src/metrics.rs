//! Metrics: every name taskmill exports and the one place each is recorded, through the
//! `metrics` facade; the pod's HTTP endpoint renders them in Prometheus text format.
//!
//! Labels are bounded sets only — pool, task type, job type, outcome, stage, role,
//! queue — never a job or task id. A job type comes from a producer's request, so it is
//! a label only when a pod of this process registered it ([`register_job_types`]);
//! any other is `other`. Known label sets are registered at zero when a role
//! starts ([`register_pool`]), so an idle pool exports 0 rather than nothing. Without
//! a recorder installed (a pod serving no HTTP, a library user who did not ask) every
//! call here is a no-op.

use std::collections::BTreeSet;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Task attempts a worker started its handler for.
const TASKS_STARTED: &str = "taskmill_tasks_started_total";
/// Attempts recorded, by outcome: `done`, `retried`, `failed`.
const TASKS_PROCESSED: &str = "taskmill_tasks_processed_total";
/// Messages sent to the parking lot, by the queue they came from.
const MESSAGES_PARKED: &str = "taskmill_messages_parked_total";
/// Messages that would have been parked but found the lot at its bound, dropped.
const PARKS_REFUSED: &str = "taskmill_parks_refused_total";
/// The parking lot's bound, beside `taskmill_queue_ready_messages` of the lot.
const PARKING_MAX: &str = "taskmill_parking_max_messages";
const TASK_DURATION: &str = "taskmill_task_duration_seconds";
const TASK_LATENCY: &str = "taskmill_task_latency_seconds";
const TASKS_IN_FLIGHT: &str = "taskmill_tasks_in_flight";
const PIPELINE_MESSAGES: &str = "taskmill_worker_pipeline_messages";
const JOBS_FINISHED: &str = "taskmill_jobs_finished_total";
const JOBS: &str = "taskmill_jobs";
const QUEUE_READY: &str = "taskmill_queue_ready_messages";
const OUTBOX_BACKLOG: &str = "taskmill_outbox_backlog";
const REQUESTS_WAITING: &str = "taskmill_requests_waiting";
const SCHEDULE_NEXT_TICK: &str = "taskmill_schedule_next_tick_timestamp_seconds";
const SCHEDULE_LAST_TICK: &str = "taskmill_schedule_last_tick_timestamp_seconds";
const BROKER_RECONNECTS: &str = "taskmill_broker_reconnects_total";
const ROLE_RESTARTS: &str = "taskmill_role_restarts_total";
const CHANNELS_REOPENED: &str = "taskmill_publisher_channels_reopened_total";
const DATABASE_RETRIES: &str = "taskmill_database_retries_total";
const SWEEPER_ACTIONS: &str = "taskmill_sweeper_actions_total";
/// Rows the cleaner and `taskmill prune` removed: `kind` is `jobs` or `tasks`.
const ROWS_REMOVED: &str = "taskmill_retention_removed_total";
/// Task messages of a job's earlier run (from before `taskmill retry`), dropped.
const STALE_RUN_MESSAGES: &str = "taskmill_stale_run_messages_total";

/// Histogram buckets, in seconds: from a millisecond to an hour, so both a queue of
/// 1 ms tasks and one of long batch work land in distinct buckets.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// How an attempt ended, as its metric label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    Retried,
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Done, Outcome::Retried, Outcome::Failed];

    fn label(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retried => "retried",
            Self::Failed => "failed",
        }
    }
}

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The job types the pods of this process registered handlers, splitters or stages
/// for: the only values of a `job_type` label.
static JOB_TYPES: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());

/// The `job_type` label of a job type no pod here registered.
const OTHER_JOB_TYPE: &str = "other";

/// The process's Prometheus recorder, installed on first use. `None` when the
/// application installed another `metrics` recorder first: its exporter then has
/// taskmill's metrics, and the pod's `/metrics` says so.
pub(crate) fn prometheus() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
                .and_then(|builder| builder.install_recorder());
            match installed {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(err) => {
                    tracing::warn!(%err, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    describe_counter!(TASKS_STARTED, "Task attempts whose handler started");
    describe_counter!(
        TASKS_PROCESSED,
        "Task attempts recorded, by outcome (done, retried, failed)"
    );
    describe_counter!(MESSAGES_PARKED, "Messages sent to the parking lot");
    describe_counter!(
        PARKS_REFUSED,
        "Messages dropped instead of parked because the parking lot was at its bound"
    );
    describe_gauge!(
        PARKING_MAX,
        "The parking lot's bound in messages (TASKMILL_PARKING_MAX)"
    );
    describe_histogram!(
        TASK_DURATION,
        metrics::Unit::Seconds,
        "Handler run time of one attempt"
    );
    describe_histogram!(
        TASK_LATENCY,
        metrics::Unit::Seconds,
        "From an attempt's task message being sent (by the intake, the feeder, the sweeper or the retry ladder) to its outcome being recorded"
    );
    describe_gauge!(TASKS_IN_FLIGHT, "Handlers running now in this pod");
    describe_gauge!(
        PIPELINE_MESSAGES,
        "Task messages this pod holds: waiting for a handler, running, or being recorded and acked"
    );
    describe_counter!(
        JOBS_FINISHED,
        "Job ends this pod published the event of, by job type and final stage"
    );
    describe_gauge!(
        JOBS,
        "Jobs not yet ended, by stage (read from the database at scrape)"
    );
    describe_gauge!(
        QUEUE_READY,
        "Messages ready in a queue, not counting those delivered and unacked (read from the broker at scrape)"
    );
    describe_gauge!(
        OUTBOX_BACKLOG,
        "Job events committed but not yet published (read from the database at scrape)"
    );
    describe_gauge!(
        REQUESTS_WAITING,
        "Job requests committed in producers' transactions but not yet published by the relay (read from the database at scrape)"
    );
    describe_gauge!(
        SCHEDULE_NEXT_TICK,
        "A periodic job's next tick, Unix time (read from the database at scrape)"
    );
    describe_gauge!(
        SCHEDULE_LAST_TICK,
        "A periodic job's last tick fired, Unix time; absent until one fired (read from the database at scrape)"
    );
    describe_counter!(
        BROKER_RECONNECTS,
        "Broker connections re-established after a loss"
    );
    describe_counter!(
        ROLE_RESTARTS,
        "Role runs restarted after their channel or connection failed"
    );
    describe_counter!(
        CHANNELS_REOPENED,
        "Publishing channels the broker closed while the connection stayed up, reopened"
    );
    describe_counter!(
        DATABASE_RETRIES,
        "Database operations retried after a transient error"
    );
    describe_counter!(
        SWEEPER_ACTIONS,
        "What the sweeper did: republished, taken_over, formations_failed"
    );
    describe_counter!(
        ROWS_REMOVED,
        "Ended jobs, and their task rows, removed past their retention (kind: jobs, tasks)"
    );
    describe_counter!(
        STALE_RUN_MESSAGES,
        "Task messages of an earlier run of their job (before a retry reset the task), dropped"
    );
}

/// Registers a worker pool's label sets at zero, so its series exist before its first
/// task.
pub(crate) fn register_pool<'a>(pool: &str, task_types: impl Iterator<Item = &'a str>) {
    gauge!(TASKS_IN_FLIGHT, "pool" => pool.to_owned()).set(0.0);
    gauge!(PIPELINE_MESSAGES, "pool" => pool.to_owned()).set(0.0);
    for task_type in task_types {
        counter!(TASKS_STARTED, "pool" => pool.to_owned(), "task_type" => task_type.to_owned())
            .increment(0);
        for outcome in Outcome::ALL {
            processed(pool, task_type, outcome).increment(0);
        }
    }
}

/// A handler started.
pub(crate) fn task_started(pool: &str, task_type: &str) {
    counter!(TASKS_STARTED, "pool" => pool.to_owned(), "task_type" => task_type.to_owned())
        .increment(1);
}

/// A handler returned after `ran`.
pub(crate) fn task_ran(pool: &str, task_type: &str, ran: Duration) {
    histogram!(TASK_DURATION, "pool" => pool.to_owned(), "task_type" => task_type.to_owned())
        .record(ran.as_secs_f64());
}

/// An attempt's outcome was recorded, `latency` after its message was sent (when the
/// message said when).
pub(crate) fn task_recorded(
    pool: &str,
    task_type: &str,
    outcome: Outcome,
    latency: Option<Duration>,
) {
    processed(pool, task_type, outcome).increment(1);
    if let Some(latency) = latency {
        histogram!(TASK_LATENCY, "pool" => pool.to_owned(), "task_type" => task_type.to_owned())
            .record(latency.as_secs_f64());
    }
}

fn processed(pool: &str, task_type: &str, outcome: Outcome) -> metrics::Counter {
    counter!(
        TASKS_PROCESSED,
        "pool" => pool.to_owned(),
        "task_type" => task_type.to_owned(),
        "outcome" => outcome.label()
    )
}

/// A message from `queue` went to the parking lot.
pub(crate) fn message_parked(queue: &str) {
    counter!(MESSAGES_PARKED, "queue" => queue.to_owned()).increment(1);
}

/// A message from `queue` found the parking lot full and was dropped.
pub(crate) fn park_refused(queue: &str) {
    counter!(PARKS_REFUSED, "queue" => queue.to_owned()).increment(1);
}

/// The parking lot's bound, exported once a pod starts.
pub(crate) fn parking_max(max: u32) {
    gauge!(PARKING_MAX).set(f64::from(max));
}

/// A pool's load in this pod now: task messages held (waiting for a handler,
/// running, or being recorded and acked) and handlers running.
pub(crate) fn pool_load(pool: &str, held: usize, running: usize) {
    gauge!(PIPELINE_MESSAGES, "pool" => pool.to_owned()).set(held as f64);
    gauge!(TASKS_IN_FLIGHT, "pool" => pool.to_owned()).set(running as f64);
}

/// Adds a pod's job types to those a `job_type` label may name.
pub(crate) fn register_job_types<'a>(job_types: impl Iterator<Item = &'a str>) {
    let mut known = JOB_TYPES.write().expect("job types lock");
    known.extend(job_types.map(str::to_owned));
}

/// This pod published the event of a job of `job_type` that ended in `stage` (`done`,
/// `failed`, `cancelled`, `rejected`); a type no pod here registered counts as `other`.
pub(crate) fn job_finished(job_type: &str, stage: &str) {
    let known = JOB_TYPES.read().expect("job types lock").contains(job_type);
    let job_type = if known { job_type } else { OTHER_JOB_TYPE };
    counter!(JOBS_FINISHED, "job_type" => job_type.to_owned(), "stage" => stage.to_owned())
        .increment(1);
}

/// Jobs not yet ended in `stage`, as the database counts them now.
pub(crate) fn jobs_in_stage(stage: &str, count: u64) {
    gauge!(JOBS, "stage" => stage.to_owned()).set(count as f64);
}

/// Messages ready in `queue`, as the broker counts them now.
pub(crate) fn queue_ready(queue: &str, count: u32) {
    gauge!(QUEUE_READY, "queue" => queue.to_owned()).set(f64::from(count));
}

/// Job events waiting to be published.
pub(crate) fn outbox_backlog(count: u64) {
    gauge!(OUTBOX_BACKLOG).set(count as f64);
}

/// Job requests in the outbox, waiting for the relay.
pub(crate) fn requests_waiting(count: u64) {
    gauge!(REQUESTS_WAITING).set(count as f64);
}

/// A schedule's next tick and last tick fired.
pub(crate) fn schedule_ticks(
    name: &str,
    next: chrono::DateTime<chrono::Utc>,
    last: Option<chrono::DateTime<chrono::Utc>>,
) {
    gauge!(SCHEDULE_NEXT_TICK, "schedule" => name.to_owned()).set(next.timestamp() as f64);
    if let Some(last) = last {
        gauge!(SCHEDULE_LAST_TICK, "schedule" => name.to_owned()).set(last.timestamp() as f64);
    }
}

/// The broker connection came back after a loss.
pub(crate) fn broker_reconnected() {
    counter!(BROKER_RECONNECTS).increment(1);
}

/// `role`'s run failed and is being started again.
pub(crate) fn role_restarted(role: &'static str) {
    counter!(ROLE_RESTARTS, "role" => role).increment(1);
}

/// A publishing channel the broker closed was reopened.
pub(crate) fn publisher_channel_reopened() {
    counter!(CHANNELS_REOPENED).increment(1);
}

/// A database operation met a transient error and is retried.
pub(crate) fn database_retried(operation: &str) {
    counter!(DATABASE_RETRIES, "operation" => operation.to_owned()).increment(1);
}

/// The sweeper did `count` of `action`.
pub(crate) fn sweeper_did(action: &'static str, count: usize) {
    if count > 0 {
        counter!(SWEEPER_ACTIONS, "action" => action).increment(count as u64);
    }
}

/// Retention removed `jobs` jobs and `tasks` task rows.
pub(crate) fn removed(jobs: u64, tasks: u64) {
    counter!(ROWS_REMOVED, "kind" => "jobs").increment(jobs);
    counter!(ROWS_REMOVED, "kind" => "tasks").increment(tasks);
}

/// A task message of an earlier run of its job reached `pool`'s worker and was dropped.
pub(crate) fn stale_run_message(pool: &str) {
    counter!(STALE_RUN_MESSAGES, "pool" => pool.to_owned()).increment(1);
}
