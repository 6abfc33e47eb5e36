//! Job rows: creation (idempotent on the job id), task-row insertion, the move from
//! `formation` to `running`, and read-only views for status and tests.

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseBackend, EntityTrait, FromQueryResult,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait, TransactionTrait,
};

use super::error::StoreError;
use super::handle::Store;
use super::job_ends::{self, count_by_status, lock_job};
use super::pg_batch;
use super::rows::{JobStatus, NewJob, NewTask, Progress, StartOutcome};
use crate::state::{JobStage, TaskStatus};
use entity::{job, task};

#[derive(FromQueryResult)]
struct CountAndFirst {
    count: i64,
    first: Option<i64>,
}

impl Store {
    /// Inserts the job in `formation`. Returns `None` when it was created, or the
    /// existing row when a job with this id exists (a duplicate request).
    pub async fn create_job(&self, new: &NewJob) -> Result<Option<job::Model>, StoreError> {
        let on_complete = new
            .on_complete
            .as_ref()
            .map(|target| serde_json::to_value(target).expect("a target serializes"));
        self.retrying("create job", || async {
            let now = Utc::now();
            let row = job::ActiveModel {
                id: Set(new.id.clone()),
                job_type: Set(new.job_type.clone()),
                queue: Set(new.queue.clone()),
                stage: Set(JobStage::Formation.as_str().to_owned()),
                params: Set(new.params.clone()),
                max_retries: Set(new.max_retries),
                retry_delay_ms: Set(new.retry_delay_ms),
                on_failure: Set(new.on_failure.as_str().to_owned()),
                task_count: Set(0),
                first_task_id: Set(None),
                done_count: Set(0),
                failed_count: Set(0),
                cancelled_count: Set(0),
                first_error: Set(None),
                on_complete: Set(on_complete.clone()),
                tasks_published: Set(false),
                created_at: Set(now),
                updated_at: Set(now),
                started_at: Set(None),
                finished_at: Set(None),
                request_digest: Set(Some(new.request_digest.clone())),
                task_timeout_ms: Set(new.task_timeout_ms),
            };
            let inserted = job::Entity::insert(row)
                .on_conflict(OnConflict::column(job::Column::Id).do_nothing().to_owned())
                .exec_without_returning(&self.db)
                .await?;
            if inserted == 1 {
                return Ok(None);
            }
            let existing = job::Entity::find_by_id(new.id.clone())
                .one(&self.db)
                .await?
                .ok_or_else(|| StoreError::JobNotFound(new.id.clone()))?;
            Ok(Some(existing))
        })
        .await
    }

    /// Inserts task rows and returns `(id, ordinal)` of the rows it inserted; rows
    /// whose ordinal already exists are skipped, so a resumed intake can insert the
    /// same batch again.
    pub async fn insert_tasks(
        &self,
        job_id: &str,
        tasks: &[NewTask],
    ) -> Result<Vec<(i64, i32)>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let now = Utc::now();
        let rows = if self.backend() == DatabaseBackend::Postgres {
            self.db
                .query_all_raw(pg_batch::insert_tasks(job_id, tasks, now))
                .await?
        } else {
            self.db
                .query_all(&insert_statement(job_id, tasks, now))
                .await?
        };
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64>("", "id")?,
                    row.try_get::<i32>("", "ordinal")?,
                ))
            })
            .collect()
    }

    /// Moves a job from `formation` to `running` with its task count, in one
    /// transaction that first checks every task row is there. A job without tasks
    /// ends at once (`done`) instead.
    pub async fn start_job(
        &self,
        job_id: &str,
        expected_tasks: i64,
    ) -> Result<StartOutcome, StoreError> {
        self.retrying("start job", || async {
            let job_id = job_id.to_owned();
            Ok(self
                .db
                .transaction::<_, StartOutcome, StoreError>(move |txn| {
                    Box::pin(async move {
                        let found = task::Entity::find()
                            .select_only()
                            .column_as(Expr::col(task::Column::Id).count(), "count")
                            .column_as(Expr::col(task::Column::Id).min(), "first")
                            .filter(task::Column::JobId.eq(job_id.as_str()))
                            .into_model::<CountAndFirst>()
                            .one(txn)
                            .await?
                            .unwrap_or(CountAndFirst {
                                count: 0,
                                first: None,
                            });
                        if found.count != expected_tasks {
                            return Err(StoreError::TaskCountMismatch {
                                job_id,
                                expected: expected_tasks,
                                found: found.count,
                            });
                        }
                        let job = lock_job(txn, &job_id, JobStage::Formation).await?;
                        let Some(job) = job else {
                            // Already started (a retried write that landed, or another
                            // intake): report the job as it is.
                            let job = job::Entity::find_by_id(job_id.clone())
                                .one(txn)
                                .await?
                                .ok_or_else(|| StoreError::JobNotFound(job_id.clone()))?;
                            return Ok(StartOutcome::Running(job));
                        };
                        if expected_tasks == 0 {
                            let event =
                                job_ends::end_job(txn, &job, JobStage::Formation, JobStage::Done)
                                    .await?;
                            return Ok(StartOutcome::Ended(event));
                        }
                        let now = Utc::now();
                        let started = job::Entity::update_many()
                            .col_expr(job::Column::Stage, Expr::value(JobStage::Running.as_str()))
                            .col_expr(job::Column::TaskCount, Expr::value(expected_tasks))
                            .col_expr(job::Column::FirstTaskId, Expr::value(found.first))
                            .col_expr(job::Column::StartedAt, Expr::value(now))
                            .col_expr(job::Column::UpdatedAt, Expr::value(now))
                            .filter(job::Column::Id.eq(job_id.as_str()))
                            .filter(job::Column::Stage.eq(JobStage::Formation.as_str()))
                            .exec_with_returning(txn)
                            .await?;
                        let job = started.into_iter().next().ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "job {job_id} left formation mid-transaction"
                            ))
                        })?;
                        // Tasks published while the job was forming may all have
                        // finished: their finished events found it not yet running.
                        if let Progress::Ended(event) = job_ends::check_in(txn, &job_id).await? {
                            return Ok(StartOutcome::Ended(*event));
                        }
                        Ok(StartOutcome::Running(job))
                    })
                })
                .await?)
        })
        .await
    }

    /// Tasks that have never been claimed, in ordinal order after `after_ordinal` (a
    /// range scan of the job's `(job_id, ordinal)` index, so paging through a job
    /// costs O(tasks), not O(tasks²)): what the
    /// intake publishes (again, when it resumes).
    pub(crate) async fn unpublished_tasks(
        &self,
        job_id: &str,
        after_ordinal: i32,
        limit: u64,
    ) -> Result<Vec<task::Model>, StoreError> {
        self.retrying("list tasks to publish", || async {
            Ok(task::Entity::find()
                .filter(task::Column::JobId.eq(job_id))
                .filter(task::Column::Ordinal.gt(after_ordinal))
                .filter(task::Column::Status.eq(TaskStatus::Pending.as_str()))
                .filter(task::Column::Attempts.eq(0))
                .order_by_asc(task::Column::Ordinal)
                .limit(limit)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Records that every task message of the job was published, so that a redelivered
    /// request does not publish them again.
    pub(crate) async fn mark_tasks_published(&self, job_id: &str) -> Result<(), StoreError> {
        self.retrying("mark tasks published", || async {
            job::Entity::update_many()
                .col_expr(job::Column::TasksPublished, Expr::value(true))
                .filter(job::Column::Id.eq(job_id))
                .exec(&self.db)
                .await?;
            Ok(())
        })
        .await
    }

    /// The job row, if there is one.
    pub async fn job(&self, job_id: &str) -> Result<Option<job::Model>, StoreError> {
        self.retrying("read job", || async {
            Ok(job::Entity::find_by_id(job_id.to_owned())
                .one(&self.db)
                .await?)
        })
        .await
    }

    /// The job and its task counts by status (one aggregate query).
    pub async fn job_status(&self, job_id: &str) -> Result<Option<JobStatus>, StoreError> {
        let Some(job) = self.job(job_id).await? else {
            return Ok(None);
        };
        let tasks_by_status = self
            .retrying("count tasks", || async {
                Ok(count_by_status(&self.db, job_id).await?)
            })
            .await?;
        Ok(Some(JobStatus {
            job,
            tasks_by_status,
        }))
    }

    /// All task rows of a job, in id order.
    pub async fn tasks_of_job(&self, job_id: &str) -> Result<Vec<task::Model>, StoreError> {
        self.retrying("list tasks", || async {
            Ok(task::Entity::find()
                .filter(task::Column::JobId.eq(job_id))
                .order_by_asc(task::Column::Id)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Attempts started over all of a job's tasks.
    pub async fn total_attempts(&self, job_id: &str) -> Result<i64, StoreError> {
        self.retrying("sum attempts", || async {
            let sum: Option<Option<i64>> = task::Entity::find()
                .select_only()
                .column_as(
                    Expr::col(task::Column::Attempts).sum().cast_as("bigint"),
                    "sum",
                )
                .filter(task::Column::JobId.eq(job_id))
                .into_tuple()
                .one(&self.db)
                .await?;
            Ok(sum.flatten().unwrap_or(0))
        })
        .await
    }

    /// How many job rows exist, in any stage.
    pub async fn count_jobs(&self) -> Result<u64, StoreError> {
        self.retrying("count jobs", || async {
            Ok(job::Entity::find().count(&self.db).await?)
        })
        .await
    }
}

/// The portable form of [`Store::insert_tasks`]: one multi-row INSERT.
fn insert_statement(
    job_id: &str,
    tasks: &[NewTask],
    now: chrono::DateTime<Utc>,
) -> sea_orm::sea_query::InsertStatement {
    let rows = tasks.iter().map(|new| task::ActiveModel {
        job_id: Set(job_id.to_owned()),
        ordinal: Set(new.ordinal),
        task_type: Set(new.task_type.clone()),
        payload: Set(new.payload.clone()),
        status: Set(TaskStatus::Pending.as_str().to_owned()),
        attempts: Set(0),
        deliveries: Set(0),
        info: Set(None),
        result: Set(None),
        version: Set(0),
        claimed_by: Set(None),
        lease_until: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        finished_at: Set(None),
        ..Default::default()
    });
    let mut insert = task::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::columns([task::Column::JobId, task::Column::Ordinal])
                .do_nothing()
                .to_owned(),
        )
        .into_query();
    insert.returning(Query::returning().columns([task::Column::Id, task::Column::Ordinal]));
    insert
}
