//! External tasks: work a task hands to another system (a build farm, a batch
//! service), kept in sync with it by polling.
//!
//! A task type registered with a [`Backend`] (`PodBuilder::backend`) is not run by a
//! handler: the worker hands the task to the backend, with `"<task id>:<attempt>"` as the
//! idempotency key (tried again under the same key when a call fails, since the backend
//! may have taken the task and lost only its answer), records the backend's id for it
//! in the task's row and acks. The task stays `running`. The syncer (one pod at a time,
//! by lease) asks the backend for the states of due tasks, up to [`FETCH_BATCH`] ids
//! per call, each backend in a task of its own, and applies what changed:
//! a state carries a monotonic update id — lower than the stored one is stale (ignored,
//! logged), equal is unchanged (only the sync time moves), higher is applied — and a
//! terminal state finishes the task (`done` with its result, or a failed attempt,
//! retried through the delay ladder as any other, which hands the task over again).
//! A task whose update id has not risen for the backend's
//! [`Backend::no_progress_timeout`] fails its attempt retryably: polls that answer are
//! not progress.

mod backend;
mod http;

pub use backend::{Backend, BackendError, ExternalState, ExternalStatus, Report, FETCH_BATCH};
pub use http::HttpBackend;
