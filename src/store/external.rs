//! External tasks' rows (see [`crate::external`]): the hand-off recorded in the task's
//! row, the syncer's scan of due tasks, and the syncer's writes.
//!
//! Every syncer write is a compare-and-set on what the syncer read before it asked the
//! backend ([`Seen`]): the same attempt of the same run, handed off as the same
//! external id, and an update id that only rises. An answer that took long — from a
//! syncer that lost its lease meanwhile, or about a hand-off that a retry replaced —
//! then changes nothing.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect, UpdateMany,
};

use super::error::StoreError;
use super::handle::Store;
use super::rows::{TaskOutcome, Transition};
use super::tasks::{finish_in, lock_live_jobs};
use crate::state::TaskStatus;
use entity::{job, task};

/// What the syncer read of an external task before asking its backend: its write
/// changes the row only if the row still says so.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    /// The external task's id.
    pub task_id: i64,
    /// Its job.
    pub job_id: String,
    /// The attempt handed off.
    pub attempt: i32,
    /// The job's run of that attempt.
    pub run: i32,
    /// The backend's id for it.
    pub external_id: String,
    /// The highest update id applied so far.
    pub update_id: Option<i64>,
}

impl Seen {
    /// What `task`'s row says now.
    pub fn of(task: &task::Model) -> Self {
        Self {
            task_id: task.id,
            job_id: task.job_id.clone(),
            attempt: task.attempts,
            run: task.run,
            external_id: task.external_id.clone().unwrap_or_default(),
            update_id: task.external_update_id,
        }
    }
}

/// What the syncer decided for one external task it polled, and what it read first.
#[derive(Clone, Debug)]
pub struct SyncWrite {
    /// The row as read before the backend was asked.
    pub seen: Seen,
    /// What changes.
    pub change: SyncChange,
}

/// The change a [`SyncWrite`] makes.
#[derive(Clone, Debug)]
pub enum SyncChange {
    /// The backend answered with an error, a stale or an equal update id, or did not
    /// answer: only the poll and the next sync time move.
    Polled {
        /// When to ask again.
        next_sync_at: DateTime<Utc>,
    },
    /// It moved: a higher update id, still running.
    Progressed {
        /// The update id reported.
        update_id: i64,
        /// When to ask again.
        next_sync_at: DateTime<Utc>,
    },
    /// Its attempt ended (done, failed, or failed and to be retried), at this update id
    /// (none when it timed out without progress): it leaves the backend's care.
    Ended {
        /// How.
        outcome: TaskOutcome,
        /// The update id reported.
        update_id: Option<i64>,
    },
}

impl SyncWrite {
    /// The attempt's transition, for a write that ends it.
    pub fn transition(&self) -> Option<Transition> {
        let SyncChange::Ended { outcome, .. } = &self.change else {
            return None;
        };
        Some(Transition {
            job_id: self.seen.job_id.clone(),
            task_id: self.seen.task_id,
            attempt: self.seen.attempt,
            run: self.seen.run,
            outcome: outcome.clone(),
        })
    }

    /// The UPDATE of the task's sync columns, conditional on [`Self::seen`].
    fn update(&self, now: DateTime<Utc>) -> UpdateMany<task::Entity> {
        let seen = &self.seen;
        let rises_to = |update_id: i64| {
            Condition::any()
                .add(task::Column::ExternalUpdateId.is_null())
                .add(task::Column::ExternalUpdateId.lt(update_id))
        };
        let update = task::Entity::update_many();
        let update = match &self.change {
            SyncChange::Polled { next_sync_at } => {
                update.col_expr(task::Column::NextSyncAt, Expr::value(*next_sync_at))
            }
            SyncChange::Progressed {
                update_id,
                next_sync_at,
            } => update
                .col_expr(task::Column::NextSyncAt, Expr::value(*next_sync_at))
                .col_expr(task::Column::ExternalUpdateId, Expr::value(*update_id))
                .col_expr(task::Column::LastProgressAt, Expr::value(now))
                .filter(rises_to(*update_id)),
            SyncChange::Ended { update_id, .. } => {
                let update = update.col_expr(
                    task::Column::NextSyncAt,
                    Expr::value(Option::<DateTime<Utc>>::None),
                );
                match (update_id, seen.update_id) {
                    (Some(update_id), _) => update
                        .col_expr(task::Column::ExternalUpdateId, Expr::value(*update_id))
                        .filter(rises_to(*update_id)),
                    // No progress: only if none came meanwhile.
                    (None, Some(stored)) => {
                        update.filter(task::Column::ExternalUpdateId.eq(stored))
                    }
                    (None, None) => update.filter(task::Column::ExternalUpdateId.is_null()),
                }
            }
        };
        update
            .col_expr(task::Column::LastPollAt, Expr::value(now))
            .filter(task::Column::Id.eq(seen.task_id))
            .filter(task::Column::Status.eq(TaskStatus::Running.as_str()))
            .filter(task::Column::Attempts.eq(seen.attempt))
            .filter(task::Column::ExternalAttempt.eq(seen.attempt))
            .filter(task::Column::Run.eq(seen.run))
            .filter(task::Column::ExternalId.eq(seen.external_id.as_str()))
    }
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

    /// Up to `limit` external tasks due for a sync at `now`, soonest first, with their
    /// jobs, leaving out those of the backends in `skip` (a call still running, or
    /// backing off). A task polled without an end moves its next sync time on, so
    /// every due task gets its turn however many there are.
    pub async fn due_external_tasks(
        &self,
        now: DateTime<Utc>,
        skip: &[String],
        limit: u64,
    ) -> Result<Vec<(task::Model, job::Model)>, StoreError> {
        self.retrying("scan due external tasks", || async {
            let mut skipped = Condition::all();
            if !skip.is_empty() {
                skipped =
                    skipped.add(task::Column::ExternalBackend.is_not_in(skip.iter().cloned()));
            }
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
                .filter(skipped)
                .order_by_asc(task::Column::NextSyncAt)
                .order_by_asc(task::Column::Id)
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
    /// transaction, each only if the row is still as its [`Seen`] says: polls and
    /// progress move the sync times; ended attempts are recorded as a worker records
    /// them (and counted into their jobs), and leave the syncer's scan. Returns the ids
    /// of the attempts it ended; a write whose row moved meanwhile changes nothing.
    pub async fn apply_sync(&self, writes: &[SyncWrite]) -> Result<HashSet<i64>, StoreError> {
        let mut job_ids: Vec<String> = writes
            .iter()
            .filter_map(|write| write.transition().map(|t| t.job_id))
            .collect();
        job_ids.sort();
        job_ids.dedup();
        self.retrying("apply sync", || {
            let (store, writes, job_ids) = (self.clone(), writes.to_vec(), job_ids.clone());
            self.transact(move |txn| {
                Box::pin(async move {
                    // The jobs first, as every transaction that changes a job locks
                    // them, so that a cancel racing this write queues up instead of
                    // deadlocking.
                    if !job_ids.is_empty() {
                        lock_live_jobs(txn, &job_ids).await?;
                    }
                    let now = Utc::now();
                    let mut ended = Vec::new();
                    for write in &writes {
                        let changed = write.update(now).exec(txn).await?.rows_affected == 1;
                        if let (true, Some(transition)) = (changed, write.transition()) {
                            ended.push(transition);
                        }
                    }
                    let (recorded, _) = finish_in(txn, &store.finishing(&ended)).await?;
                    Ok(recorded)
                })
            })
        })
        .await
    }
}
