//! What jobs produced: their tasks' results and errors, read in ordinal pages so that
//! a job of any size streams in little memory, and the results a job event carries.

use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter};
use sea_orm::{QueryOrder, QuerySelect};
use serde_json::Value;

use super::error::StoreError;
use super::handle::Store;
use super::pg_batch::one_of;
use crate::protocol::{
    ResultsWithheld, TaskResult, RESULTS_IN_EVENT_MAX_BYTES, RESULTS_IN_EVENT_MAX_TASKS,
};
use crate::state::TaskStatus;
use entity::{job, task};

/// Ordinals read per page: a page is a range of the job's ordinals, never a LIMIT (see
/// [`Store::feed_page`] for the plan a LIMIT got).
const PAGE: i64 = 1_000;

/// A job's task results in ordinal order, read a page at a time.
pub type ResultStream = BoxStream<'static, Result<TaskResult, StoreError>>;

#[derive(FromQueryResult)]
struct ResultRow {
    id: i64,
    ordinal: i32,
    status: String,
    attempts: i32,
    result: Option<Value>,
    info: Option<String>,
}

impl From<ResultRow> for TaskResult {
    fn from(row: ResultRow) -> Self {
        Self {
            ordinal: row.ordinal,
            task_id: row.id,
            status: row.status,
            attempts: row.attempts,
            result: row.result,
            error: row.info,
        }
    }
}

impl Store {
    /// The results and errors of the job's tasks in ordinal order, only those in
    /// `status` when given; `None` when there is no such job, or it is being removed
    /// past its retention. A task that has not ended
    /// is listed with its status and no result. Reads 1,000 ordinals at a time, as
    /// the stream is polled.
    pub async fn results(
        &self,
        job_id: &str,
        status: Option<TaskStatus>,
    ) -> Result<Option<ResultStream>, StoreError> {
        let job = self.job(job_id).await?;
        let Some(job) = job.filter(|job| job.removal_started_at.is_none()) else {
            return Ok(None);
        };
        let end = job.task_count;
        let store = self.clone();
        let job_id = job_id.to_owned();
        let statuses: Vec<TaskStatus> = status.into_iter().collect();
        let pages = stream::try_unfold(0_i64, move |from| {
            let (store, job_id, statuses) = (store.clone(), job_id.clone(), statuses.clone());
            async move {
                if from >= end {
                    return Ok::<_, StoreError>(None);
                }
                let to = (from + PAGE).min(end);
                let page = store
                    .retrying("read results", || {
                        results_in(&store.db, &job_id, from, to, &statuses)
                    })
                    .await?;
                Ok(Some((
                    stream::iter(page.into_iter().map(Ok::<_, StoreError>)),
                    to,
                )))
            }
        });
        Ok(Some(pages.try_flatten().boxed()))
    }
}

/// The results of the job's tasks with ordinals in `from..to` whose status is one of
/// `statuses` (any when empty), in ordinal order.
async fn results_in<C: ConnectionTrait>(
    db: &C,
    job_id: &str,
    from: i64,
    to: i64,
    statuses: &[TaskStatus],
) -> Result<Vec<TaskResult>, StoreError> {
    let mut query = task::Entity::find()
        .select_only()
        .columns([
            task::Column::Id,
            task::Column::Ordinal,
            task::Column::Status,
            task::Column::Attempts,
            task::Column::Result,
            task::Column::Info,
        ])
        .filter(task::Column::JobId.eq(job_id))
        .filter(task::Column::Ordinal.gte(from))
        .filter(task::Column::Ordinal.lt(to));
    if !statuses.is_empty() {
        let names: Vec<String> = statuses.iter().map(|s| s.as_str().to_owned()).collect();
        query = query.filter(one_of(
            db.get_database_backend(),
            task::Column::Status,
            names,
        ));
    }
    let rows = query
        .order_by_asc(task::Column::Ordinal)
        .into_model::<ResultRow>()
        .all(db)
        .await?;
    Ok(rows.into_iter().map(TaskResult::from).collect())
}

/// What the event of an ending job carries in `results` and `results_withheld`: nothing
/// unless its request asked; the results of its `done` and `failed` tasks if they fit
/// the caps; else how many there are and why they are not there. `finished`: how many
/// tasks ended `done` or `failed`.
pub(super) async fn results_for_event<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    finished: i64,
) -> Result<(Option<Vec<TaskResult>>, Option<ResultsWithheld>), StoreError> {
    if !job.results_in_event {
        return Ok((None, None));
    }
    let read_them = format!(
        "read them with `taskmill results {}` or Client::results",
        job.id
    );
    if job.task_count > RESULTS_IN_EVENT_MAX_TASKS {
        let reason = format!(
            "the job has {} tasks, over the {RESULTS_IN_EVENT_MAX_TASKS} whose results an \
             event carries: {read_them}",
            job.task_count
        );
        return Ok((
            None,
            Some(ResultsWithheld {
                count: finished,
                reason,
            }),
        ));
    }
    let ended = [TaskStatus::Done, TaskStatus::Failed];
    let results = results_in(txn, &job.id, 0, job.task_count, &ended).await?;
    let bytes = serde_json::to_vec(&results)
        .expect("results serialize")
        .len();
    if bytes > RESULTS_IN_EVENT_MAX_BYTES {
        let reason = format!(
            "the results take {bytes} bytes of JSON, over the {RESULTS_IN_EVENT_MAX_BYTES} \
             an event carries: {read_them}"
        );
        return Ok((
            None,
            Some(ResultsWithheld {
                count: finished,
                reason,
            }),
        ));
    }
    Ok((Some(results), None))
}

/// What the event of an ended job carries of its result: the result when it takes at
/// most [`RESULTS_IN_EVENT_MAX_BYTES`] of JSON, else why it is not there.
pub(super) fn result_for_event(
    job_id: &str,
    result: Option<Value>,
) -> (Option<Value>, Option<String>) {
    let Some(result) = result else {
        return (None, None);
    };
    let bytes = serde_json::to_vec(&result)
        .expect("a result serializes")
        .len();
    if bytes <= RESULTS_IN_EVENT_MAX_BYTES {
        return (Some(result), None);
    }
    let reason = format!(
        "the job's result takes {bytes} bytes of JSON, over the {RESULTS_IN_EVENT_MAX_BYTES} \
         an event carries: read it with `taskmill status --json {job_id}` or Client::job_result"
    );
    (None, Some(reason))
}
