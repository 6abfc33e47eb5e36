//! Task handlers, job splitters and multi-stage job types, registered by name.
//!
//! A handler is an async function from a [`TaskContext`] to a JSON result or a
//! [`TaskError`]; a splitter turns a job's `params` into task payloads when the
//! request carries no `tasks`; a [`JobType`] adds a reduce stage and a finalizer after
//! its map handler (see [`crate::phases`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::external::Backend;
use crate::phases::{
    finalize_task_type, reduce_task_type, FinalizePlan, PhasePlan, ReducePlan,
    DEFAULT_REDUCE_SHARDS, MAX_REDUCE_SHARDS,
};

/// What a handler gets to run one attempt of a task.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The task's job.
    pub job_id: String,
    /// The task's row id.
    pub task_id: i64,
    /// The task type the handler was registered for.
    pub task_type: String,
    /// 1 on the first run.
    pub attempt: i32,
    /// Retries the job allows: attempt `max_retries + 1` is the last.
    pub max_retries: i32,
    /// The task's JSON input.
    pub payload: Value,
    /// Cancelled when the pod starts shutting down. The handler may still finish
    /// within the grace period (the attempt then counts as usual), or stop early and
    /// fail the attempt so that it is retried elsewhere.
    pub shutdown: CancellationToken,
    /// Cancelled when the attempt's timeout passed: the handler should return now (its
    /// attempt fails as timed out either way); one that has not returned a second
    /// later is dropped.
    pub stop: CancellationToken,
}

/// A failed attempt. Retryable errors are retried while the job's `max_retries`
/// allows; permanent ones fail the task at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    permanent: bool,
}

impl TaskError {
    /// A failure worth another attempt, while the job's `max_retries` allows.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            permanent: false,
        }
    }

    /// A failure that fails the task at once, whatever retries are left.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            permanent: true,
        }
    }

    /// The error text, recorded as the task's `info`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether it fails the task without retries.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error converts to a retryable failure, so handlers can use `?`.
impl<E: std::error::Error> From<E> for TaskError {
    fn from(err: E) -> Self {
        Self::retryable(err)
    }
}

/// What a handler returns: the task's JSON result, or the attempt's failure.
pub type HandlerResult = Result<Value, TaskError>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type HandlerFn = Arc<dyn Fn(TaskContext) -> BoxFuture<HandlerResult> + Send + Sync>;
type SplitterFn = Arc<dyn Fn(&Value) -> Result<Vec<Value>, String> + Send + Sync>;

fn boxed<F, Fut>(handler: F) -> HandlerFn
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    Arc::new(move |ctx| Box::pin(handler(ctx)))
}

/// Task handlers by task type, splitters by job type, per-task-type timeouts, and the
/// stage plans of multi-stage job types.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, HandlerFn>,
    splitters: HashMap<String, SplitterFn>,
    timeouts: HashMap<String, Duration>,
    plans: HashMap<String, PhasePlan>,
    backends: HashMap<String, Arc<dyn Backend>>,
}

/// A job type of up to three stages: its tasks (made by the request or the splitter)
/// run the **map** handler, whose output the **reduce** handler reduces key by key,
/// and an optional **finalizer** turns the reduce output into the job's result. The
/// repository's `docs/protocol.md` (multi-stage jobs) shows the payloads each stage
/// gets.
///
/// ```
/// use serde_json::{json, Value};
/// use taskmill::{JobType, TaskContext, TaskError};
///
/// async fn count(ctx: TaskContext) -> Result<Value, TaskError> {
///     let text = ctx.payload.as_str().unwrap_or_default();
///     let mut counts = serde_json::Map::new();
///     for word in text.split_whitespace() {
///         let n = counts.get(word).and_then(Value::as_u64).unwrap_or(0);
///         counts.insert(word.to_owned(), json!(n + 1));
///     }
///     Ok(Value::Object(counts))
/// }
///
/// async fn sum(ctx: TaskContext) -> Result<Value, TaskError> {
///     // Shards get {"shard": i, "groups": {key: [values]}} and return {key: value}.
///     let groups = ctx.payload["groups"].as_object().cloned().unwrap_or_default();
///     let sums = groups.into_iter().map(|(word, counts)| {
///         let total: u64 = counts.as_array().into_iter().flatten().filter_map(Value::as_u64).sum();
///         (word, json!(total))
///     });
///     Ok(Value::Object(sums.collect()))
/// }
///
/// let words = JobType::new("words").map(count).reduce(sum).reduce_shards(4);
/// let pod = taskmill::Pod::builder().job_type(words);
/// ```
pub struct JobType {
    name: String,
    splitter: Option<SplitterFn>,
    map: Option<HandlerFn>,
    reduce: Option<HandlerFn>,
    finalize: Option<HandlerFn>,
    shards: u32,
    per_key: bool,
}

impl JobType {
    /// A job type named `name` (also its map handler's task type).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            splitter: None,
            map: None,
            reduce: None,
            finalize: None,
            shards: DEFAULT_REDUCE_SHARDS,
            per_key: false,
        }
    }

    /// Makes the map tasks' payloads from the job's `params` when a request carries no
    /// `tasks` (the same as `PodBuilder::splitter`).
    pub fn splitter<F>(mut self, splitter: F) -> Self
    where
        F: Fn(&Value) -> Result<Vec<Value>, String> + Send + Sync + 'static,
    {
        self.splitter = Some(Arc::new(splitter));
        self
    }

    /// The map handler: runs each of the job's tasks and returns a JSON object of key →
    /// value (or `null`: no output).
    pub fn map<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.map = Some(boxed(handler));
        self
    }

    /// The reduce handler (task type `<name>.reduce`): gets `{"key", "values"}` per key
    /// and returns the key's value, or gets `{"shard", "groups": {key: [values]}}` per
    /// shard and returns an object of key → value. Without one the job type has one
    /// stage.
    pub fn reduce<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.reduce = Some(boxed(handler));
        self
    }

    /// Reduce tasks per job at most ([`DEFAULT_REDUCE_SHARDS`] unless set; a request's
    /// `reduce_shards` overrides it).
    pub fn reduce_shards(mut self, shards: u32) -> Self {
        self.shards = shards.clamp(1, MAX_REDUCE_SHARDS);
        self
    }

    /// One reduce task per key instead of shards, unless a request says otherwise.
    pub fn reduce_per_key(mut self, per_key: bool) -> Self {
        self.per_key = per_key;
        self
    }

    /// The finalizer (task type `<name>.finalize`): one task whose payload is the reduce
    /// stage's merged output (an object of key → value) and whose result is the job's
    /// result. Runs only after a reduce stage.
    pub fn finalizer<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.finalize = Some(boxed(handler));
        self
    }
}

impl Registry {
    /// Registers the handler of `task_type`, replacing any earlier one.
    pub fn add_handler<F, Fut>(&mut self, task_type: impl Into<String>, handler: F)
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let task_type = task_type.into();
        self.backends.remove(&task_type);
        self.handlers.insert(task_type, boxed(handler));
    }

    /// Registers a job type's splitter, handlers and stage plan, replacing what was
    /// registered under its names before. A finalizer without a reduce handler is
    /// ignored, with a warning: it would have no reduce output to finalize.
    pub fn add_job_type(&mut self, job_type: JobType) {
        let name = job_type.name;
        self.plans.remove(&name);
        if let Some(splitter) = job_type.splitter {
            self.splitters.insert(name.clone(), splitter);
        }
        if let Some(map) = job_type.map {
            self.handlers.insert(name.clone(), map);
        }
        let Some(reduce) = job_type.reduce else {
            if job_type.finalize.is_some() {
                tracing::warn!(job_type = %name, "finalizer ignored: the job type has no reduce handler");
            }
            return;
        };
        let reduce_type = reduce_task_type(&name);
        self.handlers.insert(reduce_type.clone(), reduce);
        let finalize = job_type.finalize.map(|finalize| {
            let task_type = finalize_task_type(&name);
            self.handlers.insert(task_type.clone(), finalize);
            FinalizePlan { task_type }
        });
        let plan = PhasePlan {
            reduce: ReducePlan {
                task_type: reduce_type,
                shards: job_type.shards,
                per_key: job_type.per_key,
            },
            finalize,
        };
        self.plans.insert(name, plan);
    }

    /// Hands every task of `task_type` to `backend` instead of running a handler (see
    /// [`crate::external`]), replacing any earlier handler or backend of that type.
    pub fn add_backend(&mut self, task_type: impl Into<String>, backend: Arc<dyn Backend>) {
        let task_type = task_type.into();
        self.handlers.remove(&task_type);
        self.backends.insert(task_type, backend);
    }

    /// Whether any task type is external.
    pub fn has_backends(&self) -> bool {
        !self.backends.is_empty()
    }

    /// The backend tasks of `task_type` are handed to, if they are external.
    pub fn backend(&self, task_type: &str) -> Option<&Arc<dyn Backend>> {
        self.backends.get(task_type)
    }

    /// The stages after the map stage of `job_type`; `None` for a one-stage job type.
    pub fn plan(&self, job_type: &str) -> Option<&PhasePlan> {
        self.plans.get(job_type)
    }

    /// Registers the splitter of `job_type`, replacing any earlier one: it makes the task
    /// payloads from `params` when a request has no `tasks`; an `Err` parks the request
    /// with its text.
    pub fn add_splitter<F>(&mut self, job_type: impl Into<String>, splitter: F)
    where
        F: Fn(&Value) -> Result<Vec<Value>, String> + Send + Sync + 'static,
    {
        self.splitters.insert(job_type.into(), Arc::new(splitter));
    }

    /// How long one attempt of `task_type` may run, unless the job says otherwise.
    pub fn set_timeout(&mut self, task_type: impl Into<String>, timeout: Duration) {
        self.timeouts.insert(task_type.into(), timeout);
    }

    /// The timeout registered for `task_type`, if any.
    pub fn timeout(&self, task_type: &str) -> Option<Duration> {
        self.timeouts.get(task_type).copied()
    }

    /// Whether a handler is registered for `task_type`.
    pub(crate) fn knows_task_type(&self, task_type: &str) -> bool {
        self.handlers.contains_key(task_type) || self.backends.contains_key(task_type)
    }

    /// The task types with a handler or a backend.
    pub(crate) fn task_types(&self) -> impl Iterator<Item = &str> {
        self.handlers
            .keys()
            .chain(self.backends.keys())
            .map(String::as_str)
    }

    /// The job types known here: a task type (a job named after its tasks' type), a
    /// splitter's job type, a multi-stage job type.
    pub(crate) fn job_types(&self) -> impl Iterator<Item = &str> {
        self.task_types()
            .chain(self.splitters.keys().map(String::as_str))
            .chain(self.plans.keys().map(String::as_str))
    }

    /// Starts the handler for `ctx.task_type`, if one is registered.
    pub(crate) fn start(&self, ctx: TaskContext) -> Option<BoxFuture<HandlerResult>> {
        self.handlers
            .get(&ctx.task_type)
            .map(|handler| handler(ctx))
    }

    /// Runs the splitter for `job_type`, if one is registered.
    pub(crate) fn split(
        &self,
        job_type: &str,
        params: &Value,
    ) -> Option<Result<Vec<Value>, String>> {
        self.splitters.get(job_type).map(|split| split(params))
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("splitters", &self.splitters.keys().collect::<Vec<_>>())
            .field("plans", &self.plans)
            .field("backends", &self.backends.keys().collect::<Vec<_>>())
            .finish()
    }
}
