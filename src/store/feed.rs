//! What a feeder reads: a job's task rows in ordinal pages, and the jobs whose task
//! messages nobody is publishing.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::error::StoreError;
use super::handle::Store;
use crate::state::{JobStage, TaskStatus};
use entity::{job, lease, task};

/// Jobs handed to a feeder per scan at most.
const ORPHANS_PER_SCAN: u64 = 100;

impl Store {
    /// The job's tasks with ordinals in `after..=through`, in ordinal order: while the
    /// job is forming every row there (so that the feeder can see which ordinals are
    /// stored yet), once it runs only tasks never claimed. The range, not a LIMIT,
    /// bounds the read: planned from statistics older than the job, a LIMIT query
    /// became a bitmap scan of all the job's remaining rows, sorted, per page.
    pub(crate) async fn feed_page(
        &self,
        job_id: &str,
        after: i32,
        through: i32,
        forming: bool,
    ) -> Result<Vec<task::Model>, StoreError> {
        self.retrying("read tasks to feed", || async {
            let mut page = task::Entity::find()
                .filter(task::Column::JobId.eq(job_id))
                .filter(task::Column::Ordinal.gt(after))
                .filter(task::Column::Ordinal.lte(through));
            if !forming {
                page = page
                    .filter(task::Column::Status.eq(TaskStatus::Pending.as_str()))
                    .filter(task::Column::Attempts.eq(0));
            }
            Ok(page
                .order_by_asc(task::Column::Ordinal)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Records that a feeder published (and the broker confirmed) the task messages of
    /// the job's phase starting at `phase_first_ordinal` through ordinal `through`, so
    /// that the job's next feeder starts after it. A job that moved to another phase
    /// meanwhile is left alone, and the mark never goes back.
    pub(crate) async fn record_fed(
        &self,
        job_id: &str,
        phase_first_ordinal: i64,
        through: i64,
    ) -> Result<(), StoreError> {
        self.retrying("record feed progress", || async {
            job::Entity::update_many()
                .col_expr(job::Column::FedThrough, Expr::value(through))
                .filter(job::Column::Id.eq(job_id))
                .filter(job::Column::PhaseFirstOrdinal.eq(phase_first_ordinal))
                .filter(job::Column::FedThrough.lt(through))
                .exec(&self.db)
                .await?;
            Ok(())
        })
        .await
    }

    /// Running jobs started before `started_before` whose task messages are not all
    /// published and whose feed lease is not live: their feeder stopped (a crash, a
    /// lost connection, a shutdown) and another one should carry on. The oldest
    /// first, and never the jobs being fed, so that however many jobs are being fed
    /// (or wait on an idle pool), every orphan is found within a few scans.
    pub(crate) async fn unfed_jobs(
        &self,
        started_before: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        self.retrying("find unfed jobs", || async {
            Ok(job::Entity::find()
                .select_only()
                .column(job::Column::Id)
                .filter(job::Column::Stage.eq(JobStage::Running.as_str()))
                .filter(job::Column::TasksPublished.eq(false))
                .filter(job::Column::StartedAt.lt(started_before))
                .filter(
                    Expr::exists(
                        Query::select()
                            .expr(Expr::val(1))
                            .from(lease::Entity)
                            .and_where(
                                Expr::col((lease::Entity, lease::Column::Name))
                                    .eq(Expr::cust(r#"'feed:' || "jobs"."id""#)),
                            )
                            .and_where(
                                Expr::col((lease::Entity, lease::Column::Until)).gt(Utc::now()),
                            )
                            .to_owned(),
                    )
                    .not(),
                )
                .order_by_asc(job::Column::StartedAt)
                .limit(ORPHANS_PER_SCAN)
                .into_tuple()
                .all(&self.db)
                .await?)
        })
        .await
    }
}
