//! The wire protocol: every message taskmill reads or writes, as serde types, and the
//! checks a message must pass before anything acts on it. The repository's
//! `docs/protocol.md` documents these shapes for producers in other languages; change
//! both together.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::DEFAULT_QUEUE;
use crate::phases::MAX_REDUCE_SHARDS;
use crate::state::JobStage;

/// The schema version every message carries; a message of another version is parked.
pub const SCHEMA_VERSION: u32 = 1;
/// The content type of every message taskmill sends. A consumed message whose content
/// type does not start with it is refused; one without a content type is accepted.
pub const CONTENT_TYPE: &str = "application/json";
/// The longest wait a retry may be given: 2^32 - 1 ms (about 49.7 days), RabbitMQ's
/// limit for a message TTL.
pub const MAX_DELAY_MS: u64 = (1 << 32) - 1;
/// Set by the request relay on a scheduled job's request once its `run_at` has come:
/// the intake forms the job then, whatever its own clock says.
pub(crate) const DUE_HEADER: &str = "x-taskmill-due";
/// How far ahead a request's `run_at` may be: 366 days, a year and a day.
pub const MAX_RUN_AT_AHEAD: chrono::TimeDelta = chrono::TimeDelta::days(366);

/// Why a request whose `run_at` is past [`MAX_RUN_AT_AHEAD`] is refused.
pub(crate) fn too_far_ahead(run_at: DateTime<Utc>) -> String {
    format!(
        "run_at {} is more than {} days ahead",
        run_at.to_rfc3339(),
        MAX_RUN_AT_AHEAD.num_days()
    )
}
/// Retries per task of a request that names no `max_retries`: up to 4 attempts.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// The `retry_delay_ms` of a request that names none: attempt n then waits n × 5 s.
pub const DEFAULT_RETRY_DELAY_MS: u64 = 5_000;
const MAX_ID_LEN: usize = 128;
const MAX_NAME_LEN: usize = 200;
const MAX_RETRIES_LIMIT: u32 = 100;
const MAX_RETRY_DELAY_MS: u64 = 24 * 3600 * 1000;
const MAX_POOL_LEN: usize = 100;
const MAX_TASK_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// A job event carries its job's results (when the request asked) for jobs of at most
/// this many tasks; a larger job's event says how many there are instead.
pub const RESULTS_IN_EVENT_MAX_TASKS: i64 = 1_000;
/// ... and only while they take at most this many bytes of JSON, so that an event stays
/// a small message whatever the handlers return.
pub const RESULTS_IN_EVENT_MAX_BYTES: usize = 64 * 1024;

/// What happens to a job when one of its tasks fails for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// The job fails at once and its remaining tasks are cancelled.
    #[default]
    FailFast,
    /// The job ends when every task is terminal; failures are counted and listed.
    Continue,
}

impl FailurePolicy {
    /// The policy as written in requests and job rows: `fail_fast` or `continue`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FailFast => "fail_fast",
            Self::Continue => "continue",
        }
    }

    /// Reads the form [`Self::as_str`] writes; anything but `continue` is
    /// [`Self::FailFast`].
    pub(crate) fn parse(s: &str) -> Self {
        if s == "continue" {
            Self::Continue
        } else {
            Self::FailFast
        }
    }
}

/// An exchange and routing key to publish to (`""` is the default exchange, so a
/// routing key alone names a queue).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The exchange; `""` (also when absent) is the default exchange.
    #[serde(default)]
    pub exchange: String,
    /// The routing key: a queue's name when `exchange` is `""`.
    pub routing_key: String,
}

/// A job request, published to the jobs exchange with the job type as routing key.
///
/// Producers build it with `Value` payloads; the intake reads payloads as raw JSON
/// (`JobRequest<Box<RawValue>>`), a few bytes each instead of a parsed map, and parses
/// them a batch at a time as it stores them, so a 100,000-task request stays small.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest<T = Value> {
    /// Must be [`SCHEMA_VERSION`].
    pub version: u32,
    /// Idempotency key: a second request with the same id creates nothing new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The job's type, also the request's routing key: 1 to 200 characters of
    /// `A-Z a-z 0-9 - _ . :`.
    pub job_type: String,
    /// The handler that runs each task; the job type when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    /// The pool whose work queue the tasks go to; `queue` on the wire.
    #[serde(rename = "queue", default = "default_pool")]
    pub pool: String,
    /// Any JSON, kept on the job; the splitter's input when `tasks` is absent. `null`
    /// when absent.
    #[serde(default)]
    pub params: Value,
    /// One payload per task; when absent, a splitter registered for the job type makes
    /// them from `params`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<T>>,
    /// Retries per task after its first attempt fails: [`DEFAULT_MAX_RETRIES`] when
    /// absent, at most 100.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// In milliseconds: attempt n, failing, waits n × this before the next one.
    /// [`DEFAULT_RETRY_DELAY_MS`] when absent; 1 to 86,400,000.
    #[serde(default = "default_retry_delay_ms")]
    pub retry_delay_ms: u64,
    /// What a task failing for good does to the job; [`FailurePolicy::FailFast`] when
    /// absent.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// Where the job's event is also published, beside the events exchange; `None`:
    /// only there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_complete: Option<Target>,
    /// How long one attempt of a task may run, in milliseconds; when absent, the
    /// handler's own timeout, else the pod's `TASKMILL_TASK_TIMEOUT_SECS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_timeout_ms: Option<u64>,
    /// The job event should carry the tasks' results and errors (see
    /// [`RESULTS_IN_EVENT_MAX_TASKS`] and [`RESULTS_IN_EVENT_MAX_BYTES`]). Like
    /// `on_complete`, it shapes the answer, not the job: a second request with the same
    /// `job_id` that differs only here is the same request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub results_in_event: bool,
    /// For a job type with a reduce stage: reduce tasks at most, 1 to 10,000; the job
    /// type's setting when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce_shards: Option<u32>,
    /// For a job type with a reduce stage: one reduce task per key (`true`) or shards
    /// (`false`); the job type's setting when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce_per_key: Option<bool>,
    /// This request carries one part of a job sent in parts: its `tasks` are the
    /// job's tasks from `part.offset` on. Needs a `job_id`; every part and the seal
    /// repeat the job's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<Part>,
    /// This request (without `tasks`) closes a job sent in parts: it has this many
    /// parts and tasks. The job runs once every part is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<Seal>,
    /// Not before then: the job is `scheduled` until this time (RFC 3339), then its
    /// tasks start. At most [`MAX_RUN_AT_AHEAD`] ahead; a time past means now. Every
    /// part and the seal of a job in parts carry the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
}

/// Where a part's tasks go in its job: part `number` (from 1), whose first task is
/// the job's task `offset` (from 0: the tasks of the parts before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// The part's number, 1 to [`MAX_PARTS`]; sending a part again is harmless.
    pub number: u32,
    /// The ordinal of the part's first task within the job.
    pub offset: u64,
}

/// The end of a job sent in parts: how many parts and tasks it has in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    /// Parts sent, numbered 1 to `parts`.
    pub parts: u32,
    /// Tasks in all the parts.
    pub tasks: u64,
}

/// Parts one job may have at most: each part's claim looks at the job's other parts,
/// so their number is bounded (at 10,000 tasks a part, 100 million tasks).
pub const MAX_PARTS: u32 = 10_000;
/// Tasks one job may have at most (task ordinals are 32-bit).
pub const MAX_JOB_TASKS: u64 = i32::MAX as u64;

fn default_pool() -> String {
    DEFAULT_QUEUE.to_owned()
}
fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}
fn default_retry_delay_ms() -> u64 {
    DEFAULT_RETRY_DELAY_MS
}

impl JobRequest {
    /// A request for `job_type` tasks with the given payloads and default settings.
    pub fn new(job_type: impl Into<String>, tasks: Vec<Value>) -> Self {
        Self {
            version: SCHEMA_VERSION,
            job_id: None,
            job_type: job_type.into(),
            task_type: None,
            pool: default_pool(),
            params: Value::Null,
            tasks: Some(tasks),
            max_retries: DEFAULT_MAX_RETRIES,
            retry_delay_ms: DEFAULT_RETRY_DELAY_MS,
            on_failure: FailurePolicy::FailFast,
            on_complete: None,
            task_timeout_ms: None,
            results_in_event: false,
            reduce_shards: None,
            reduce_per_key: None,
            part: None,
            seal: None,
            run_at: None,
        }
    }

    /// The same request, to run `delay` from now (see [`JobRequest::run_at`]).
    pub fn delayed(mut self, delay: std::time::Duration) -> Self {
        self.run_at = Some(crate::clock::from_now(delay));
        self
    }
}

impl<T> JobRequest<T> {
    /// The handler of every task: `task_type` when set, else `job_type`.
    pub(crate) fn task_type(&self) -> &str {
        self.task_type.as_deref().unwrap_or(&self.job_type)
    }

    /// A SHA-256 digest (hex) of everything the request asks for but how it is
    /// answered: two requests with one `job_id` and different digests are different
    /// jobs, and the second is refused. The answer may differ: resubmitting a job to
    /// hear back on a new `on_complete`, or with `results_in_event`, is the same
    /// request.
    pub(crate) fn digest(&self) -> String
    where
        T: Serialize,
    {
        #[derive(Serialize)]
        struct Asked<'a, T> {
            job_type: &'a str,
            task_type: &'a str,
            queue: &'a str,
            params: &'a Value,
            tasks: &'a Option<Vec<T>>,
            max_retries: u32,
            retry_delay_ms: u64,
            on_failure: FailurePolicy,
            task_timeout_ms: Option<u64>,
            // Absent from older requests: left out when unset, so that their digests
            // stay what they were.
            #[serde(skip_serializing_if = "Option::is_none")]
            reduce_shards: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reduce_per_key: Option<bool>,
            // A job sent in parts: its digest covers its settings, each part's tasks
            // have their own ([`JobRequest::part_digest`]).
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            in_parts: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            run_at: Option<DateTime<Utc>>,
        }
        let in_parts = self.in_parts();
        let asked = Asked {
            job_type: &self.job_type,
            task_type: self.task_type(),
            queue: &self.pool,
            params: &self.params,
            tasks: if in_parts { &None } else { &self.tasks },
            max_retries: self.max_retries,
            retry_delay_ms: self.retry_delay_ms,
            on_failure: self.on_failure,
            task_timeout_ms: self.task_timeout_ms,
            reduce_shards: self.reduce_shards,
            reduce_per_key: self.reduce_per_key,
            in_parts,
            run_at: self.run_at,
        };
        hex_digest(&asked)
    }

    /// Whether the request is a part or the seal of a job sent in parts.
    pub(crate) fn in_parts(&self) -> bool {
        self.part.is_some() || self.seal.is_some()
    }

    /// A SHA-256 digest (hex) of a part's place and tasks: a part sent again with
    /// other tasks is refused.
    pub(crate) fn part_digest(&self) -> String
    where
        T: Serialize,
    {
        hex_digest(&(self.part, &self.tasks))
    }

    /// Checks what serde cannot: version, id and name shapes, limits.
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_version(self.version)?;
        if let Some(id) = &self.job_id {
            check_id("job_id", id)?;
        }
        check_name("job_type", &self.job_type)?;
        check_name("task_type", self.task_type())?;
        check_pool(&self.pool)?;
        if self.max_retries > MAX_RETRIES_LIMIT {
            return Err(DecodeError::Invalid(format!(
                "max_retries {} is above the limit of {MAX_RETRIES_LIMIT}",
                self.max_retries
            )));
        }
        if self.retry_delay_ms == 0 || self.retry_delay_ms > MAX_RETRY_DELAY_MS {
            return Err(DecodeError::Invalid(format!(
                "retry_delay_ms {} is outside 1..={MAX_RETRY_DELAY_MS}",
                self.retry_delay_ms
            )));
        }
        if let Some(timeout) = self.task_timeout_ms {
            if timeout == 0 || timeout > MAX_TASK_TIMEOUT_MS {
                return Err(DecodeError::Invalid(format!(
                    "task_timeout_ms {timeout} is outside 1..={MAX_TASK_TIMEOUT_MS}"
                )));
            }
        }
        if let Some(shards) = self.reduce_shards {
            if shards == 0 || shards > MAX_REDUCE_SHARDS {
                return Err(DecodeError::Invalid(format!(
                    "reduce_shards {shards} is outside 1..={MAX_REDUCE_SHARDS}"
                )));
            }
        }
        self.validate_parts()?;
        if let Some(run_at) = self.run_at {
            if run_at - Utc::now() > MAX_RUN_AT_AHEAD {
                return Err(DecodeError::Invalid(too_far_ahead(run_at)));
            }
        }
        let longest_wait = u64::from(self.max_retries) * self.retry_delay_ms;
        if longest_wait > MAX_DELAY_MS {
            return Err(DecodeError::Invalid(format!(
                "the longest retry wait (max_retries {} × retry_delay_ms {} = {longest_wait} ms) \
                 is above RabbitMQ's limit of {MAX_DELAY_MS} ms",
                self.max_retries, self.retry_delay_ms
            )));
        }
        Ok(())
    }
}

/// [`JobRequest::part_digest`], for the tests that play an intake's part by hand.
#[cfg(feature = "testing")]
pub fn part_digest<T: Serialize>(request: &JobRequest<T>) -> String {
    request.part_digest()
}

impl<T> JobRequest<T> {
    /// A part needs a job id and tasks that fit in the job; a seal, a job id and no
    /// tasks.
    fn validate_parts(&self) -> Result<(), DecodeError> {
        let invalid = |reason: String| Err(DecodeError::Invalid(reason));
        if self.in_parts() && self.job_id.is_none() {
            return invalid("a part or seal needs a job_id: it is what joins the parts".into());
        }
        if let Some(part) = self.part {
            if self.seal.is_some() {
                return invalid("a request is a part or a seal, not both".into());
            }
            if part.number == 0 || part.number > MAX_PARTS {
                return invalid(format!(
                    "part number {} is outside 1..={MAX_PARTS}",
                    part.number
                ));
            }
            let tasks = self.tasks.as_ref().map_or(0, Vec::len) as u64;
            if tasks == 0 {
                return invalid(format!("part {} has no tasks", part.number));
            }
            if part.offset.saturating_add(tasks) > MAX_JOB_TASKS {
                return invalid(format!(
                    "part {} ends past task {MAX_JOB_TASKS}, the most a job may have",
                    part.number
                ));
            }
        }
        if let Some(seal) = self.seal {
            if self.tasks.is_some() {
                return invalid("a seal carries no tasks: send them as parts".into());
            }
            if seal.parts == 0 || seal.parts > MAX_PARTS {
                return invalid(format!(
                    "seal.parts {} is outside 1..={MAX_PARTS}",
                    seal.parts
                ));
            }
            if seal.tasks < u64::from(seal.parts) || seal.tasks > MAX_JOB_TASKS {
                return invalid(format!(
                    "seal.tasks {} is outside {}..={MAX_JOB_TASKS} (every part has a task)",
                    seal.tasks, seal.parts
                ));
            }
        }
        Ok(())
    }
}

/// A SHA-256 digest (hex) of `value`'s JSON.
fn hex_digest(value: &impl Serialize) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    serde_json::to_writer(&mut hasher, value).expect("a request serializes");
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// One task, sent to the work queue of its job's pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskMessage {
    /// Always [`SCHEMA_VERSION`].
    pub version: u32,
    /// The job the task belongs to.
    pub job_id: String,
    /// The task's row id.
    pub task_id: i64,
    /// The handler that runs it.
    pub task_type: String,
    /// 1 for the first run; a retry carries the next number.
    pub attempt: i32,
    /// Retries the job allows after a task's first attempt.
    pub max_retries: i32,
    /// The job's retry delay in milliseconds: attempt n waits n × this, at most `MAX_DELAY_MS`.
    pub retry_delay_ms: i64,
    /// The job's limit on one attempt, when it set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_timeout_ms: Option<i64>,
    /// The job's run the message belongs to: absent for the first, 2 and on after a
    /// failed job was retried.
    #[serde(default = "first_run", skip_serializing_if = "is_first_run")]
    pub run: i32,
    /// The task's JSON input, handed to the handler.
    pub payload: Value,
}

fn first_run() -> i32 {
    1
}

fn is_first_run(run: &i32) -> bool {
    *run == 1
}

/// The attempt that follows `attempts` recorded ones: the one rule that numbers an
/// attempt, for the first send, a retry and a re-send alike.
pub(crate) const fn attempt_after(attempts: i32) -> i32 {
    attempts + 1
}

/// A task's first attempt: the one a task that never ran is sent as.
pub(crate) const FIRST_ATTEMPT: i32 = attempt_after(0);

/// How long attempt `attempt` waits after failing: `attempt` × `retry_delay_ms` (the
/// linear backoff), at least 1 ms and at most [`MAX_DELAY_MS`].
pub(crate) fn retry_wait_ms(attempt: i32, retry_delay_ms: i64) -> u64 {
    let wait = i64::from(attempt).saturating_mul(retry_delay_ms);
    u64::try_from(wait).unwrap_or(0).clamp(1, MAX_DELAY_MS)
}

/// What every task message of a job repeats.
#[derive(Clone, Copy, Debug)]
pub(crate) struct JobSettings<'a> {
    /// The job's id.
    pub job_id: &'a str,
    /// Retries the job allows after a task's first attempt.
    pub max_retries: i32,
    /// The job's retry delay in milliseconds.
    pub retry_delay_ms: i64,
    /// The job's limit on one attempt in milliseconds, when it set one.
    pub task_timeout_ms: Option<i64>,
    /// The job's run: 1, then one more per retry of the failed job.
    pub run: i32,
}

impl TaskMessage {
    /// Attempt `attempt` of task `task_id` of the job `job`: the one place a task
    /// message is built.
    pub(crate) fn new(
        job: JobSettings<'_>,
        task_id: i64,
        task_type: &str,
        payload: &Value,
        attempt: i32,
    ) -> Self {
        Self {
            version: SCHEMA_VERSION,
            job_id: job.job_id.to_owned(),
            task_id,
            task_type: task_type.to_owned(),
            attempt,
            max_retries: job.max_retries,
            retry_delay_ms: job.retry_delay_ms,
            task_timeout_ms: job.task_timeout_ms,
            run: job.run,
            payload: payload.clone(),
        }
    }

    /// The next attempt of the same task.
    pub fn next_attempt(&self) -> Self {
        Self {
            attempt: attempt_after(self.attempt),
            ..self.clone()
        }
    }

    /// The message's JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a task message serializes")
    }
}

/// Sent to the completion queue when tasks reach a terminal status: one message for
/// each batch of outcomes a worker records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TasksFinished {
    /// Always [`SCHEMA_VERSION`].
    pub version: u32,
    /// The tasks that ended, one entry each.
    pub tasks: Vec<FinishedTask>,
}

/// One task that reached a terminal status, in a [`TasksFinished`] message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinishedTask {
    /// The task's job: the one the completion role checks.
    pub job_id: String,
    /// The task's row id.
    pub task_id: i64,
    /// `done` or `failed`.
    pub status: String,
    /// The attempt that ended it.
    pub attempt: i32,
}

impl TasksFinished {
    /// A message of this schema version carrying `tasks`.
    pub fn new(tasks: Vec<FinishedTask>) -> Self {
        Self {
            version: SCHEMA_VERSION,
            tasks,
        }
    }
}

/// Published once per job when it ends: to the events exchange with routing key
/// `job.<done|failed|cancelled>.<job_id>`, and to the request's `on_complete` target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Always [`SCHEMA_VERSION`].
    pub version: u32,
    /// `job.done`, `job.failed` or `job.cancelled`.
    pub event: String,
    /// The job's id; for a rejection, the request's `job_id` or AMQP `message_id`.
    pub job_id: String,
    /// The job's type; for a rejection, empty when the request had no valid one.
    pub job_type: String,
    /// Which run of the job ended: 1, then one more each time the failed job was
    /// retried (`taskmill retry`). One event per run: deduplicate on `(job_id, run)`.
    #[serde(default = "first_run")]
    pub run: i32,
    /// The stage the job ended in: `done`, `failed` or `cancelled`, or `rejected` for a
    /// parked request.
    pub stage: String,
    /// Tasks the job had; 0 for a rejection.
    pub task_count: i64,
    /// Tasks that ended `done`.
    pub done: i64,
    /// Tasks that ended `failed`.
    pub failed: i64,
    /// Tasks that ended `cancelled`: never finished because the job failed fast, failed
    /// in formation, or was cancelled.
    pub cancelled: i64,
    /// Why the job did not end `done`: the error of the first task that failed for good,
    /// `cancelled` for a cancelled job, or the reason of a failed formation or a
    /// rejection. `None` when there is none.
    pub first_error: Option<String>,
    /// Ids of failed tasks (at most 100).
    pub failed_task_ids: Vec<i64>,
    /// When the job was created; for a rejection, when the request was answered.
    pub created_at: DateTime<Utc>,
    /// When the job started `running`; `None` if it never did.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job ended; always set by taskmill.
    pub finished_at: Option<DateTime<Utc>>,
    /// The tasks that ended `done` or `failed`, in task order, when the request asked
    /// for `results_in_event` and they fit the event; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<TaskResult>>,
    /// Why `results` is absent although the request asked for it: too many or too
    /// large, and how many there are to read with `taskmill results` or
    /// `Client::results`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_withheld: Option<ResultsWithheld>,
    /// For a `job.stage` event, the phase the job entered (`reduce`, `finalize`); absent
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// A multi-stage job's result, when it is done and the result takes at most
    /// [`RESULTS_IN_EVENT_MAX_BYTES`] of JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why `result` is absent from the event of a done multi-stage job: too large, and
    /// where to read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_withheld: Option<String>,
}

/// One task's outcome, as a job event's `results`, `taskmill results` and
/// `Client::results` give it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task's position in its job, from 0 (its index in the request's `tasks`).
    pub ordinal: i32,
    /// The task's row id.
    pub task_id: i64,
    /// The task's status: `done` and `failed` are final.
    pub status: String,
    /// Attempts started.
    pub attempts: i32,
    /// What the handler returned, for a `done` task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The last error: why a `failed` task failed, or what a `retrying` one last hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// In a job event, in place of results that do not fit it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultsWithheld {
    /// Tasks of the job that ended `done` or `failed`: the results there are to read.
    pub count: i64,
    /// Which cap the results passed, and where to read them.
    pub reason: String,
}

/// The kind of the event that answers a request that was parked instead of becoming a
/// job: `job.rejected.<job_id>`.
pub const REJECTED: &str = "job.rejected";
/// The kind of the event a multi-stage job publishes as it enters a phase:
/// `job.stage.<job_id>`. It is progress, not an end: a producer waiting for the end
/// goes on waiting.
pub const STAGE: &str = "job.stage";

impl JobEvent {
    /// The answer to a parked request: no job exists, `first_error` says why.
    pub(crate) fn rejected(job_id: &str, job_type: &str, reason: &str) -> Self {
        let now = Utc::now();
        Self {
            version: SCHEMA_VERSION,
            event: REJECTED.to_owned(),
            job_id: job_id.to_owned(),
            job_type: job_type.to_owned(),
            run: 1,
            stage: "rejected".to_owned(),
            task_count: 0,
            done: 0,
            failed: 0,
            cancelled: 0,
            first_error: Some(reason.to_owned()),
            failed_task_ids: Vec::new(),
            created_at: now,
            started_at: None,
            finished_at: Some(now),
            results: None,
            results_withheld: None,
            phase: None,
            result: None,
            result_withheld: None,
        }
    }

    /// Whether this reports a phase change (`job.stage`) rather than an end.
    pub fn is_progress(&self) -> bool {
        self.event == STAGE
    }

    /// Whether this answers a parked request (`job.rejected`) rather than an ended job.
    pub fn is_rejected(&self) -> bool {
        self.event == REJECTED
    }

    /// The stage the job ended in; `None` for a rejection.
    pub fn stage(&self) -> Option<JobStage> {
        self.stage.parse().ok()
    }

    /// Whether the job ended `done`: every task succeeded.
    pub fn is_done(&self) -> bool {
        self.stage() == Some(JobStage::Done)
    }
}

/// Where to answer a request that could not be processed, read from whatever of it is
/// readable: its `job_id` (or a usable AMQP `message_id`), its job type, and its
/// `on_complete` target. Nothing when there is no usable id to answer for.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplyAddress {
    /// The request's `job_id`, or its AMQP `message_id` when it has none; always a
    /// valid id.
    pub job_id: String,
    /// The request's job type; empty when it has no valid one.
    pub job_type: String,
    /// The request's `on_complete` target, when it names a readable one.
    pub on_complete: Option<Target>,
}

impl ReplyAddress {
    /// Reads what it can of a request body, whatever else is wrong with it; `None` when
    /// neither its `job_id` nor `message_id` is a valid id to answer for.
    pub fn read(body: &[u8], message_id: Option<&str>) -> Option<Self> {
        let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let job_id = value
            .get("job_id")
            .and_then(Value::as_str)
            .or(message_id)
            .filter(|id| check_id("job_id", id).is_ok())?;
        let job_type = value
            .get("job_type")
            .and_then(Value::as_str)
            .filter(|name| check_name("job_type", name).is_ok())
            .unwrap_or_default();
        let on_complete = value
            .get("on_complete")
            .and_then(|target| serde_json::from_value(target.clone()).ok());
        Some(Self {
            job_id: job_id.to_owned(),
            job_type: job_type.to_owned(),
            on_complete,
        })
    }
}

/// Why a message cannot be acted on; the text goes into the parking lot's reason header.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is over the consumer's size limit.
    #[error("message of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The body's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The message has another content type than `application/json`; holds it.
    #[error("content type {0:?} is not application/json")]
    ContentType(String),
    /// The body is not JSON of the expected shape: malformed, a field missing or
    /// unknown, or a value of the wrong type.
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The message carries another schema version than [`SCHEMA_VERSION`]; holds it.
    #[error("unsupported schema version {0} (this build speaks {SCHEMA_VERSION})")]
    Version(u32),
    /// A value breaks a rule serde cannot check (an id's alphabet, a limit); says which.
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Decodes a JSON message body after checking its size and content type (an absent
/// content type is accepted: not every AMQP client sets one).
pub fn decode<T: serde::de::DeserializeOwned>(
    body: &[u8],
    content_type: Option<&str>,
    limit: usize,
) -> Result<T, DecodeError> {
    if body.len() > limit {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            limit,
        });
    }
    if let Some(kind) = content_type {
        if !kind.starts_with(CONTENT_TYPE) {
            return Err(DecodeError::ContentType(kind.to_owned()));
        }
    }
    Ok(serde_json::from_slice(body)?)
}

fn check_version(version: u32) -> Result<(), DecodeError> {
    if version == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(DecodeError::Version(version))
    }
}

/// Job ids end up in routing keys and URLs: keep them to a safe alphabet.
pub(crate) fn check_id(field: &str, id: &str) -> Result<(), DecodeError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':'));
    if ok {
        Ok(())
    } else {
        Err(DecodeError::Invalid(format!(
            "{field} {id:?} must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 - _ :"
        )))
    }
}

/// Pool names end up in queue names and in the delay ladder's routing keys (after 20
/// characters of digits, within AMQP's 255): shorter than other names, and made of
/// non-empty dot-separated words so that topic bindings match them exactly.
fn check_pool(pool: &str) -> Result<(), DecodeError> {
    let ok = check_name("queue", pool).is_ok()
        && pool.len() <= MAX_POOL_LEN
        && !pool.split('.').any(str::is_empty);
    if ok {
        return Ok(());
    }
    Err(DecodeError::Invalid(format!(
        "queue {pool:?} must be 1-{MAX_POOL_LEN} characters: words of A-Z a-z 0-9 - _ : \
         joined by single dots"
    )))
}

pub(crate) fn check_name(field: &str, name: &str) -> Result<(), DecodeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(DecodeError::Invalid(format!(
            "{field} {name:?} must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ . :"
        )))
    }
}

/// A message taskmill consumes: decoded, then checked for what serde cannot check.
pub(crate) trait Incoming: serde::de::DeserializeOwned {
    /// The checks serde cannot make; an error means the message cannot be acted on.
    fn check(&self) -> Result<(), DecodeError>;
}

impl<T> Incoming for JobRequest<T>
where
    JobRequest<T>: serde::de::DeserializeOwned,
{
    fn check(&self) -> Result<(), DecodeError> {
        self.validate()
    }
}

impl Incoming for TaskMessage {
    fn check(&self) -> Result<(), DecodeError> {
        check_version(self.version)
    }
}

impl Incoming for TasksFinished {
    fn check(&self) -> Result<(), DecodeError> {
        check_version(self.version)
    }
}

/// [`decode`], then [`Incoming::check`].
pub(crate) fn decode_incoming<T: Incoming>(
    body: &[u8],
    content_type: Option<&str>,
    limit: usize,
) -> Result<T, DecodeError> {
    let message: T = decode(body, content_type, limit)?;
    message.check()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_defaults_apply() {
        let req: JobRequest =
            decode(br#"{"version":1,"job_type":"x","tasks":[1,2]}"#, None, 1024).unwrap();
        req.validate().unwrap();
        assert_eq!(req.pool, "default");
        assert_eq!(req.max_retries, 3);
        assert_eq!(req.retry_delay_ms, 5000);
        assert_eq!(req.on_failure, FailurePolicy::FailFast);
        assert_eq!(req.task_type(), "x");
    }

    #[test]
    fn the_digest_ignores_only_how_the_request_is_answered() {
        let mut request = JobRequest::new("x", vec![serde_json::json!(1)]);
        let digest = request.digest();
        // Jobs made before the optional fields existed keep their digests.
        assert_eq!(
            digest,
            "1d72c3acdafb646f026cd1e276ce06a9dab0f0835ee623195e5ec5f8895543a9"
        );
        request.on_complete = Some(Target {
            exchange: String::new(),
            routing_key: "reply".into(),
        });
        request.results_in_event = true;
        assert_eq!(request.digest(), digest);
        request.reduce_shards = Some(3);
        assert_ne!(request.digest(), digest);
        request.reduce_shards = None;
        request.tasks = Some(vec![serde_json::json!(2)]);
        assert_ne!(request.digest(), digest);
    }

    #[test]
    fn bad_requests_are_rejected_with_reasons() {
        let limit = 128;
        let cases: [(&[u8], Option<&str>); 9] = [
            (
                br#"{"version":1,"job_type":"x","max_retries":100,"retry_delay_ms":86400000}"#,
                None,
            ),
            (br#"{"version":1,"job_type":"x","queue":"a..b"}"#, None),
            (br#"{"version":1,"job_type":"x","max_retries":-1}"#, None),
            (b"{not json", None),
            (br#"{"version":1}"#, None),
            (br#"{"version":2,"job_type":"x"}"#, None),
            (br#"{"version":1,"job_type":"x","job_id":"a b"}"#, None),
            (br#"{"version":1,"job_type":"x"}"#, Some("text/plain")),
            (&[b' '; 129], None),
        ];
        for (body, content_type) in cases {
            let result = decode::<JobRequest>(body, content_type, limit)
                .and_then(|req| req.validate().map(|()| req));
            assert!(
                result.is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn parts_and_seals_are_checked() {
        let refused = [
            (
                r#""part":{"number":1,"offset":0},"tasks":[1]"#,
                "needs a job_id",
            ),
            (
                r#""job_id":"j","part":{"number":0,"offset":0},"tasks":[1]"#,
                "outside",
            ),
            (
                r#""job_id":"j","part":{"number":10001,"offset":0},"tasks":[1]"#,
                "outside",
            ),
            (
                r#""job_id":"j","part":{"number":1,"offset":0},"tasks":[]"#,
                "no tasks",
            ),
            (r#""job_id":"j","part":{"number":1,"offset":0}"#, "no tasks"),
            (
                r#""job_id":"j","part":{"number":1,"offset":2147483647},"tasks":[1]"#,
                "ends past",
            ),
            (
                r#""job_id":"j","seal":{"parts":2,"tasks":1}"#,
                "every part has a task",
            ),
            (r#""job_id":"j","seal":{"parts":0,"tasks":0}"#, "outside"),
            (
                r#""job_id":"j","seal":{"parts":1,"tasks":1},"tasks":[1]"#,
                "carries no tasks",
            ),
            (
                r#""job_id":"j","seal":{"parts":1,"tasks":1},"part":{"number":1,"offset":0},"tasks":[1]"#,
                "not both",
            ),
        ];
        for (fields, reason) in refused {
            let body = format!(r#"{{"version":1,"job_type":"x",{fields}}}"#);
            let request: JobRequest = decode(body.as_bytes(), None, 1024).unwrap();
            let err = request.validate().expect_err(&body).to_string();
            assert!(err.contains(reason), "{body}: {err}");
        }
        let part: JobRequest = decode(
            br#"{"version":1,"job_type":"x","job_id":"j","part":{"number":2,"offset":5},"tasks":[1]}"#,
            None,
            1024,
        )
        .unwrap();
        part.validate().unwrap();
        let seal: JobRequest = decode(
            br#"{"version":1,"job_type":"x","job_id":"j","seal":{"parts":2,"tasks":6}}"#,
            None,
            1024,
        )
        .unwrap();
        seal.validate().unwrap();
        // Parts and seal are one job: their digests agree, and differ from a request
        // of the same settings sent whole.
        assert_eq!(part.digest(), seal.digest());
        let mut whole = part.clone();
        whole.part = None;
        assert_ne!(whole.digest(), part.digest());
        let mut other_tasks = part.clone();
        other_tasks.tasks = Some(vec![serde_json::json!(2)]);
        assert_eq!(other_tasks.digest(), part.digest());
        assert_ne!(other_tasks.part_digest(), part.part_digest());
    }

    #[test]
    fn a_retry_waits_attempt_times_the_delay() {
        use super::retry_wait_ms;
        assert_eq!(retry_wait_ms(1, 100), 100);
        assert_eq!(retry_wait_ms(3, 5_000), 15_000);
        assert_eq!(
            retry_wait_ms(1, 0),
            1,
            "never zero: the ladder needs a digit"
        );
        assert_eq!(retry_wait_ms(-1, 100), 1);
        assert_eq!(retry_wait_ms(i32::MAX, i64::MAX), MAX_DELAY_MS);
    }
}
