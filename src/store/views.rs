//! Read-only views for the dashboard: a job's throughput over time, counted by the
//! database, so that a page about a job of a million tasks reads one row per bucket.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, EntityTrait, FromQueryResult, QueryFilter,
    QuerySelect, Statement,
};

use super::error::StoreError;
use super::handle::Store;
use entity::task;

/// A job's ended tasks counted per time bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    /// When its first task ended: the start of the first bucket.
    pub start: DateTime<Utc>,
    /// Each bucket's width, in milliseconds (at least a second).
    pub bucket_ms: i64,
    /// Tasks that ended in each bucket, from `start` on; empty buckets are 0.
    pub counts: Vec<u64>,
}

#[derive(FromQueryResult)]
struct Bucket {
    bucket: i64,
    count: i64,
}

impl Store {
    /// How `job_id`'s tasks ended over time, in at most `buckets` buckets; `None`
    /// before any ended.
    pub async fn throughput(
        &self,
        job_id: &str,
        buckets: u32,
    ) -> Result<Option<Throughput>, StoreError> {
        self.retrying("read throughput", || async {
            let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
                task::Entity::find()
                    .select_only()
                    .column_as(task::Column::FinishedAt.min(), "first")
                    .column_as(task::Column::FinishedAt.max(), "last")
                    .filter(task::Column::JobId.eq(job_id))
                    .into_tuple()
                    .one(&self.db)
                    .await?
                    .unwrap_or((None, None));
            let (Some(start), Some(last)) = (first, last) else {
                return Ok(None);
            };
            let span_ms = (last - start).num_milliseconds().max(0) + 1;
            let buckets = i64::from(buckets.max(1));
            let bucket_ms = ((span_ms + buckets - 1) / buckets).max(1_000);
            let backend = self.backend();
            let sql = if backend == DatabaseBackend::Postgres {
                "SELECT FLOOR(EXTRACT(EPOCH FROM (finished_at - $2)) * 1000 / $3)::BIGINT AS bucket, \
                 COUNT(*)::BIGINT AS count FROM tasks \
                 WHERE job_id = $1 AND finished_at IS NOT NULL GROUP BY 1 ORDER BY 1"
            } else {
                "SELECT CAST((julianday(finished_at) - julianday($2)) * 86400000 / $3 AS INTEGER) \
                 AS bucket, COUNT(*) AS count FROM tasks \
                 WHERE job_id = $1 AND finished_at IS NOT NULL GROUP BY 1 ORDER BY 1"
            };
            let rows = self
                .db
                .query_all_raw(Statement::from_sql_and_values(
                    backend,
                    sql,
                    [job_id.into(), start.into(), bucket_ms.into()],
                ))
                .await?;
            let mut counts = vec![0; ((span_ms + bucket_ms - 1) / bucket_ms) as usize];
            for row in rows {
                let Bucket { bucket, count } = Bucket::from_query_result(&row, "")?;
                // Rounding may put the last task one bucket past the span.
                let index = usize::try_from(bucket).unwrap_or(0).min(counts.len() - 1);
                counts[index] += count as u64;
            }
            Ok(Some(Throughput {
                start,
                bucket_ms,
                counts,
            }))
        })
        .await
    }
}
