//! The dashboard: server-rendered pages of jobs, one job, the queues and the parking
//! lot, with no script and nothing fetched from elsewhere. Every page and action needs
//! the pod's token (see `http/access.rs`); the write actions (cancel, retry, replay)
//! also need it to be the configured one.
//!
//! Pages read through the endpoint's own small store (two connections, a statement
//! timeout on PostgreSQL) and give up after [`PAGE_WAIT`], so open browser
//! tabs cannot slow the pipeline down; and a page costs the same for a job of a
//! million tasks as for one of ten: the job's counters instead of counting its tasks,
//! its failed tasks from a window of [`FAILED_WINDOW`] ordinals, its chart from a
//! sample (see `store/results.rs`).

mod views;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::Markup;
use serde::Deserialize;

use super::access::Admission;
use super::endpoint::{Endpoint, PAGE_WAIT};
use crate::amqp::broker::{close_channel, Publisher};
use crate::amqp::parking;
use crate::amqp::topology::ready_in;
use crate::error::Error;
use crate::state::JobStage;
use crate::store::{retry_refused, JobFilter};

/// Ordinals of a job whose failed tasks one page looks for.
const FAILED_WINDOW: i64 = 5_000;

/// Jobs on the list page, the newest first.
const JOBS_SHOWN: u64 = 100;
/// Parked messages shown.
const PARKED_SHOWN: usize = 100;
/// Bars of a job's throughput chart.
const CHART_BARS: u32 = 60;

/// The dashboard's routes, every one behind the token.
pub(super) fn routes(endpoint: Arc<Endpoint>) -> Router<Arc<Endpoint>> {
    Router::new()
        .route("/", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/retry", post(retry))
        .route("/queues", get(queues))
        .route("/schedules", get(schedules))
        .route("/parking", get(parking_lot))
        .route("/parking/replay", post(replay))
        .route_layer(middleware::from_fn_with_state(endpoint, require_token))
}

/// Lets a request through only with the token (see `http/access.rs`).
async fn require_token(
    State(endpoint): State<Arc<Endpoint>>,
    request: Request,
    next: middleware::Next,
) -> Response {
    match endpoint.access.admit(request.uri(), request.headers()) {
        Admission::Through => next.run(request).await,
        Admission::Redirect { location, cookie } => (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, location), (header::SET_COOKIE, cookie)],
        )
            .into_response(),
        Admission::Refused(why) => {
            let text = format!(
                "{why}: open the dashboard's URL with ?token=… (the pod logs it at start when \
                 TASKMILL_DASHBOARD_TOKEN is not set), or send Authorization: Bearer …"
            );
            (
                StatusCode::UNAUTHORIZED,
                views::message("Token needed", &text, None),
            )
                .into_response()
        }
    }
}

/// A page's reads, given [`PAGE_WAIT`] in all.
async fn read<T>(reads: impl Future<Output = Result<T, Trouble>>) -> Result<T, Trouble> {
    tokio::time::timeout(PAGE_WAIT, reads).await.map_err(|_| {
        Trouble(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the database did not answer within {PAGE_WAIT:?}"),
        )
    })?
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
    let filter = JobFilter {
        stage,
        job_type: job_type.clone(),
        limit: JOBS_SHOWN,
    };
    let jobs = read(async { Ok(endpoint.reader.jobs(&filter).await?) }).await?;
    Ok(views::jobs(&jobs, stage, job_type.as_deref()))
}

#[derive(Deserialize)]
struct JobQuery {
    /// The first ordinal of the window of tasks whose failures are listed.
    failed_from: Option<i64>,
}

async fn job(
    State(endpoint): State<Arc<Endpoint>>,
    Path(id): Path<String>,
    Query(query): Query<JobQuery>,
) -> Result<Markup, Trouble> {
    let store = &endpoint.reader;
    let (job, failed, throughput) = read(async {
        let Some(job) = store.job(&id).await? else {
            return Err(Trouble(StatusCode::NOT_FOUND, format!("no job {id:?}")));
        };
        let from = query
            .failed_from
            .unwrap_or(0)
            .clamp(0, job.task_count.max(0));
        // The counters say whether there is anything to look for.
        let failed = if job.failed_count > 0 {
            store
                .failed_tasks_in(&id, from, FAILED_WINDOW, views::FAILED_SHOWN)
                .await?
        } else {
            Vec::new()
        };
        let throughput = store.throughput(&id, job.task_count, CHART_BARS).await?;
        Ok((
            job,
            views::Failures {
                from,
                window: FAILED_WINDOW,
                tasks: failed,
            },
            throughput,
        ))
    })
    .await?;
    // Offered only where it would be accepted; the job's counters stand in for a count
    // of its failed and cancelled tasks.
    let retry = retry_refused(&job, (job.failed_count + job.cancelled_count).max(0) as u64);
    Ok(views::job(
        &job,
        &failed,
        throughput.as_ref(),
        endpoint.access.writable(),
        retry.as_deref(),
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
    for pool in read(async { Ok(endpoint.reader.pools().await?) }).await? {
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

async fn schedules(State(endpoint): State<Arc<Endpoint>>) -> Result<Markup, Trouble> {
    let rows = read(async { Ok(endpoint.reader.schedules().await?) }).await?;
    Ok(views::schedules(&rows))
}

async fn parking_lot(State(endpoint): State<Arc<Endpoint>>) -> Result<Markup, Trouble> {
    let connection = connection(&endpoint)?;
    let parked = parking::list(&connection, &endpoint.topology, PARKED_SHOWN)
        .await
        .map_err(Error::from)?;
    Ok(views::parking(&parked, endpoint.access.writable()))
}

/// Whether a write action may run (the request showed the token to get here): the
/// token is the configured one, not one the pod made.
fn authorize(endpoint: &Endpoint) -> Result<(), Trouble> {
    if !endpoint.access.writable() {
        return Err(Trouble(
            StatusCode::FORBIDDEN,
            "the dashboard is read-only: set TASKMILL_DASHBOARD_TOKEN on the pods to allow cancel, retry and replay".into(),
        ));
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
) -> Result<Markup, Trouble> {
    act(&endpoint, &id, JobAction::Cancel).await
}

async fn retry(
    State(endpoint): State<Arc<Endpoint>>,
    Path(id): Path<String>,
) -> Result<Markup, Trouble> {
    act(&endpoint, &id, JobAction::Retry).await
}

/// Runs a job's action on a publisher of its own, as the client would, and says what
/// came of it.
async fn act(endpoint: &Endpoint, id: &str, action: JobAction) -> Result<Markup, Trouble> {
    authorize(endpoint)?;
    let publisher = Publisher::open(&connection(endpoint)?)
        .await
        .map_err(Error::from)?;
    let (store, topology) = (&endpoint.store, &endpoint.topology);
    let done = match action {
        JobAction::Cancel => crate::operations::cancel_job(store, &publisher, topology, id)
            .await
            .map(|event| match event {
                Some(event) => format!(
                    "Job {id} is cancelled: {} tasks cancelled.",
                    event.cancelled
                ),
                None => format!("Job {id} was not running: nothing was cancelled."),
            }),
        JobAction::Retry => crate::operations::retry_job(store, id)
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
    authorize(&endpoint)?;
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
