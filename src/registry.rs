//! Task handlers and job splitters, registered by name.
//!
//! A handler is an async function from a [`TaskContext`] to a JSON result or a
//! [`TaskError`]; a splitter turns a job's `params` into task payloads when the
//! request carries no `tasks`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

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

/// Task handlers by task type, splitters by job type, and per-task-type timeouts.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, HandlerFn>,
    splitters: HashMap<String, SplitterFn>,
    timeouts: HashMap<String, Duration>,
}

impl Registry {
    /// Registers the handler of `task_type`, replacing any earlier one.
    pub fn add_handler<F, Fut>(&mut self, task_type: impl Into<String>, handler: F)
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: HandlerFn = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers.insert(task_type.into(), handler);
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
        self.handlers.contains_key(task_type)
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
            .finish()
    }
}
