//! Job rows: creation (idempotent on the job id), task-row insertion, the move from
//! `formation` to `running`, and read-only views for status and tests.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{CaseStatement, Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseBackend, DatabaseTransaction, DbErr, EntityTrait,
    FromQueryResult, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};

use super::error::StoreError;
use super::handle::Store;
use super::job_ends::CheckedIn;
use super::job_ends::{self, count_by_status, count_by_status_from, lock_job};
use super::pg_batch::one_of;
use super::requests::{write_requests, NewRequest};
use super::rows::{JobFilter, JobStatus, NewJob, NewTask, StartOutcome, WholeJob};
use super::task_rows::{insert_jobs_task_rows, insert_task_rows};
use crate::phases::Phase;
use crate::state::JobStage;
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
        self.retrying("create job", || async {
            let inserted = job::Entity::insert(job_row(new, JobStage::Formation, 0, Utc::now()))
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

    /// Stores a job whose request asks to run later: its row `scheduled` (no task row
    /// yet) and `request`, which the request relay publishes at its `run_at`, in one
    /// transaction. Returns `None` when it was stored, or the existing row when a job
    /// with this id exists.
    pub async fn schedule_job(
        &self,
        new: &NewJob,
        request: NewRequest,
    ) -> Result<Option<job::Model>, StoreError> {
        self.retrying("schedule job", || {
            let (new, request) = (new.clone(), request.clone());
            self.transact(move |txn| {
                Box::pin(async move {
                    let row = job_row(&new, JobStage::Scheduled, 0, Utc::now());
                    let inserted = job::Entity::insert(row)
                        .on_conflict(OnConflict::column(job::Column::Id).do_nothing().to_owned())
                        .exec_without_returning(txn)
                        .await?;
                    if inserted == 1 {
                        write_requests(txn, vec![request]).await?;
                        return Ok(None);
                    }
                    let existing = job::Entity::find_by_id(new.id.clone())
                        .one(txn)
                        .await?
                        .ok_or_else(|| StoreError::JobNotFound(new.id.clone()))?;
                    Ok(Some(existing))
                })
            })
        })
        .await
    }

    /// Moves a scheduled job whose time has come to `formation`, where its request
    /// forms it; `false` if it is not scheduled (formed already, or cancelled).
    pub async fn unschedule(&self, job_id: &str) -> Result<bool, StoreError> {
        self.retrying("unschedule job", || async {
            let moved = job::Entity::update_many()
                .col_expr(
                    job::Column::Stage,
                    Expr::value(JobStage::Formation.as_str()),
                )
                .col_expr(job::Column::UpdatedAt, Expr::value(Utc::now()))
                .filter(job::Column::Id.eq(job_id))
                .filter(job::Column::Stage.eq(JobStage::Scheduled.as_str()))
                .exec(&self.db)
                .await?;
            Ok(moved.rows_affected == 1)
        })
        .await
    }

    /// Creates several jobs whole — each `running` at once, with every task row — in
    /// one transaction: what small jobs cost when many arrive together. Returns, for
    /// each job in order, the `(id, ordinal)` of its task rows, or `None` when a job
    /// with its id exists already (left as it is: the caller takes the path of a
    /// duplicate request). A retry after a commit whose answer was lost finds every job
    /// existing, so nothing is created twice. Each job needs at least one task: a job
    /// without tasks ends at once ([`Store::start_job`]).
    pub async fn create_whole_jobs(
        &self,
        jobs: &[WholeJob],
    ) -> Result<Vec<Option<Vec<(i64, i32)>>>, StoreError> {
        let backend = self.backend();
        self.retrying("create whole jobs", || {
            let jobs = jobs.to_vec();
            self.transact(move |txn| {
                Box::pin(async move { create_whole_in(txn, backend, &jobs).await })
            })
        })
        .await
    }

    /// Inserts task rows of a job in `formation`; rows whose ordinal already exists are
    /// skipped, so a resumed intake can insert the same batch again. `false`, inserting
    /// nothing, if the job has left formation: the rows go in under a share lock on the job's row, so that
    /// a task is pending only in a live job (every job end cancels its unfinished
    /// tasks; a row added after it would be pending in an ended job). The claim relies
    /// on it. Not retried here: the intake retries with smaller batches.
    pub async fn insert_tasks(&self, job_id: &str, tasks: &[NewTask]) -> Result<bool, StoreError> {
        let (backend, job_id, tasks) = (self.backend(), job_id.to_owned(), tasks.to_vec());
        let inserted = self
            .transact(move |txn| {
                Box::pin(async move {
                    // Rows first, then the check: on SQLite a transaction that reads
                    // before it writes fails at its first write if another one wrote
                    // meanwhile.
                    insert_task_rows(txn, backend, &job_id, &tasks, Utc::now()).await?;
                    let forming: Option<String> = job::Entity::find_by_id(job_id.clone())
                        .select_only()
                        .column(job::Column::Id)
                        .filter(job::Column::Stage.eq(JobStage::Formation.as_str()))
                        .lock_shared()
                        .into_tuple()
                        .one(txn)
                        .await?;
                    match forming {
                        Some(_) => Ok(()),
                        // An error rolls the rows back.
                        None => Err(StoreError::NotForming(job_id)),
                    }
                })
            })
            .await;
        match inserted {
            Ok(()) => Ok(true),
            Err(StoreError::NotForming(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Moves a job from `formation` to `running` with its task count, in one
    /// transaction that first checks every task row is there. A job without tasks
    /// ends at once (`done`) instead.
    pub async fn start_job(
        &self,
        job_id: &str,
        expected_tasks: i64,
    ) -> Result<StartOutcome, StoreError> {
        let cap = self.payload_cap;
        self.retrying("start job", || async {
            let job_id = job_id.to_owned();
            self.transact(move |txn| {
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
                        return Ok(StartOutcome::Running(Box::new(job)));
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
                        StoreError::Corrupt(format!("job {job_id} left formation mid-transaction"))
                    })?;
                    // Tasks published while the job was forming may all have
                    // finished: their finished events found it not yet running.
                    Ok(match job_ends::check_in(txn, &job_id, cap).await? {
                        CheckedIn::Going => StartOutcome::Running(Box::new(job)),
                        CheckedIn::Moved(change) => StartOutcome::Advanced(change),
                        CheckedIn::Ended(event) => StartOutcome::Ended(event),
                    })
                })
            })
            .await
        })
        .await
    }

    /// Records that every task message of run `run` of the jobs' phase that starts at
    /// ordinal `phase_first_ordinal` was published, so that a redelivered request (or
    /// the orphan scan) does not publish them again. A job that has moved on to a later
    /// phase since (its tasks all finished the moment their messages went out), or was
    /// retried (a later run), is left alone: the messages of its new phase or run are
    /// not published yet.
    pub(crate) async fn mark_tasks_published(
        &self,
        job_ids: &[String],
        phase_first_ordinal: i64,
        run: i32,
    ) -> Result<(), StoreError> {
        let backend = self.backend();
        self.retrying("mark tasks published", || async {
            job::Entity::update_many()
                .col_expr(job::Column::TasksPublished, Expr::value(true))
                .filter(one_of(backend, job::Column::Id, job_ids.to_vec()))
                .filter(job::Column::PhaseFirstOrdinal.eq(phase_first_ordinal))
                .filter(job::Column::Run.eq(run))
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
        let phase_tasks_by_status = match &job.phase {
            None => BTreeMap::new(),
            Some(_) if job.phase_first_ordinal == 0 => tasks_by_status.clone(),
            Some(_) => {
                self.retrying("count the phase's tasks", || async {
                    Ok(count_by_status_from(&self.db, job_id, job.phase_first_ordinal).await?)
                })
                .await?
            }
        };
        Ok(Some(JobStatus {
            job,
            tasks_by_status,
            phase_tasks_by_status,
        }))
    }

    /// Jobs the newest first (by creation), filtered by stage and type.
    pub async fn jobs(&self, filter: &JobFilter) -> Result<Vec<job::Model>, StoreError> {
        self.retrying("list jobs", || async {
            let mut jobs = job::Entity::find();
            if let Some(stage) = filter.stage {
                jobs = jobs.filter(job::Column::Stage.eq(stage.as_str()));
            }
            if let Some(job_type) = &filter.job_type {
                jobs = jobs.filter(job::Column::JobType.eq(job_type.as_str()));
            }
            Ok(jobs
                .order_by_desc(job::Column::CreatedAt)
                .order_by_desc(job::Column::Id)
                .limit(filter.limit)
                .all(&self.db)
                .await?)
        })
        .await
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

    /// How many jobs are in each stage that has not ended, by the index on the stage;
    /// stages with none are left out.
    pub async fn unfinished_jobs_by_stage(&self) -> Result<Vec<(JobStage, u64)>, StoreError> {
        #[derive(FromQueryResult)]
        struct StageCount {
            stage: String,
            count: i64,
        }
        self.retrying("count unfinished jobs", || async {
            let counts = job::Entity::find()
                .select_only()
                .column(job::Column::Stage)
                .column_as(job::Column::Id.count(), "count")
                .filter(job::Column::Stage.is_in([
                    JobStage::Scheduled.as_str(),
                    JobStage::Formation.as_str(),
                    JobStage::Running.as_str(),
                ]))
                .group_by(job::Column::Stage)
                .into_model::<StageCount>()
                .all(&self.db)
                .await?;
            Ok(counts
                .into_iter()
                .filter_map(|row| Some((row.stage.parse().ok()?, row.count as u64)))
                .collect())
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

/// A job's row as the intake creates it, at `stage` with `task_count` tasks.
fn job_row(
    new: &NewJob,
    stage: JobStage,
    task_count: usize,
    now: DateTime<Utc>,
) -> job::ActiveModel {
    let on_complete = new
        .on_complete
        .as_ref()
        .map(|target| serde_json::to_value(target).expect("a target serializes"));
    job::ActiveModel {
        id: Set(new.id.clone()),
        job_type: Set(new.job_type.clone()),
        queue: Set(new.queue.clone()),
        stage: Set(stage.as_str().to_owned()),
        params: Set(new.params.clone()),
        max_retries: Set(new.max_retries),
        retry_delay_ms: Set(new.retry_delay_ms),
        on_failure: Set(new.on_failure.as_str().to_owned()),
        task_count: Set(task_count as i64),
        first_task_id: Set(None),
        done_count: Set(0),
        failed_count: Set(0),
        cancelled_count: Set(0),
        first_error: Set(None),
        on_complete: Set(on_complete),
        tasks_published: Set(false),
        created_at: Set(now),
        updated_at: Set(now),
        started_at: Set(None),
        finished_at: Set(None),
        request_digest: Set(Some(new.request_digest.clone())),
        task_timeout_ms: Set(new.task_timeout_ms),
        results_in_event: Set(new.results_in_event),
        stage_plan: Set(new
            .stage_plan
            .as_ref()
            .map(|plan| serde_json::to_value(plan).expect("a plan serializes"))),
        phase: Set(new
            .stage_plan
            .as_ref()
            .map(|_| Phase::Map.as_str().to_owned())),
        phase_first_ordinal: Set(0),
        result: Set(None),
        sealed_parts: Set(None),
        sealed_tasks: Set(None),
        run: Set(1),
        fed_through: Set(-1),
        removal_started_at: Set(None),
        tasks_kept: Set(false),
        run_at: Set(new.run_at),
    }
}

/// The statements of [`Store::create_whole_jobs`], in the caller's transaction.
async fn create_whole_in(
    txn: &DatabaseTransaction,
    backend: DatabaseBackend,
    jobs: &[WholeJob],
) -> Result<Vec<Option<Vec<(i64, i32)>>>, StoreError> {
    let now = Utc::now();
    let rows = jobs.iter().map(|whole| {
        let mut row = job_row(&whole.job, JobStage::Running, whole.tasks.len(), now);
        row.started_at = Set(Some(now));
        row
    });
    let created: HashSet<String> = match job::Entity::insert_many(rows)
        .on_conflict(OnConflict::column(job::Column::Id).do_nothing().to_owned())
        .exec_with_returning_keys(txn)
        .await
    {
        Ok(ids) => ids.into_iter().collect(),
        Err(DbErr::RecordNotInserted) => HashSet::new(),
        Err(err) => return Err(err.into()),
    };
    // Every new job's tasks in one statement.
    let new: Vec<(&str, &[NewTask])> = jobs
        .iter()
        .filter(|whole| created.contains(&whole.job.id))
        .map(|whole| (whole.job.id.as_str(), whole.tasks.as_slice()))
        .collect();
    let mut rows_of: HashMap<String, Vec<(i64, i32)>> = HashMap::new();
    if !new.is_empty() {
        for (id, job_id, ordinal) in insert_jobs_task_rows(txn, backend, &new, now).await? {
            rows_of.entry(job_id).or_default().push((id, ordinal));
        }
    }
    let mut results = Vec::with_capacity(jobs.len());
    // A job's first task id, from the rows just inserted: asked of the table,
    // `MIN(id)` for a new job is planned as a walk up the primary key from the
    // oldest task, which grows with every task ever stored.
    let mut first_ids = CaseStatement::new();
    for whole in jobs {
        if !created.contains(&whole.job.id) {
            results.push(None);
            continue;
        }
        let mut rows = rows_of.remove(&whole.job.id).unwrap_or_default();
        rows.sort_unstable();
        if let Some(&(first, _)) = rows.first() {
            first_ids = first_ids.case(job::Column::Id.eq(whole.job.id.as_str()), first);
        }
        results.push(Some(rows));
    }
    if !created.is_empty() {
        job::Entity::update_many()
            .col_expr(job::Column::FirstTaskId, Expr::Case(Box::new(first_ids)))
            .filter(one_of(
                backend,
                job::Column::Id,
                created.into_iter().collect::<Vec<_>>(),
            ))
            .exec(txn)
            .await?;
    }
    Ok(results)
}
