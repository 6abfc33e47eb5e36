//! [`HttpBackend`]: any HTTP service that takes JSON can be a backend.
//!
//! - hand-off: `POST <hand_off_url>` with `{"key": "<task id>:<attempt>", "payload":
//!   ...}`, answered `{"id": "..."}` (the same id for the same key);
//! - sync: `POST <status_url>` with `{"ids": [...]}` (at most 1,000), answered
//!   `{"states": [...]}`, one per id: `{"id", "update_id", "state": "running"}`,
//!   `{"id", "update_id", "state": "done", "result": ...}`, `{"id", "update_id",
//!   "state": "failed", "message": "..."}`, or `{"id", "error": "..."}` when the service
//!   cannot say now.
//!
//! A status other than 2xx, a body that does not parse, or no answer within the
//! timeout is an error for the whole call.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::backend::{Backend, BackendError, ExternalState};

/// How long one HTTP call may take, unless set.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A backend reached over HTTP with JSON bodies (see the module docs for the shapes).
#[derive(Clone, Debug)]
pub struct HttpBackend {
    hand_off_url: String,
    status_url: String,
    agent: ureq::Agent,
    poll_interval: Duration,
    no_progress_timeout: Duration,
}

#[derive(Deserialize)]
struct HandedOff {
    id: String,
}

#[derive(Deserialize)]
struct States {
    states: Vec<ExternalState>,
}

impl HttpBackend {
    /// A backend that hands tasks to `hand_off_url` and asks `status_url` for their
    /// states; every call times out after 30 s.
    pub fn new(hand_off_url: impl Into<String>, status_url: impl Into<String>) -> Self {
        Self {
            hand_off_url: hand_off_url.into(),
            status_url: status_url.into(),
            agent: agent(DEFAULT_TIMEOUT),
            poll_interval: Duration::from_secs(2),
            no_progress_timeout: Duration::from_secs(600),
        }
    }

    /// How long one call may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.agent = agent(timeout);
        self
    }

    /// How often a task is polled (2 s unless set).
    pub fn poll_every(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long a task may go without progress before its attempt fails (10 min
    /// unless set).
    pub fn no_progress_after(mut self, timeout: Duration) -> Self {
        self.no_progress_timeout = timeout;
        self
    }

    /// POSTs `body` to `url` on a blocking thread and reads the JSON answer.
    async fn post<T: DeserializeOwned + Send + 'static>(
        &self,
        url: &str,
        body: Value,
    ) -> Result<T, BackendError> {
        let (agent, url) = (self.agent.clone(), url.to_owned());
        tokio::task::spawn_blocking(move || {
            agent
                .post(&url)
                .send_json(&body)
                .map_err(|err| BackendError(format!("POST {url}: {err}")))?
                .body_mut()
                .read_json::<T>()
                .map_err(|err| BackendError(format!("POST {url}: unreadable answer: {err}")))
        })
        .await
        .map_err(|err| BackendError(format!("HTTP call aborted: {err}")))?
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into()
}

#[async_trait::async_trait]
impl Backend for HttpBackend {
    async fn hand_off(&self, key: &str, payload: &Value) -> Result<String, BackendError> {
        let body = json!({ "key": key, "payload": payload });
        let handed: HandedOff = self.post(&self.hand_off_url, body).await?;
        Ok(handed.id)
    }

    async fn fetch(&self, ids: &[String]) -> Result<Vec<ExternalState>, BackendError> {
        let states: States = self.post(&self.status_url, json!({ "ids": ids })).await?;
        Ok(states.states)
    }

    fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    fn no_progress_timeout(&self) -> Duration {
        self.no_progress_timeout
    }
}
