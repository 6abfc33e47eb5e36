//! External tasks' rows (see [`crate::external`]): the hand-off recorded in the task's
//! row, the syncer's scan of due tasks, and the syncer's writes.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Func};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};

use super::error::StoreError;
use super::handle::Store;
use super::rows::Transition;
use super::tasks::finish_in;
use crate::state::TaskStatus;
use entity::{job, task};

/// What the syncer decided for one external task it polled.
#[derive(Clone, Debug)]
pub enum SyncWrite {
    /// The backend answered (with an error, a stale or an equal update id): only the
    /// poll and the next sync time move.
    Polled {
        /// The task.
        task_id: i64,
        /// When to ask again.
        next_sync_at: DateTime<Utc>,
    },
    /// It moved: a higher update id, still running.
    Progressed {
        /// The task.
        task_id: i64,
        /// The update id reported.
        update_id: i64,
        /// When to ask again.
        next_sync_at: DateTime<Utc>,
    },
    /// Its attempt ended (done, failed, or failed and to be retried), at this update id
    /// (none when it timed out without progress): it leaves the backend's care.
    Ended(Transition, Option<i64>),
}

impl Store {
    /// Records that attempt `attempt` of run `run` of the task was handed to `backend`
    /// as `external_id`: the task stays `running`, without a lease (the syncer watches
    /// it instead), due for its first sync now. `false`: the attempt is no longer
    /// running (a duplicate, a cancelled task, a task a later run reset).
    pub async fn record_hand_off(
        &self,
        task_id: i64,
        (attempt, run): (i32, i32),
        backend: &str,
        external_id: &str,
    ) -> Result<bool, StoreError> {
        self.retrying("record hand-off", || async {
            let now = Utc::now();
            let recorded = task::Entity::update_many()
                .col_expr(task::Column::ExternalBackend, Expr::value(backend))
                .col_expr(task::Column::ExternalId, Expr::value(external_id))
                .col_expr(task::Column::ExternalAttempt, Expr::value(attempt))
                .col_expr(
                    task::Column::ExternalUpdateId,
                    Expr::value(Option::<i64>::None),
                )
                .col_expr(task::Column::NextSyncAt, Expr::value(now))
                .col_expr(
                    task::Column::LastPollAt,
                    Expr::value(Option::<DateTime<Utc>>::None),
                )
                .col_expr(task::Column::LastProgressAt, Expr::value(now))
                .col_expr(
                    task::Column::LeaseUntil,
                    Expr::value(Option::<DateTime<Utc>>::None),
                )
                .col_expr(
                    task::Column::Version,
                    Expr::col(task::Column::Version).add(1),
                )
                .col_expr(task::Column::UpdatedAt, Expr::value(now))
                .filter(task::Column::Id.eq(task_id))
                .filter(task::Column::Status.eq(TaskStatus::Running.as_str()))
                .filter(task::Column::Attempts.eq(attempt))
                .filter(task::Column::Run.lte(run))
                .exec(&self.db)
                .await?;
            Ok(recorded.rows_affected == 1)
        })
        .await
    }

    /// Up to `limit` external tasks of shard `shard` (of `shards`, by id modulo) due for
    /// a sync at `now`, soonest first, with their jobs.
    pub async fn due_external_tasks(
        &self,
        shard: u32,
        shards: u32,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<(task::Model, job::Model)>, StoreError> {
        self.retrying("scan due external tasks", || async {
            let due = task::Entity::find()
                .find_also_related(job::Entity)
                .filter(task::Column::NextSyncAt.lte(now))
                .filter(task::Column::Status.eq(TaskStatus::Running.as_str()))
                .filter(
                    Condition::all().add(
                        Expr::col((task::Entity, task::Column::ExternalAttempt))
                            .eq(Expr::col((task::Entity, task::Column::Attempts))),
                    ),
                )
                .filter(
                    Expr::col((task::Entity, task::Column::Id))
                        .modulo(i64::from(shards))
                        .eq(i64::from(shard)),
                )
                .order_by_asc(task::Column::NextSyncAt)
                .limit(limit)
                .all(&self.db)
                .await?;
            Ok(due
                .into_iter()
                .filter_map(|(task, job)| job.map(|job| (task, job)))
                .collect())
        })
        .await
    }

    /// Writes one batch of the syncer's decisions (at most 25, the caller's rule) in one
    /// transaction: polls and progress move the sync times; ended attempts are
    /// recorded as a worker records them (and counted into their jobs), and leave the
    /// syncer's scan. Every write names the attempt it expects, so a task that moved
    /// meanwhile (cancelled, say) is left alone. Returns the ids of the attempts it
    /// ended.
    pub async fn apply_sync(
        &self,
        writes: &[SyncWrite],
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        let ended: Vec<Transition> = writes
            .iter()
            .filter_map(|write| match write {
                SyncWrite::Ended(transition, _) => Some(transition.clone()),
                _ => None,
            })
            .collect();
        let finishing = self.finishing(&ended);
        self.retrying("apply sync", || async {
            let (writes, finishing) = (writes.to_vec(), finishing.clone());
            Ok(self
                .db
                .transaction::<_, _, StoreError>(move |txn| {
                    Box::pin(async move {
                        let now = Utc::now();
                        for write in &writes {
                            let (task_id, update) = match write {
                                SyncWrite::Polled {
                                    task_id,
                                    next_sync_at,
                                } => (
                                    *task_id,
                                    task::Entity::update_many().col_expr(
                                        task::Column::NextSyncAt,
                                        Expr::value(*next_sync_at),
                                    ),
                                ),
                                SyncWrite::Progressed {
                                    task_id,
                                    update_id,
                                    next_sync_at,
                                } => (
                                    *task_id,
                                    task::Entity::update_many()
                                        .col_expr(
                                            task::Column::NextSyncAt,
                                            Expr::value(*next_sync_at),
                                        )
                                        .col_expr(
                                            task::Column::ExternalUpdateId,
                                            Expr::value(*update_id),
                                        )
                                        .col_expr(task::Column::LastProgressAt, Expr::value(now)),
                                ),
                                SyncWrite::Ended(transition, update_id) => (
                                    transition.task_id,
                                    task::Entity::update_many()
                                        .col_expr(
                                            task::Column::NextSyncAt,
                                            Expr::value(Option::<DateTime<Utc>>::None),
                                        )
                                        .col_expr(
                                            task::Column::ExternalUpdateId,
                                            Func::coalesce([
                                                Expr::value(*update_id),
                                                Expr::col(task::Column::ExternalUpdateId),
                                            ])
                                            .into(),
                                        ),
                                ),
                            };
                            update
                                .col_expr(task::Column::LastPollAt, Expr::value(now))
                                .filter(task::Column::Id.eq(task_id))
                                .filter(task::Column::Status.eq(TaskStatus::Running.as_str()))
                                .filter(
                                    Expr::col(task::Column::ExternalAttempt)
                                        .eq(Expr::col(task::Column::Attempts)),
                                )
                                .exec(txn)
                                .await?;
                        }
                        finish_in(txn, &finishing).await
                    })
                })
                .await?)
        })
        .await
    }
}
