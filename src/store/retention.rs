//! Removing ended jobs with all their rows once they are past their retention: the
//! statements under the cleaner and `taskmill prune`.
//!
//! A job may leave when it has ended (`done`, `failed` or `cancelled`) before its
//! stage's cut-off and its event has been delivered: published, with no try at its
//! `on_complete` target still to come. Nothing else is ever removed, whatever its
//! age: a running, forming or retried job is not ended.
//!
//! Each step is short, so that it never holds for long a lock a claim or a finish
//! waits on (SQLite's one writer lock, above all). Jobs with few tasks leave whole, a
//! batch of them per transaction. A job with more tasks than one transaction removes
//! is first marked (`removal_started_at`, in a transaction of its own, under the same
//! conditions), then loses its tasks a batch per transaction, then its other rows: a
//! removal cut off half-way is carried on by the next step, whoever takes it, and a
//! marked job can no longer be retried.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DatabaseBackend,
    DatabaseTransaction, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect,
};

use super::error::StoreError;
use super::handle::Store;
use super::pg_batch::one_of;
use crate::state::JobStage;
use entity::{job, job_event, job_part, removed_job, task};

/// Which ended jobs may leave: those that ended in one of these stages before its
/// cut-off (and whose event was delivered).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemovalRule {
    ended_before: Vec<(JobStage, DateTime<Utc>)>,
    /// On PostgreSQL, jobs leave one by one only if created before this (their
    /// partition is held by a job that cannot leave); the others wait to leave with
    /// their partition. `None`: one by one, whenever they may leave.
    one_by_one_created_before: Option<DateTime<Utc>>,
    /// On PostgreSQL, the partitions that ended before this may go.
    partitions_ending_before: Option<DateTime<Utc>>,
    /// On PostgreSQL, an ended job in a partition that is due, which this rule will let
    /// go within this time, holds the partition: its tasks are not moved aside.
    holds_within: chrono::Duration,
}

impl RemovalRule {
    /// No job may leave, until [`Self::with`] adds a stage.
    pub fn none() -> Self {
        Self::default()
    }

    /// The rule, also letting jobs that ended in `stage` before `cut_off` leave. A stage
    /// that is not terminal is ignored: only ended jobs ever leave.
    pub fn with(mut self, stage: JobStage, cut_off: DateTime<Utc>) -> Self {
        if stage.is_terminal() {
            self.ended_before.retain(|(kept, _)| *kept != stage);
            self.ended_before.push((stage, cut_off));
        }
        self
    }

    /// The rule narrowed to jobs that ended in `stage`, one by one: no partition
    /// goes, since the jobs of other stages in it stay.
    pub fn only(mut self, stage: JobStage) -> Self {
        self.ended_before.retain(|(kept, _)| *kept == stage);
        self.partitions_ending_before = None;
        self.one_by_one_created_before = None;
        self
    }

    /// The rule, on PostgreSQL, dropping the task partitions that ended before
    /// `ending_before` (once their jobs may leave), and removing one by one only the
    /// jobs created before `one_by_one_before`; no bound on SQLite, which has no
    /// partitions.
    pub fn by_partition(
        mut self,
        ending_before: DateTime<Utc>,
        one_by_one_before: Option<DateTime<Utc>>,
    ) -> Self {
        self.partitions_ending_before = Some(ending_before);
        self.one_by_one_created_before = one_by_one_before;
        self
    }

    /// The rule, letting a due partition wait for the ended jobs in it that it lets go
    /// within `within` (those that ran late in its span, say), instead of moving
    /// their tasks aside: a move writes every row twice, waiting writes nothing.
    pub fn holding_within(mut self, within: chrono::Duration) -> Self {
        self.holds_within = within;
        self
    }

    /// Which jobs it lets go within its hold time.
    pub(super) fn leaves_soon(&self) -> Condition {
        let later = Self {
            ended_before: (self.ended_before.iter())
                .map(|(stage, cut_off)| {
                    let later = cut_off.checked_add_signed(self.holds_within);
                    (*stage, later.unwrap_or(DateTime::<Utc>::MAX_UTC))
                })
                .collect(),
            ..Self::default()
        };
        later.leaves()
    }

    /// Whether no job may leave under it.
    pub fn is_empty(&self) -> bool {
        self.ended_before.is_empty()
    }

    pub(super) fn partitions_ending_before(&self) -> Option<DateTime<Utc>> {
        self.partitions_ending_before
    }

    /// The condition on `jobs` rows the per-job removal takes: [`Self::leaves`], and on
    /// PostgreSQL created before the one-by-one bound.
    fn condition(&self, backend: DatabaseBackend) -> Condition {
        let leaves = self.leaves();
        match self.one_by_one_created_before {
            Some(before) if backend == DatabaseBackend::Postgres => {
                leaves.add(job::Column::CreatedAt.lt(before))
            }
            _ => leaves,
        }
    }

    /// The condition on `jobs` rows that may leave: ended before the cut-off, event
    /// delivered, and not being removed already.
    pub(super) fn leaves(&self) -> Condition {
        let mut ended = Condition::any();
        for (stage, cut_off) in &self.ended_before {
            ended = ended.add(
                Condition::all()
                    .add(job::Column::Stage.eq(stage.as_str()))
                    .add(job::Column::FinishedAt.lt(*cut_off)),
            );
        }
        let undelivered = Query::select()
            .expr(Expr::val(1))
            .from(job_event::Entity)
            .and_where(
                Expr::col((job_event::Entity, job_event::Column::JobId))
                    .equals((job::Entity, job::Column::Id)),
            )
            .cond_where(
                Condition::any()
                    .add(Expr::col((job_event::Entity, job_event::Column::PublishedAt)).is_null())
                    .add(
                        Expr::col((job_event::Entity, job_event::Column::TargetRetryAt))
                            .is_not_null(),
                    ),
            )
            .to_owned();
        Condition::all()
            .add(ended)
            .add(job::Column::RemovalStartedAt.is_null())
            .add(Expr::exists(undelivered).not())
    }
}

/// What one step of removal did, or would do (`taskmill prune --dry-run`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Jobs whose every row is gone.
    pub jobs: u64,
    /// Task rows deleted.
    pub tasks: u64,
}

impl Removed {
    /// Whether the step removed nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Adds `other` to it.
    pub fn add(&mut self, other: Removed) {
        self.jobs += other.jobs;
        self.tasks += other.tasks;
    }
}

#[derive(FromQueryResult)]
struct Candidate {
    id: String,
    task_count: i64,
}

impl Candidate {
    fn tasks(&self) -> u64 {
        u64::try_from(self.task_count).unwrap_or(0)
    }
}

#[derive(Clone)]
struct Marked {
    id: String,
    stage: String,
}

/// Jobs looked at per step when choosing which leave together.
const CANDIDATES: u64 = 500;

impl Store {
    /// One step of removal under `rule`, deleting at most about `task_batch` task rows
    /// in one transaction: it carries on a removal begun earlier, or removes whole
    /// the oldest removable jobs whose tasks fit the batch together, or marks the
    /// oldest (too big for one) for removal in batches. `None`: nothing is left to
    /// remove under the rule, right now.
    pub async fn remove_ended_step(
        &self,
        rule: &RemovalRule,
        task_batch: u64,
    ) -> Result<Option<Removed>, StoreError> {
        let task_batch = std::cmp::max(task_batch, 1);
        if let Some(job_id) = self.removal_under_way().await? {
            return self.continue_removal(job_id, task_batch).await.map(Some);
        }
        if let Some(step) = self.partition_step(rule).await? {
            return Ok(Some(step));
        }
        if rule.is_empty() {
            return Ok(None);
        }
        let candidates = self.removable(rule, CANDIDATES).await?;
        let Some(first) = candidates.first() else {
            return Ok(None);
        };
        if first.tasks() > task_batch {
            // Too big for one transaction: marked now, its rows go in the next steps.
            self.mark_for_removal(rule, vec![first.id.clone()], false)
                .await?;
            return Ok(Some(Removed::default()));
        }
        let mut tasks = 0;
        let together: Vec<String> = candidates
            .iter()
            .take_while(|job| {
                tasks += job.tasks();
                tasks <= task_batch
            })
            .map(|job| job.id.clone())
            .collect();
        self.mark_for_removal(rule, together, true).await.map(Some)
    }

    /// What a removal under `rule` would remove now: the jobs, and their tasks as
    /// their rows count them.
    pub async fn removable_now(&self, rule: &RemovalRule) -> Result<Removed, StoreError> {
        if rule.is_empty() {
            return Ok(Removed::default());
        }
        #[derive(FromQueryResult)]
        struct Totals {
            jobs: i64,
            tasks: Option<i64>,
        }
        self.retrying("count removable jobs", || async {
            let totals = job::Entity::find()
                .select_only()
                .expr_as(Expr::col(job::Column::Id).count(), "jobs")
                .expr_as(Expr::cust("CAST(SUM(task_count) AS BIGINT)"), "tasks")
                .filter(rule.leaves())
                .into_model::<Totals>()
                .one(&self.db)
                .await?;
            Ok(totals.map_or_else(Removed::default, |totals| Removed {
                jobs: totals.jobs as u64,
                tasks: totals.tasks.unwrap_or(0) as u64,
            }))
        })
        .await
    }

    /// How many jobs and tasks have been removed, per stage they ended in.
    pub async fn removed_totals(&self) -> Result<Vec<removed_job::Model>, StoreError> {
        self.retrying("read removal totals", || async {
            Ok(removed_job::Entity::find()
                .order_by_asc(removed_job::Column::Stage)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// The removable jobs, oldest ended first.
    async fn removable(
        &self,
        rule: &RemovalRule,
        limit: u64,
    ) -> Result<Vec<Candidate>, StoreError> {
        self.retrying("list removable jobs", || async {
            Ok(job::Entity::find()
                .select_only()
                .columns([job::Column::Id, job::Column::TaskCount])
                .filter(rule.condition(self.backend()))
                .order_by_asc(job::Column::FinishedAt)
                .limit(limit)
                .into_model::<Candidate>()
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// A job whose removal began and was not finished.
    async fn removal_under_way(&self) -> Result<Option<String>, StoreError> {
        self.retrying("find a removal under way", || async {
            Ok(job::Entity::find()
                .select_only()
                .column(job::Column::Id)
                .filter(job::Column::RemovalStartedAt.is_not_null())
                .limit(1)
                .into_tuple::<String>()
                .one(&self.db)
                .await?)
        })
        .await
    }

    /// Marks those of `job_ids` that the rule still lets go (the mark is the lock:
    /// on PostgreSQL a retry waiting for the row finds it gone or marked). With
    /// `whole`, removes them at once in the same transaction; without, leaves them
    /// marked for [`Self::continue_removal`].
    async fn mark_for_removal(
        &self,
        rule: &RemovalRule,
        job_ids: Vec<String>,
        whole: bool,
    ) -> Result<Removed, StoreError> {
        let backend = self.backend();
        self.retrying("remove ended jobs", || async {
            let (rule, job_ids) = (rule.clone(), job_ids.clone());
            self.transact(move |txn| {
                Box::pin(async move {
                    let marked: Vec<Marked> = job::Entity::update_many()
                        .col_expr(job::Column::RemovalStartedAt, Expr::value(Utc::now()))
                        .filter(one_of(backend, job::Column::Id, job_ids))
                        .filter(rule.condition(backend))
                        .exec_with_returning(txn)
                        .await?
                        .into_iter()
                        .map(|job| Marked {
                            id: job.id,
                            stage: job.stage,
                        })
                        .collect();
                    if !whole || marked.is_empty() {
                        return Ok(Removed::default());
                    }
                    let mut tasks = Vec::new();
                    for stage in stages_of(&marked) {
                        let jobs: Vec<Marked> = marked
                            .iter()
                            .filter(|job| job.stage == stage)
                            .cloned()
                            .collect();
                        tasks.push((stage, delete_tasks(txn, &jobs, None).await?));
                    }
                    delete_jobs(txn, &marked, &tasks).await
                })
            })
            .await
        })
        .await
    }

    /// Deletes up to `task_batch` tasks of marked job `job_id`; once it has none
    /// left, the job's other rows.
    async fn continue_removal(
        &self,
        job_id: String,
        task_batch: u64,
    ) -> Result<Removed, StoreError> {
        self.retrying("continue a removal", || async {
            let job_id = job_id.clone();
            self.transact(move |txn| {
                Box::pin(async move {
                    // A write first: on SQLite a transaction that reads before it
                    // writes fails at its first write if the pipeline wrote meanwhile,
                    // which under load is nearly always, and the removal then crawls
                    // from retry to retry.
                    let Some(job) = job::Entity::update_many()
                        .col_expr(
                            job::Column::RemovalStartedAt,
                            Expr::col(job::Column::RemovalStartedAt),
                        )
                        .filter(job::Column::Id.eq(job_id.as_str()))
                        .filter(job::Column::RemovalStartedAt.is_not_null())
                        .exec_with_returning(txn)
                        .await?
                        .into_iter()
                        .next()
                    else {
                        return Ok(Removed::default());
                    };
                    let marked = [Marked {
                        id: job_id,
                        stage: job.stage,
                    }];
                    let tasks = delete_tasks(txn, &marked, Some(task_batch)).await?;
                    if has_tasks(txn, &marked[0].id).await? {
                        add_to_totals(txn, &marked[0].stage, 0, tasks).await?;
                        return Ok(Removed { jobs: 0, tasks });
                    }
                    let tasks = [(marked[0].stage.clone(), tasks)];
                    delete_jobs(txn, &marked, &tasks).await
                })
            })
            .await
        })
        .await
    }
}

/// Deletes the tasks of `jobs`: all of them, or at most `limit`; how many it deleted.
async fn delete_tasks(
    txn: &DatabaseTransaction,
    jobs: &[Marked],
    limit: Option<u64>,
) -> Result<u64, StoreError> {
    let backend = txn.get_database_backend();
    let ids: Vec<String> = jobs.iter().map(|job| job.id.clone()).collect();
    let delete = task::Entity::delete_many();
    let delete = match (limit, jobs) {
        (Some(limit), [job]) => {
            // A range of the (job_id, ordinal) index from the lowest ordinal left:
            // `id IN (… LIMIT n)` is planned, on the partitioned table, as a scan of
            // every partition for each batch.
            let lowest: Option<Option<i32>> = task::Entity::find()
                .select_only()
                .expr(task::Column::Ordinal.min())
                .filter(task::Column::JobId.eq(job.id.as_str()))
                .into_tuple()
                .one(txn)
                .await?;
            let Some(Some(lowest)) = lowest else {
                return Ok(0);
            };
            let end = i64::from(lowest).saturating_add(limit as i64);
            delete
                .filter(task::Column::JobId.eq(job.id.as_str()))
                .filter(task::Column::Ordinal.gte(lowest))
                .filter(task::Column::Ordinal.lt(std::cmp::min(end, i64::from(i32::MAX))))
        }
        _ => delete.filter(one_of(backend, task::Column::JobId, ids)),
    };
    Ok(delete.exec(txn).await?.rows_affected)
}

/// Whether `job_id` has a task row left.
async fn has_tasks(txn: &DatabaseTransaction, job_id: &str) -> Result<bool, StoreError> {
    Ok(task::Entity::find()
        .select_only()
        .column(task::Column::Id)
        .filter(task::Column::JobId.eq(job_id))
        .limit(1)
        .into_tuple::<i64>()
        .one(txn)
        .await?
        .is_some())
}

/// The stages `jobs` ended in, each once.
fn stages_of(jobs: &[Marked]) -> std::collections::BTreeSet<String> {
    jobs.iter().map(|job| job.stage.clone()).collect()
}

/// Deletes the rows of `jobs` other than their tasks (already gone), and counts them
/// in the totals, with the tasks deleted of each stage's jobs.
async fn delete_jobs(
    txn: &DatabaseTransaction,
    jobs: &[Marked],
    tasks: &[(String, u64)],
) -> Result<Removed, StoreError> {
    let backend = txn.get_database_backend();
    let ids: Vec<String> = jobs.iter().map(|job| job.id.clone()).collect();
    job_part::Entity::delete_many()
        .filter(one_of(backend, job_part::Column::JobId, ids.clone()))
        .exec(txn)
        .await?;
    job_event::Entity::delete_many()
        .filter(one_of(backend, job_event::Column::JobId, ids.clone()))
        .exec(txn)
        .await?;
    job::Entity::delete_many()
        .filter(one_of(backend, job::Column::Id, ids))
        .exec(txn)
        .await?;
    for (stage, tasks) in tasks {
        let count = jobs.iter().filter(|job| &job.stage == stage).count() as u64;
        add_to_totals(txn, stage, count, *tasks).await?;
    }
    Ok(Removed {
        jobs: jobs.len() as u64,
        tasks: tasks.iter().map(|(_, tasks)| tasks).sum(),
    })
}

/// Adds `jobs` and `tasks` to the removal totals of `stage`.
pub(super) async fn add_to_totals(
    txn: &DatabaseTransaction,
    stage: &str,
    jobs: u64,
    tasks: u64,
) -> Result<(), StoreError> {
    let now = Utc::now();
    removed_job::Entity::insert(removed_job::ActiveModel {
        stage: Set(stage.to_owned()),
        jobs: Set(jobs as i64),
        tasks: Set(tasks as i64),
        last_removed_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(removed_job::Column::Stage)
            .value(
                removed_job::Column::Jobs,
                Expr::col((removed_job::Entity, removed_job::Column::Jobs)).add(jobs as i64),
            )
            .value(
                removed_job::Column::Tasks,
                Expr::col((removed_job::Entity, removed_job::Column::Tasks)).add(tasks as i64),
            )
            .update_column(removed_job::Column::LastRemovedAt)
            .to_owned(),
    )
    .exec_without_returning(txn)
    .await?;
    Ok(())
}
