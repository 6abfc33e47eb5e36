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
    pub job_id: String,
    pub task_id: i64,
    pub task_type: String,
    /// 1 on the first run.
    pub attempt: i32,
    pub max_retries: i32,
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
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            permanent: false,
        }
    }

    pub fn permanent(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            permanent: true,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

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

pub type HandlerResult = Result<Value, TaskError>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type HandlerFn = Arc<dyn Fn(TaskContext) -> BoxFuture<HandlerResult> + Send + Sync>;
type SplitterFn = Arc<dyn Fn(&Value) -> Result<Vec<Value>, String> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, HandlerFn>,
    splitters: HashMap<String, SplitterFn>,
    timeouts: HashMap<String, Duration>,
}

impl Registry {
    pub fn add_handler<F, Fut>(&mut self, task_type: impl Into<String>, handler: F)
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: HandlerFn = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers.insert(task_type.into(), handler);
    }

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

    pub fn knows_task_type(&self, task_type: &str) -> bool {
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
