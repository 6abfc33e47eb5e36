//! Read-only views for the dashboard, each costing the same for a job of ten tasks as
//! for one of a million: a window of the job's failed tasks, read by a range of the
//! `(job_id, ordinal)` index, and its throughput over time estimated from an evenly
//! spaced sample of its tasks, probed by the same index. Neither scans the job.

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::error::StoreError;
use super::handle::Store;
use super::pg_batch::one_of;
use crate::protocol::TaskResult;
use crate::state::TaskStatus;
use entity::task;

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

impl Store {
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
        self.retrying("read failed tasks", || async {
            let rows: Vec<(i64, i32, String, i32, Option<String>)> = task::Entity::find()
                .select_only()
                .columns([
                    task::Column::Id,
                    task::Column::Ordinal,
                    task::Column::Status,
                    task::Column::Attempts,
                    task::Column::Info,
                ])
                .filter(task::Column::JobId.eq(job_id))
                .filter(task::Column::Ordinal.gte(from))
                .filter(task::Column::Ordinal.lt(from.saturating_add(window)))
                .filter(task::Column::Status.eq(TaskStatus::Failed.as_str()))
                .order_by_asc(task::Column::Ordinal)
                .limit(limit)
                .into_tuple()
                .all(&self.db)
                .await?;
            Ok(rows
                .into_iter()
                .map(|(task_id, ordinal, status, attempts, error)| TaskResult {
                    ordinal,
                    task_id,
                    status,
                    attempts,
                    result: None,
                    error,
                })
                .collect())
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
