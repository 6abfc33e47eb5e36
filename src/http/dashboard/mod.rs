//! The dashboard: server-rendered pages of jobs, one job, the queues and the parking
//! lot, with no script and nothing fetched from elsewhere. Reading needs nothing;
//! the write actions (cancel, retry, replay) are forms that carry the configured
//! token, compared in constant time, and are refused when none is configured.

mod views;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::{StreamExt, TryStreamExt};
use maud::Markup;
use serde::Deserialize;

use super::endpoint::Endpoint;
use crate::amqp::broker::{close_channel, Publisher};
use crate::amqp::parking;
use crate::amqp::topology::ready_in;
use crate::error::Error;
use crate::state::{JobStage, TaskStatus};
use crate::store::JobFilter;

/// Jobs on the list page, the newest first.
const JOBS_SHOWN: u64 = 100;
/// Parked messages shown.
const PARKED_SHOWN: usize = 100;
/// Bars of a job's throughput chart.
const CHART_BARS: u32 = 60;

pub(super) fn routes() -> Router<Arc<Endpoint>> {
    Router::new()
        .route("/", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/retry", post(retry))
        .route("/queues", get(queues))
        .route("/parking", get(parking_lot))
        .route("/parking/replay", post(replay))
}

/// A page that could not be made: the reason, as the page.
struct Trouble(StatusCode, String);

impl IntoResponse for Trouble {
    fn into_response(self) -> Response {
        (self.0, views::message("Trouble", &self.1, None)).into_response()
    }
}

impl From<Error> for Trouble {
    fn from(err: Error) -> Self {
        Self(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
    }
}

impl From<crate::store::StoreError> for Trouble {
    fn from(err: crate::store::StoreError) -> Self {
        Error::from(err).into()
    }
}

#[derive(Deserialize)]
struct JobsQuery {
    stage: Option<String>,
    #[serde(rename = "type")]
    job_type: Option<String>,
}

async fn jobs(
    State(endpoint): State<Arc<Endpoint>>,
    Query(query): Query<JobsQuery>,
) -> Result<Markup, Trouble> {
    let stage = match query.stage.as_deref().filter(|s| !s.is_empty()) {
        Some(stage) => Some(
            stage
                .parse::<JobStage>()
                .map_err(|err| Trouble(StatusCode::BAD_REQUEST, err.to_string()))?,
        ),
        None => None,
    };
    let job_type = query.job_type.filter(|t| !t.is_empty());
    let jobs = endpoint
        .store
        .jobs(&JobFilter {
            stage,
            job_type: job_type.clone(),
            limit: JOBS_SHOWN,
        })
        .await?;
    Ok(views::jobs(&jobs, stage, job_type.as_deref()))
}

async fn job(
    State(endpoint): State<Arc<Endpoint>>,
    Path(id): Path<String>,
) -> Result<Markup, Trouble> {
    let store = &endpoint.store;
    let Some(status) = store.job_status(&id).await? else {
        return Err(Trouble(StatusCode::NOT_FOUND, format!("no job {id:?}")));
    };
    let failed: Vec<_> = match store.results(&id, Some(TaskStatus::Failed)).await? {
        Some(results) => results.take(views::FAILED_SHOWN).try_collect().await?,
        None => Vec::new(),
    };
    let throughput = store.throughput(&id, CHART_BARS).await?;
    Ok(views::job(
        &status,
        &failed,
        throughput.as_ref(),
        endpoint.token.is_some(),
    ))
}

/// Ready messages and consumers of every queue taskmill reads, by passive declares
/// (the unacked ones are the management API's to count).
async fn queues(State(endpoint): State<Arc<Endpoint>>) -> Result<Markup, Trouble> {
    let topology = &endpoint.topology;
    let mut names = vec![
        topology.intake_queue(),
        topology.completion_queue(),
        topology.parking_queue(),
    ];
    for pool in endpoint.store.pools().await? {
        names.push(topology.work_queue(&pool.name));
    }
    let connection = endpoint.link.live_connection();
    let mut rows = Vec::with_capacity(names.len());
    for name in names {
        let ready = match &connection {
            Some(connection) => match connection.create_channel().await {
                Ok(channel) => {
                    let ready = ready_in(&channel, &name).await.ok();
                    if ready.is_some() {
                        close_channel(&channel).await;
                    }
                    ready
                }
                Err(_) => None,
            },
            None => None,
        };
        rows.push((name, ready));
    }
    Ok(views::queues(&rows, connection.is_some()))
}

async fn parking_lot(State(endpoint): State<Arc<Endpoint>>) -> Result<Markup, Trouble> {
    let connection = connection(&endpoint)?;
    let parked = parking::list(&connection, &endpoint.topology, PARKED_SHOWN)
        .await
        .map_err(Error::from)?;
    Ok(views::parking(&parked, endpoint.token.is_some()))
}

/// Whether a write action may run: a token is configured and the form carries it.
fn authorize(endpoint: &Endpoint, form: &HashMap<String, String>) -> Result<(), Trouble> {
    let Some(token) = &endpoint.token else {
        return Err(Trouble(
            StatusCode::FORBIDDEN,
            "the dashboard is read-only: set TASKMILL_DASHBOARD_TOKEN on the pods to allow cancel, retry and replay".into(),
        ));
    };
    let given = form.get("token").map(String::as_str).unwrap_or_default();
    if !token.matches(given) {
        return Err(Trouble(StatusCode::FORBIDDEN, "wrong token".into()));
    }
    Ok(())
}

/// The broker connection, for an action that needs it.
fn connection(endpoint: &Endpoint) -> Result<Arc<lapin::Connection>, Trouble> {
    endpoint.link.live_connection().ok_or_else(|| {
        Trouble(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker is not connected".into(),
        )
    })
}

/// What a job's action does.
#[derive(Clone, Copy)]
enum JobAction {
    Cancel,
    Retry,
}

async fn cancel(
    State(endpoint): State<Arc<Endpoint>>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Markup, Trouble> {
    act(&endpoint, &form, &id, JobAction::Cancel).await
}

async fn retry(
    State(endpoint): State<Arc<Endpoint>>,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Markup, Trouble> {
    act(&endpoint, &form, &id, JobAction::Retry).await
}

/// Runs a job's action on a publisher of its own, as the client would, and says what
/// came of it.
async fn act(
    endpoint: &Endpoint,
    form: &HashMap<String, String>,
    id: &str,
    action: JobAction,
) -> Result<Markup, Trouble> {
    authorize(endpoint, form)?;
    let publisher = Publisher::open(&connection(endpoint)?)
        .await
        .map_err(Error::from)?;
    let (store, topology) = (&endpoint.store, &endpoint.topology);
    let done = match action {
        JobAction::Cancel => crate::client::cancel_job(store, &publisher, topology, id)
            .await
            .map(|event| match event {
                Some(event) => format!(
                    "Job {id} is cancelled: {} tasks cancelled.",
                    event.cancelled
                ),
                None => format!("Job {id} was not running: nothing was cancelled."),
            }),
        JobAction::Retry => crate::client::retry_job(store, id)
            .await
            .map(|tasks| format!("Job {id} runs again: {tasks} tasks.")),
    };
    publisher.close().await;
    let text = match done {
        Ok(text) => text,
        Err(err @ (Error::NotRetried { .. } | Error::UnknownJob(_))) => err.to_string(),
        Err(err) => return Err(err.into()),
    };
    let title = match action {
        JobAction::Cancel => "Cancel",
        JobAction::Retry => "Retry",
    };
    Ok(views::message(title, &text, Some(id)))
}

async fn replay(
    State(endpoint): State<Arc<Endpoint>>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Markup, Trouble> {
    authorize(&endpoint, &form)?;
    let connection = connection(&endpoint)?;
    let ids: Option<Vec<String>> = form.get("id").map(|id| vec![id.clone()]);
    let replayed = parking::replay(&connection, &endpoint.topology, ids.as_deref())
        .await
        .map_err(Error::from)?;
    Ok(views::message(
        "Replay",
        &format!("{replayed} parked messages sent back where they were first published."),
        None,
    ))
}
