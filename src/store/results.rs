//! What a job's tasks produced, and how fast, read by ranges of the `(job_id, ordinal)`
//! index so that each read costs the same for a job of ten tasks as for one of a
//! million: results and errors streamed in ordinal pages, a window of the failed
//! tasks, throughput over time from an evenly spaced sample (never a scan of the
//! job), and the results a job event carries.

use chrono::{DateTime, Utc};
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

/// Tasks a throughput chart reads at most: past this many, every n-th task stands for
/// n. 600 index probes take about 6 ms on PostgreSQL; 10 a bar of a 60-bar chart.
const THROUGHPUT_SAMPLE: i64 = 600;

/// A job's ended tasks counted per time bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    /// When its first task ended: the start of the first bucket.
    pub start: DateTime<Utc>,
    /// Each bucket's width, in milliseconds (at least a second).
    pub bucket_ms: i64,
    /// Tasks that ended in each bucket, from `start` on; empty buckets are 0. With a
    /// sample, each sampled task counts for [`Self::every`].
    pub counts: Vec<u64>,
    /// One task in this many was read: 1 when the chart counts every task.
    pub every: i64,
}

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
                        results_in(&store.db, &job_id, from, to, &statuses, None)
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

    /// The failed tasks of `job_id` among the ordinals `from..from + window`, in
    /// ordinal order, `limit` at most: a range of the `(job_id, ordinal)` index, so at
    /// most `window` rows are looked at whatever the job's size.
    pub async fn failed_tasks_in(
        &self,
        job_id: &str,
        from: i64,
        window: i64,
        limit: u64,
    ) -> Result<Vec<TaskResult>, StoreError> {
        let failed = [TaskStatus::Failed];
        let to = from.saturating_add(window);
        self.retrying("read failed tasks", || {
            results_in(&self.db, job_id, from, to, &failed, Some(limit))
        })
        .await
    }

    /// How the job's `task_count` tasks ended over time, in at most `buckets`
    /// buckets; `None` before any of those read ended. Reads at most
    /// 600 tasks, evenly spaced by ordinal (tasks are sent in ordinal
    /// order, so the sample follows the job's pace), and scales their counts up.
    pub async fn throughput(
        &self,
        job_id: &str,
        task_count: i64,
        buckets: u32,
    ) -> Result<Option<Throughput>, StoreError> {
        let every = (task_count + THROUGHPUT_SAMPLE - 1) / THROUGHPUT_SAMPLE;
        let every = every.max(1);
        let ordinals: Vec<i32> = (0..task_count.min(i64::from(i32::MAX)))
            .step_by(every as usize)
            .filter_map(|ordinal| i32::try_from(ordinal).ok())
            .collect();
        let backend = self.backend();
        let ended: Vec<DateTime<Utc>> = self
            .retrying("read throughput", || async {
                let ended: Vec<Option<DateTime<Utc>>> = task::Entity::find()
                    .select_only()
                    .column(task::Column::FinishedAt)
                    .filter(task::Column::JobId.eq(job_id))
                    .filter(one_of(backend, task::Column::Ordinal, ordinals.clone()))
                    .filter(task::Column::FinishedAt.is_not_null())
                    .into_tuple()
                    .all(&self.db)
                    .await?;
                Ok(ended.into_iter().flatten().collect())
            })
            .await?;
        Ok(bucketed(&ended, buckets, every))
    }
}

/// The results of the job's tasks with ordinals in `from..to` whose status is one of
/// `statuses` (any when empty), in ordinal order, `limit` at most.
async fn results_in<C: ConnectionTrait>(
    db: &C,
    job_id: &str,
    from: i64,
    to: i64,
    statuses: &[TaskStatus],
    limit: Option<u64>,
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
        .limit(limit)
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
    let results = results_in(txn, &job.id, 0, job.task_count, &ended, None).await?;
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

/// `ended` counted in at most `buckets` buckets of a second or more, each counting
/// `every`; `None` when empty.
fn bucketed(ended: &[DateTime<Utc>], buckets: u32, every: i64) -> Option<Throughput> {
    let start = *ended.iter().min()?;
    let last = *ended.iter().max()?;
    let span_ms = (last - start).num_milliseconds().max(0) + 1;
    let buckets = i64::from(buckets.max(1));
    let bucket_ms = ((span_ms + buckets - 1) / buckets).max(1_000);
    let mut counts = vec![0; ((span_ms + bucket_ms - 1) / bucket_ms) as usize];
    for at in ended {
        // The last task may land one bucket past the span by rounding.
        let index = ((*at - start).num_milliseconds() / bucket_ms) as usize;
        let last = counts.len() - 1;
        counts[index.min(last)] += every as u64;
    }
    Some(Throughput {
        start,
        bucket_ms,
        counts,
        every,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone, Utc};

    use super::bucketed;

    #[test]
    fn a_sample_counts_for_the_tasks_it_stands_for() {
        let start = Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap();
        let ended: Vec<_> = (0..120)
            .map(|second| start + Duration::seconds(second))
            .collect();
        let chart = bucketed(&ended, 60, 500).unwrap();
        assert_eq!((chart.start, chart.every), (start, 500));
        assert!(chart.bucket_ms >= 1_000 && chart.counts.len() <= 60);
        assert_eq!(chart.counts.iter().sum::<u64>(), 120 * 500);
        assert!(bucketed(&[], 60, 1).is_none());
    }
}
