//! The [`Backend`] trait and what backends report: the contract between taskmill and
//! an external system.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Ids asked of a backend per call at most.
pub const FETCH_BATCH: usize = 1_000;

/// An external system tasks can be handed to.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Hands a task over and returns the system's id for it. `key` (`"<task id>:<attempt>"`,
    /// `"<task id>:<attempt>:r<run>"` after a retry of the failed job) is the
    /// idempotency key: handed the same key twice (a worker that died between the
    /// hand-off and its commit, a redelivered message, a try again after an error whose
    /// hand-off the backend took), the backend must return the same id and make no
    /// second task.
    async fn hand_off(&self, key: &str, payload: &Value) -> Result<String, BackendError>;

    /// The states of up to [`FETCH_BATCH`] tasks, one per id asked, in any order.
    async fn fetch(&self, ids: &[String]) -> Result<Vec<ExternalState>, BackendError>;

    /// How often a task of this backend is polled.
    fn poll_interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// How long a task may go without progress (a higher update id) before its
    /// attempt fails as stuck.
    fn no_progress_timeout(&self) -> Duration {
        Duration::from_secs(600)
    }
}

/// One task's state as a backend reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExternalState {
    /// The backend's id for the task.
    pub id: String,
    /// What the backend knows of it, or why it could not say.
    #[serde(flatten)]
    pub report: Report,
}

/// A backend's answer for one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Report {
    /// The task's state, with the update id that orders reports of it.
    State {
        /// Rises with every change of the task on the backend's side.
        update_id: i64,
        /// Where the task is.
        #[serde(flatten)]
        status: ExternalStatus,
    },
    /// The backend could not report on this task now; it is asked again next time.
    Error {
        /// Why.
        error: String,
    },
}

/// Where an external task is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ExternalStatus {
    /// Still going.
    Running,
    /// Finished, with its result.
    Done {
        /// The task's result.
        #[serde(default)]
        result: Value,
    },
    /// Finished in failure; the attempt fails and is retried if the job allows.
    Failed {
        /// Why.
        #[serde(rename = "message")]
        message: String,
    },
}

/// A backend call that failed as a whole.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_read_as_the_http_backend_sends_them() {
        let states: Vec<ExternalState> = serde_json::from_value(json!([
            {"id": "a", "update_id": 3, "state": "running"},
            {"id": "b", "update_id": 4, "state": "done", "result": {"ok": true}},
            {"id": "c", "update_id": 5, "state": "failed", "message": "boom"},
            {"id": "d", "error": "not found"},
        ]))
        .unwrap();
        let reports: Vec<Report> = states.into_iter().map(|s| s.report).collect();
        assert_eq!(
            reports,
            vec![
                Report::State {
                    update_id: 3,
                    status: ExternalStatus::Running
                },
                Report::State {
                    update_id: 4,
                    status: ExternalStatus::Done {
                        result: json!({"ok": true})
                    }
                },
                Report::State {
                    update_id: 5,
                    status: ExternalStatus::Failed {
                        message: "boom".into()
                    }
                },
                Report::Error {
                    error: "not found".into()
                },
            ]
        );
    }
}
