//! What the sweeper reads and writes: stuck tasks in shards, compare-and-set touches
//! on their version, quiet jobs and stale formations.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::error::StoreError;
use super::handle::Store;

use crate::state::{JobStage, TaskStatus};
use entity::{job, job_event, task};

/// Rows per write transaction of the sweeper.
pub const SWEEP_WRITE_BATCH: usize = 25;

impl Store {
    /// Tasks of shard `shard` (of `shards`, by id modulo) that have stayed put since
    /// `quiet_since` although they should be moving: pending or retrying unchanged
    /// since then (their message may be lost), or running with a lease that ran out
    /// before then (their worker died; a claim does not move `updated_at`, its lease
    /// says when it was last alive). Pages go in `(updated_at, id)` order from `after`,
    /// the last row of the page before, so that each page continues the partial index
    /// of unfinished tasks where the last one stopped: a sweep reads each row once,
    /// however many there are. Pending tasks of jobs whose feeder has not published
    /// them all are left out: not lost, just not sent yet.
    pub async fn stuck_tasks(
        &self,
        shard: u32,
        shards: u32,
        after: Option<(DateTime<Utc>, i64)>,
        limit: u64,
        quiet_since: DateTime<Utc>,
    ) -> Result<Vec<task::Model>, StoreError> {
        self.retrying("scan stuck tasks", || async {
            let fed = Query::select()
                .column(job::Column::Id)
                .from(job::Entity)
                .and_where(job::Column::TasksPublished.eq(true))
                .to_owned();
            let stuck = Condition::any()
                .add(
                    Condition::all()
                        .add(task::Column::Status.eq(TaskStatus::Pending.as_str()))
                        .add(task::Column::JobId.in_subquery(fed)),
                )
                .add(task::Column::Status.eq(TaskStatus::Retrying.as_str()))
                .add(
                    Condition::all()
                        .add(task::Column::Status.eq(TaskStatus::Running.as_str()))
                        .add(task::Column::LeaseUntil.lt(quiet_since)),
                );
            let mut page = task::Entity::find()
                // What the partial index `tasks_unfinished_since` covers.
                .filter(task::Column::FinishedAt.is_null())
                .filter(task::Column::UpdatedAt.lt(quiet_since))
                .filter(stuck)
                .filter(
                    Expr::col(task::Column::Id)
                        .modulo(i64::from(shards))
                        .eq(i64::from(shard)),
                );
            if let Some((updated_at, id)) = after {
                page = page.filter(
                    Condition::any()
                        .add(task::Column::UpdatedAt.gt(updated_at))
                        .add(
                            Condition::all()
                                .add(task::Column::UpdatedAt.eq(updated_at))
                                .add(task::Column::Id.gt(id)),
                        ),
                );
            }
            Ok(page
                .order_by_asc(task::Column::UpdatedAt)
                .order_by_asc(task::Column::Id)
                .limit(limit)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Marks the given tasks as swept now (`updated_at`, `version + 1`), each only if
    /// its version is still the one the sweeper read: a task that moved since is
    /// stale and skipped. At most [`SWEEP_WRITE_BATCH`] rows per transaction. Returns
    /// the ids touched.
    pub async fn touch_tasks(&self, seen: &[(i64, i64)]) -> Result<Vec<i64>, StoreError> {
        let mut touched = Vec::with_capacity(seen.len());
        for batch in seen.chunks(SWEEP_WRITE_BATCH) {
            let batch = batch.to_vec();
            let ids = self
                .retrying("touch swept tasks", || async {
                    let batch = batch.clone();
                    self.transact(move |txn| {
                        Box::pin(async move {
                            let now = Utc::now();
                            let mut ids = Vec::new();
                            for (id, version) in batch {
                                let result = task::Entity::update_many()
                                    .col_expr(task::Column::UpdatedAt, Expr::value(now))
                                    .col_expr(
                                        task::Column::Version,
                                        Expr::col(task::Column::Version).add(1),
                                    )
                                    .filter(task::Column::Id.eq(id))
                                    .filter(task::Column::Version.eq(version))
                                    .exec(txn)
                                    .await?;
                                if result.rows_affected == 1 {
                                    ids.push(id);
                                }
                            }
                            Ok(ids)
                        })
                    })
                    .await
                })
                .await?;
            touched.extend(ids);
        }
        Ok(touched)
    }

    /// The jobs with these ids, by id; an id without a job is left out.
    pub(crate) async fn jobs_by_id(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, job::Model>, StoreError> {
        self.retrying("read jobs", || async {
            let jobs = job::Entity::find()
                .filter(job::Column::Id.is_in(ids.iter().cloned()))
                .all(&self.db)
                .await?;
            Ok(jobs.into_iter().map(|job| (job.id.clone(), job)).collect())
        })
        .await
    }

    /// Running jobs, quiet since `quiet_since`, whose counters say they are over: the
    /// finished event that should have ended them was lost.
    pub async fn jobs_due_for_check(
        &self,
        quiet_since: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        self.retrying("scan jobs due for a check", || async {
            let over = Condition::any().add(job::Column::FailedCount.gt(0)).add(
                Expr::col(job::Column::DoneCount)
                    .add(Expr::col(job::Column::FailedCount))
                    .add(Expr::col(job::Column::CancelledCount))
                    .gte(Expr::col(job::Column::TaskCount)),
            );
            Ok(job::Entity::find()
                .select_only()
                .column(job::Column::Id)
                .filter(job::Column::Stage.eq(JobStage::Running.as_str()))
                .filter(job::Column::UpdatedAt.lt(quiet_since))
                .filter(over)
                .limit(1000)
                .into_tuple()
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// The pools (queues) of running jobs.
    pub async fn running_pools(&self) -> Result<Vec<String>, StoreError> {
        self.retrying("list running pools", || async {
            Ok(job::Entity::find()
                .select_only()
                .column(job::Column::Queue)
                .distinct()
                .filter(job::Column::Stage.eq(JobStage::Running.as_str()))
                .into_tuple()
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Jobs still in `formation` that have not moved since `quiet_since`: created
    /// then, or (sent in parts) given their last part or seal then.
    pub async fn stale_formations(
        &self,
        quiet_since: DateTime<Utc>,
    ) -> Result<Vec<job::Model>, StoreError> {
        self.retrying("scan stale formations", || async {
            Ok(job::Entity::find()
                .filter(job::Column::Stage.eq(JobStage::Formation.as_str()))
                .filter(job::Column::UpdatedAt.lt(quiet_since))
                .order_by_asc(job::Column::UpdatedAt)
                .limit(1000)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Fails a job stuck in `formation` (its request was lost mid-way), so that its
    /// producer hears back instead of waiting forever. `None`: it left formation.
    pub async fn fail_formation(
        &self,
        job_id: &str,
        reason: &str,
    ) -> Result<Option<job_event::Model>, StoreError> {
        self.end_job_at(job_id, JobStage::Formation, JobStage::Failed, reason)
            .await
    }
}
