//! The completion check: ending a job whose counters say it is over, in one
//! transaction per job.
//!
//! The counters are kept by the transactions that finish tasks
//! ([`Store::finish_tasks`]), so checking a job reads one row however many events
//! arrive: cost is O(events), never O(tasks) per event. The full aggregate over the
//! job's tasks runs once, when the job ends, and sets the final counts exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseTransaction,
    EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};

use super::error::StoreError;
use super::handle::Store;
use super::outbox::EVENT_CLAIM;
use super::pg_batch::{self, one_of};
use super::phases::{self, Advanced};
use super::results::{result_for_event, results_for_event};
use super::rows::{Checked, PhaseChange};
use crate::phases::Phase;
use crate::protocol::{FailurePolicy, JobEvent, SCHEMA_VERSION, STAGE};
use crate::state::{JobStage, TaskStatus};
use entity::{job, job_event, job_request, task};

const FAILED_IDS_IN_EVENT: u64 = 100;
/// The most of a database's error kept as a job's first error.
const MAX_REASON_CHARS: usize = 1_000;

impl Store {
    /// Ends every running job among `job_ids` whose counters say it is over, all in
    /// one transaction, and returns their events (in the outbox, claimed by the
    /// caller). The counters are read first without a lock: most checks find a job
    /// still going and need no transaction at all. Those that look over are locked
    /// and checked again, so of racing consumers exactly one ends each job.
    pub async fn check_jobs(&self, job_ids: &[String]) -> Result<Checked, StoreError> {
        if job_ids.is_empty() {
            return Ok(Checked::default());
        }
        let backend = self.backend();
        let counters: Vec<Counters> = self
            .retrying("read job counters", || async {
                Ok(job::Entity::find()
                    .select_only()
                    .columns([
                        job::Column::Id,
                        job::Column::OnFailure,
                        job::Column::TaskCount,
                        job::Column::DoneCount,
                        job::Column::FailedCount,
                        job::Column::CancelledCount,
                        job::Column::Phase,
                    ])
                    .filter(one_of(backend, job::Column::Id, job_ids.to_vec()))
                    .filter(job::Column::Stage.eq(JobStage::Running.as_str()))
                    .into_model::<Counters>()
                    .all(&self.db)
                    .await?)
            })
            .await?;
        let mut over: Vec<String> = counters
            .into_iter()
            .filter(|job| job.verdict() != Verdict::Wait)
            .map(|job| job.id)
            .collect();
        if over.is_empty() {
            return Ok(Checked::default());
        }
        over.sort();
        let lasting = match self.end_jobs(&over).await {
            Err(err) if !err.is_transient() && over.len() > 1 => err,
            together => return self.or_fail_alone(&over[0], together).await,
        };
        // One job's lasting error (a value the database refuses, say) must not hold
        // back the others that share its batch: each is ended on its own.
        tracing::warn!(jobs = over.len(), err = %lasting, "ending jobs together failed; ending each alone");
        let mut checked = Checked::default();
        for job_id in &over {
            let alone = self.end_jobs(std::slice::from_ref(job_id)).await;
            let one = self.or_fail_alone(job_id, alone).await?;
            checked.ended.extend(one.ended);
            checked.advanced.extend(one.advanced);
        }
        Ok(checked)
    }

    /// The jobs among `over` still running, each ended or moved on, in one transaction.
    async fn end_jobs(&self, over: &[String]) -> Result<Checked, StoreError> {
        let cap = self.payload_cap;
        self.retrying("end jobs", || async {
            let over = over.to_vec();
            self.transact(move |txn| {
                Box::pin(async move {
                    let mut ending = Vec::with_capacity(over.len());
                    let mut advanced = Vec::new();
                    for job in lock_jobs(txn, &over, JobStage::Running).await? {
                        match settle(txn, &job, cap).await? {
                            Settled::Wait => {}
                            Settled::Moved(change) => advanced.push(*change),
                            Settled::Ends(to, first_error, result) => {
                                let end = Ending {
                                    from: JobStage::Running,
                                    to,
                                    first_error,
                                    result,
                                };
                                ending.push((job, end));
                            }
                        }
                    }
                    let ended = end_locked(txn, ending).await?;
                    Ok(Checked { ended, advanced })
                })
            })
            .await
        })
        .await
    }

    /// `checked`, the outcome of ending `job_id` alone; when that failed for a lasting
    /// reason, the job fails with it instead, its unfinished tasks cancelled, so that
    /// its producer hears why rather than waiting for ever.
    async fn or_fail_alone(
        &self,
        job_id: &str,
        checked: Result<Checked, StoreError>,
    ) -> Result<Checked, StoreError> {
        let err = match checked {
            Err(err) if !err.is_transient() => err,
            other => return other,
        };
        tracing::error!(job_id, %err, "the job cannot end as its tasks say; it fails with the database's reason");
        let reason = format!("the job could not be ended: {err}");
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        let failed = match self
            .end_job_at(job_id, JobStage::Running, JobStage::Failed, &reason)
            .await
        {
            Ok(failed) => failed,
            // Not even its failure can be written: it stays running, and the sweeper's
            // check of quiet jobs tries again every `stuck_after`, not in a loop here.
            Err(err) if !err.is_transient() => {
                tracing::error!(job_id, %err, "could not fail the job either; the sweeper tries again later");
                None
            }
            Err(err) => return Err(err),
        };
        Ok(Checked {
            ended: failed.into_iter().collect(),
            advanced: Vec::new(),
        })
    }

    /// Ends the job if it is at `from`, as `to` with `reason` as its first error,
    /// cancelling its unfinished tasks. `None`: the job was not at `from`.
    pub(super) async fn end_job_at(
        &self,
        job_id: &str,
        from: JobStage,
        to: JobStage,
        reason: &str,
    ) -> Result<Option<job_event::Model>, StoreError> {
        self.retrying("end a job", || async {
            let (job_id, reason) = (job_id.to_owned(), reason.to_owned());
            self.transact(move |txn| {
                Box::pin(async move {
                    let Some(job) = lock_job(txn, &job_id, from).await? else {
                        return Ok(None);
                    };
                    // The job ends as a whole, not by a task: nothing of it goes on.
                    cancel_rest(txn, &job, from, JobStage::Cancelled).await?;
                    if from == JobStage::Scheduled {
                        // Its requests, waiting for its time, will never form it.
                        job_request::Entity::delete_many()
                            .filter(job_request::Column::JobId.eq(job.id.as_str()))
                            .exec(txn)
                            .await?;
                    }
                    let event = end_job_with(txn, &job, from, to, Some(reason)).await?;
                    Ok(Some(event))
                })
            })
            .await
        })
        .await
    }

    /// Ends a scheduled job (its waiting requests removed), a running job, or one still
    /// forming (a job in parts runs its first parts' tasks before its seal), as
    /// `cancelled`, cancelling its unfinished tasks. `None`: the job was none of these.
    pub async fn cancel_job(&self, job_id: &str) -> Result<Option<job_event::Model>, StoreError> {
        // Scheduled, else running, else forming, else running: a job whose time comes,
        // or that starts, between two looks is found by a later one.
        for from in [
            JobStage::Scheduled,
            JobStage::Running,
            JobStage::Formation,
            JobStage::Running,
        ] {
            let cancelled = self
                .end_job_at(job_id, from, JobStage::Cancelled, "cancelled")
                .await?;
            if cancelled.is_some() {
                return Ok(cancelled);
            }
        }
        Ok(None)
    }
}

/// Ends, in the transaction that recorded their tasks' outcomes, the jobs among
/// `counted` (their rows as that transaction changed them, under its lock) that are
/// running and whose counters now say they end: the job ends with its last task,
/// with no finished event and no transaction of the completion role. Returns their
/// events, and the jobs left for the completion role to check: a multi-stage job
/// moving on to its next phase (the completion role makes the phase), and any job
/// whose ending failed here.
///
/// The ending runs under a savepoint: an error in it (a value the database refuses,
/// say) rolls back the ending alone, never the outcomes, and the completion role ends
/// the job as it ends any other, failing it alone if it must. A job still forming
/// needs neither: the transaction that starts it checks it.
pub(super) async fn end_over_in(
    txn: &DatabaseTransaction,
    counted: &[job::Model],
) -> Result<(Vec<job_event::Model>, BTreeSet<String>), StoreError> {
    let mut over = Vec::new();
    let mut to_check = BTreeSet::new();
    for job in counted
        .iter()
        .filter(|job| job.stage == JobStage::Running.as_str())
    {
        match Counters::of(job).verdict() {
            Verdict::Wait => {}
            Verdict::Advance => {
                to_check.insert(job.id.clone());
            }
            Verdict::End(to) => {
                let end = Ending {
                    from: JobStage::Running,
                    to,
                    first_error: job.first_error.clone(),
                    result: None,
                };
                over.push((job.clone(), end));
            }
        }
    }
    if over.is_empty() {
        return Ok((Vec::new(), to_check));
    }
    let ids: Vec<String> = over.iter().map(|(job, _)| job.id.clone()).collect();
    let savepoint = txn.begin().await?;
    match end_locked(&savepoint, over).await {
        Ok(ended) => {
            savepoint.commit().await?;
            Ok((ended, to_check))
        }
        Err(err) => {
            tracing::warn!(jobs = ids.len(), %err, "ending jobs with their last outcomes failed; the completion role ends them");
            savepoint.rollback().await?;
            to_check.extend(ids);
            Ok((Vec::new(), to_check))
        }
    }
}

/// Ends each of `ending`'s jobs, locked and at its `from` stage, as its [`Ending`]
/// says: what is left of it cancelled if it cancels, its final counts from one
/// aggregate over all of their tasks, its event in the outbox.
async fn end_locked<C: ConnectionTrait>(
    txn: &C,
    ending: Vec<(job::Model, Ending)>,
) -> Result<Vec<job_event::Model>, StoreError> {
    for (job, end) in &ending {
        cancel_rest(txn, job, end.from, end.to).await?;
    }
    let ids: Vec<String> = ending.iter().map(|(job, _)| job.id.clone()).collect();
    let mut counts = count_by_job_and_status(txn, &ids).await?;
    let ending = ending
        .into_iter()
        .map(|(job, end)| {
            let counts = counts.remove(&job.id).unwrap_or_default();
            (job, end, counts)
        })
        .collect();
    finish_jobs(txn, ending).await
}

/// Ends the job if it is running and its counters say it is over, or moves it to its
/// next phase if it has one. The stage change is a compare-and-set on `running` under
/// the job's row lock, so of any number of racing transactions exactly one ends the job
/// (or moves it on).
pub(super) async fn check_in<C: ConnectionTrait>(
    txn: &C,
    job_id: &str,
    cap: usize,
) -> Result<CheckedIn, StoreError> {
    let Some(job) = lock_job(txn, job_id, JobStage::Running).await? else {
        return Ok(CheckedIn::Going);
    };
    Ok(match settle(txn, &job, cap).await? {
        Settled::Wait => CheckedIn::Going,
        Settled::Moved(change) => CheckedIn::Moved(change),
        Settled::Ends(to, first_error, result) => {
            let end = Ending {
                from: JobStage::Running,
                to,
                first_error,
                result,
            };
            CheckedIn::Ended(end_job_as(txn, &job, end).await?)
        }
    })
}

/// What [`check_in`] did.
#[derive(Debug)]
pub(super) enum CheckedIn {
    /// The job goes on as it was.
    Going,
    /// It entered its next phase.
    Moved(Box<PhaseChange>),
    /// It ended: its event.
    Ended(job_event::Model),
}

/// What the check of one locked running job decided.
#[derive(Debug)]
enum Settled {
    /// Tasks of it are still going.
    Wait,
    /// It entered its next phase.
    Moved(Box<PhaseChange>),
    /// It ends in this stage, with this first error and result.
    Ends(JobStage, Option<String>, Option<Value>),
}

/// Decides a locked running job's fate from its counters, and for a multi-stage job
/// whose phase is over, makes the next phase ([`phases::advance`]) with its payloads
/// capped at `cap` bytes.
async fn settle<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    cap: usize,
) -> Result<Settled, StoreError> {
    Ok(match Counters::of(job).verdict() {
        Verdict::Wait => Settled::Wait,
        Verdict::End(to) => Settled::Ends(to, job.first_error.clone(), None),
        Verdict::Advance => match phases::advance(txn, job, cap).await? {
            Advanced::Moved { job, phase } => {
                let event = stage_event(&job, phase);
                Settled::Moved(Box::new(PhaseChange {
                    job: *job,
                    phase,
                    event,
                }))
            }
            Advanced::Ends {
                stage,
                first_error,
                result,
            } => Settled::Ends(
                stage,
                first_error.or_else(|| job.first_error.clone()),
                result,
            ),
        },
    })
}

/// The `job.stage` event of a job that entered `phase`.
fn stage_event(job: &job::Model, phase: Phase) -> JobEvent {
    JobEvent {
        version: SCHEMA_VERSION,
        event: STAGE.to_owned(),
        job_id: job.id.clone(),
        job_type: job.job_type.clone(),
        run: job.run,
        stage: job.stage.clone(),
        task_count: job.task_count,
        done: job.done_count,
        failed: job.failed_count,
        cancelled: job.cancelled_count,
        first_error: None,
        failed_task_ids: Vec::new(),
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: None,
        results: None,
        results_withheld: None,
        phase: Some(phase.as_str().to_owned()),
        result: None,
        result_withheld: None,
    }
}

/// What decides whether a running job is over: its failure policy and counters.
#[derive(FromQueryResult)]
struct Counters {
    id: String,
    on_failure: String,
    task_count: i64,
    done_count: i64,
    failed_count: i64,
    cancelled_count: i64,
    phase: Option<String>,
}

/// What a running job's counters say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Tasks of it are still going.
    Wait,
    /// It ends in this stage.
    End(JobStage),
    /// Its current phase is done and it has a next one, or a result to make.
    Advance,
}

impl Counters {
    fn of(job: &job::Model) -> Self {
        Self {
            id: job.id.clone(),
            on_failure: job.on_failure.clone(),
            task_count: job.task_count,
            done_count: job.done_count,
            failed_count: job.failed_count,
            cancelled_count: job.cancelled_count,
            phase: job.phase.clone(),
        }
    }

    /// `failed` once a task failed and the job fails fast or every task is over; once
    /// every task is over, `done` — or, for a multi-stage job, on to its next phase
    /// (the last phase ends it with its result).
    fn verdict(&self) -> Verdict {
        let policy = FailurePolicy::parse(&self.on_failure);
        let all_terminal =
            self.done_count + self.failed_count + self.cancelled_count >= self.task_count;
        if self.failed_count > 0 && (policy == FailurePolicy::FailFast || all_terminal) {
            Verdict::End(JobStage::Failed)
        } else if !all_terminal {
            Verdict::Wait
        } else if self.phase.is_some() {
            Verdict::Advance
        } else {
            Verdict::End(JobStage::Done)
        }
    }
}

/// Ends a job that is not yet terminal: used when a job has no tasks at all.
pub(super) async fn end_job<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    from: JobStage,
    to: JobStage,
) -> Result<job_event::Model, StoreError> {
    end_job_with(txn, job, from, to, job.first_error.clone()).await
}

/// Moves a locked job from `from` to the terminal stage `to` (compare-and-set),
/// cancels what is left of it if it failed fast or was cancelled, sets its final
/// counts from one aggregate, and writes its event to the outbox, claimed by the
/// caller for [`EVENT_CLAIM`].
pub(super) async fn end_job_with<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    from: JobStage,
    to: JobStage,
    first_error: Option<String>,
) -> Result<job_event::Model, StoreError> {
    let end = Ending {
        from,
        to,
        first_error,
        result: None,
    };
    end_job_as(txn, job, end).await
}

/// How a job ends: from which stage to which, why, and with what result.
#[derive(Debug)]
struct Ending {
    from: JobStage,
    to: JobStage,
    first_error: Option<String>,
    result: Option<Value>,
}

/// [`end_job_with`] for any [`Ending`].
async fn end_job_as<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    end: Ending,
) -> Result<job_event::Model, StoreError> {
    cancel_rest(txn, job, end.from, end.to).await?;
    let counts = count_by_status(txn, &job.id).await?;
    finish_job(txn, job, end, counts).await
}

/// Cancels the unfinished tasks of a job ending as `to`, if it cancels them: a
/// cancelled job, or a failed one that fails fast (or never finished forming).
async fn cancel_rest<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    from: JobStage,
    to: JobStage,
) -> Result<(), StoreError> {
    let policy = FailurePolicy::parse(&job.on_failure);
    let cancels = to == JobStage::Cancelled
        || (to == JobStage::Failed
            && (policy == FailurePolicy::FailFast || from == JobStage::Formation));
    if !cancels {
        return Ok(());
    }
    let now = Utc::now();
    task::Entity::update_many()
        .col_expr(
            task::Column::Status,
            Expr::value(TaskStatus::Cancelled.as_str()),
        )
        .col_expr(
            task::Column::LeaseUntil,
            Expr::value(Option::<chrono::DateTime<Utc>>::None),
        )
        .col_expr(task::Column::FinishedAt, Expr::value(now))
        // An external task leaves the syncer's care (its backend's work is not undone).
        .col_expr(
            task::Column::NextSyncAt,
            Expr::value(Option::<chrono::DateTime<Utc>>::None),
        )
        .col_expr(
            task::Column::Version,
            Expr::col(task::Column::Version).add(1),
        )
        .col_expr(task::Column::UpdatedAt, Expr::value(now))
        .filter(task::Column::JobId.eq(job.id.as_str()))
        .filter(task::Column::Status.is_in([
            TaskStatus::Pending.as_str(),
            TaskStatus::Running.as_str(),
            TaskStatus::Retrying.as_str(),
        ]))
        .exec(txn)
        .await?;
    Ok(())
}

/// The stage change, final counts (`counts`: the job's tasks by status) and outbox
/// event of [`end_job_with`], once what it cancels is cancelled.
async fn finish_job<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    end: Ending,
    counts: BTreeMap<String, i64>,
) -> Result<job_event::Model, StoreError> {
    let mut events = finish_jobs(txn, vec![(job.clone(), end, counts)]).await?;
    events
        .pop()
        .ok_or_else(|| StoreError::Corrupt(format!("event of job {} vanished", job.id)))
}

/// [`finish_job`] for many jobs, locked and cancelled as their endings say: each
/// job's event made, then one statement moves them all (on PostgreSQL, when they leave
/// one stage) and one writes their outbox rows. Returns the events in `ending`'s order.
async fn finish_jobs<C: ConnectionTrait>(
    txn: &C,
    ending: Vec<(job::Model, Ending, BTreeMap<String, i64>)>,
) -> Result<Vec<job_event::Model>, StoreError> {
    let now = Utc::now();
    let mut ends = Vec::with_capacity(ending.len());
    for (job, end, counts) in ending {
        ends.push(JobEnd::make(txn, job, end, &counts, now).await?);
    }
    let backend = txn.get_database_backend();
    let one_stage = ends.windows(2).all(|pair| pair[0].from == pair[1].from);
    let moved: usize = if backend == DatabaseBackend::Postgres && one_stage && ends.len() > 1 {
        let rows: Vec<pg_batch::EndRow> = ends.iter().map(JobEnd::row).collect();
        let from = ends[0].from.as_str();
        txn.query_all_raw(pg_batch::end_jobs(&rows, from, now))
            .await?
            .len()
    } else {
        let mut moved = 0;
        for end in &ends {
            moved += end.update(now).exec(txn).await?.rows_affected as usize;
        }
        moved
    };
    if moved != ends.len() {
        return Err(StoreError::Corrupt(format!(
            "{} of {} jobs left their stage while their rows were locked",
            ends.len() - moved,
            ends.len()
        )));
    }
    let rows = ends.iter().map(|end| job_event::ActiveModel {
        job_id: Set(end.job.id.clone()),
        kind: Set(end.event.event.clone()),
        body: Set(serde_json::to_value(&end.event).expect("an event serializes")),
        on_complete: Set(end.job.on_complete.clone()),
        claimed_until: Set(Some(crate::clock::after(now, EVENT_CLAIM))),
        published_at: Set(None),
        created_at: Set(now),
        ..Default::default()
    });
    let inserted = job_event::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::column(job_event::Column::JobId)
                .do_nothing()
                .to_owned(),
        )
        .exec_with_returning(txn)
        .await;
    let mut by_job: HashMap<String, job_event::Model> = match inserted {
        Ok(events) => events.into_iter().map(|e| (e.job_id.clone(), e)).collect(),
        Err(sea_orm::DbErr::RecordNotInserted | sea_orm::DbErr::RecordNotFound(_)) => {
            HashMap::new()
        }
        Err(err) => return Err(err.into()),
    };
    let mut events = Vec::with_capacity(ends.len());
    for end in &ends {
        let event = match by_job.remove(&end.job.id) {
            Some(event) => event,
            // The event of a job that ended before (and was restored, say) stands.
            None => job_event::Entity::find()
                .filter(job_event::Column::JobId.eq(end.job.id.as_str()))
                .one(txn)
                .await?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("event of job {} vanished", end.job.id))
                })?,
        };
        events.push(event);
    }
    Ok(events)
}

/// One job's end as [`finish_jobs`] writes it.
struct JobEnd {
    job: job::Model,
    from: JobStage,
    to: JobStage,
    done: i64,
    failed: i64,
    cancelled: i64,
    first_error: Option<String>,
    result: Option<Value>,
    event: JobEvent,
}

impl JobEnd {
    /// The job's final counts from `counts` (its tasks by status), and its event.
    async fn make<C: ConnectionTrait>(
        txn: &C,
        job: job::Model,
        end: Ending,
        counts: &BTreeMap<String, i64>,
        now: chrono::DateTime<Utc>,
    ) -> Result<Self, StoreError> {
        let Ending {
            from,
            to,
            first_error,
            result,
        } = end;
        let count_of = |status: TaskStatus| counts.get(status.as_str()).copied().unwrap_or(0);
        let (done, failed, cancelled) = (
            count_of(TaskStatus::Done),
            count_of(TaskStatus::Failed),
            count_of(TaskStatus::Cancelled),
        );
        let failed_task_ids: Vec<i64> = if failed == 0 {
            Vec::new()
        } else {
            task::Entity::find()
                .select_only()
                .column(task::Column::Id)
                .filter(task::Column::JobId.eq(job.id.as_str()))
                .filter(task::Column::Status.eq(TaskStatus::Failed.as_str()))
                .order_by_asc(task::Column::Id)
                .limit(FAILED_IDS_IN_EVENT)
                .into_tuple()
                .all(txn)
                .await?
        };
        let (results, results_withheld) = results_for_event(txn, &job, done + failed).await?;
        let (event_result, result_withheld) = result_for_event(&job.id, result.clone());
        let event = JobEvent {
            version: SCHEMA_VERSION,
            event: to.event_kind().to_owned(),
            job_id: job.id.clone(),
            job_type: job.job_type.clone(),
            run: job.run,
            stage: to.as_str().to_owned(),
            task_count: job.task_count,
            done,
            failed,
            cancelled,
            first_error: first_error.clone(),
            failed_task_ids,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: Some(now),
            results,
            results_withheld,
            phase: None,
            result: event_result,
            result_withheld,
        };
        Ok(Self {
            job,
            from,
            to,
            done,
            failed,
            cancelled,
            first_error,
            result,
            event,
        })
    }

    /// This end as the batch statement's row.
    fn row(&self) -> pg_batch::EndRow<'_> {
        pg_batch::EndRow {
            id: &self.job.id,
            to: self.to.as_str(),
            done: self.done,
            failed: self.failed,
            cancelled: self.cancelled,
            first_error: self.first_error.as_deref(),
            result: self.result.as_ref(),
        }
    }

    /// The compare-and-set of this job's stage, with its final counts.
    fn update(&self, now: chrono::DateTime<Utc>) -> sea_orm::UpdateMany<job::Entity> {
        job::Entity::update_many()
            .col_expr(job::Column::Stage, Expr::value(self.to.as_str()))
            .col_expr(job::Column::DoneCount, Expr::value(self.done))
            .col_expr(job::Column::FailedCount, Expr::value(self.failed))
            .col_expr(job::Column::CancelledCount, Expr::value(self.cancelled))
            .col_expr(
                job::Column::FirstError,
                Expr::value(self.first_error.clone()),
            )
            .col_expr(job::Column::Result, Expr::value(self.result.clone()))
            .col_expr(job::Column::FinishedAt, Expr::value(now))
            .col_expr(job::Column::UpdatedAt, Expr::value(now))
            .filter(job::Column::Id.eq(self.job.id.as_str()))
            .filter(job::Column::Stage.eq(self.from.as_str()))
    }
}

#[derive(FromQueryResult)]
struct StatusCount {
    status: String,
    count: i64,
}

/// Takes the row locks of those of `job_ids` at `stage` in one statement (as
/// [`lock_job`] does for one) and returns their rows.
async fn lock_jobs<C: ConnectionTrait>(
    txn: &C,
    job_ids: &[String],
    stage: JobStage,
) -> Result<Vec<job::Model>, StoreError> {
    Ok(job::Entity::update_many()
        .col_expr(job::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(one_of(
            txn.get_database_backend(),
            job::Column::Id,
            job_ids.to_vec(),
        ))
        .filter(job::Column::Stage.eq(stage.as_str()))
        .exec_with_returning(txn)
        .await?)
}

/// Takes the job's row lock (a no-op UPDATE) if it is at `stage`, and returns it.
/// Every transaction that changes a job locks the job row first, so transactions on
/// one job serialise and cannot deadlock on its task rows.
pub(super) async fn lock_job<C: ConnectionTrait>(
    txn: &C,
    job_id: &str,
    stage: JobStage,
) -> Result<Option<job::Model>, StoreError> {
    let rows = job::Entity::update_many()
        .col_expr(job::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(job::Column::Id.eq(job_id))
        .filter(job::Column::Stage.eq(stage.as_str()))
        .exec_with_returning(txn)
        .await?;
    Ok(rows.into_iter().next())
}

#[derive(FromQueryResult)]
struct JobStatusCount {
    job_id: String,
    status: String,
    count: i64,
}

/// [`count_by_status`] for several jobs in one query, by job id.
async fn count_by_job_and_status<C: ConnectionTrait>(
    db: &C,
    job_ids: &[String],
) -> Result<BTreeMap<String, BTreeMap<String, i64>>, sea_orm::DbErr> {
    let mut by_job: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    if job_ids.is_empty() {
        return Ok(by_job);
    }
    let counts = task::Entity::find()
        .select_only()
        .column(task::Column::JobId)
        .column(task::Column::Status)
        .column_as(Expr::col(task::Column::Id).count(), "count")
        .filter(one_of(
            db.get_database_backend(),
            task::Column::JobId,
            job_ids.to_vec(),
        ))
        .group_by(task::Column::JobId)
        .group_by(task::Column::Status)
        .into_model::<JobStatusCount>()
        .all(db)
        .await?;
    for count in counts {
        by_job
            .entry(count.job_id)
            .or_default()
            .insert(count.status, count.count);
    }
    Ok(by_job)
}

pub(super) async fn count_by_status<C: ConnectionTrait>(
    db: &C,
    job_id: &str,
) -> Result<BTreeMap<String, i64>, sea_orm::DbErr> {
    count_by_status_from(db, job_id, 0).await
}

/// [`count_by_status`] of the job's tasks from ordinal `first` on.
pub(super) async fn count_by_status_from<C: ConnectionTrait>(
    db: &C,
    job_id: &str,
    first: i64,
) -> Result<BTreeMap<String, i64>, sea_orm::DbErr> {
    let mut query = task::Entity::find()
        .select_only()
        .column(task::Column::Status)
        .column_as(Expr::col(task::Column::Id).count(), "count")
        .filter(task::Column::JobId.eq(job_id));
    if first > 0 {
        query = query.filter(task::Column::Ordinal.gte(first));
    }
    let counts = query
        .group_by(task::Column::Status)
        .into_model::<StatusCount>()
        .all(db)
        .await?;
    Ok(counts.into_iter().map(|c| (c.status, c.count)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(
        policy: FailurePolicy,
        tasks: i64,
        done: i64,
        failed: i64,
        cancelled: i64,
    ) -> job::Model {
        job::Model {
            on_failure: policy.as_str().into(),
            task_count: tasks,
            done_count: done,
            failed_count: failed,
            cancelled_count: cancelled,
            ..crate::store::running_job_for_tests()
        }
    }

    #[test]
    fn a_job_ends_when_its_counters_say_so() {
        use FailurePolicy::{Continue, FailFast};
        use Verdict::{Advance, End, Wait};
        let cases = [
            // (policy, tasks, done, failed, cancelled) → verdict
            ((FailFast, 3, 2, 0, 0), Wait),
            ((FailFast, 3, 3, 0, 0), End(JobStage::Done)),
            ((FailFast, 3, 1, 1, 0), End(JobStage::Failed)),
            ((Continue, 3, 1, 1, 0), Wait),
            ((Continue, 3, 2, 1, 0), End(JobStage::Failed)),
            ((Continue, 3, 2, 0, 1), End(JobStage::Done)),
            // A redelivered event counted twice must still end the job once.
            ((Continue, 3, 4, 0, 0), End(JobStage::Done)),
        ];
        for ((policy, tasks, done, failed, cancelled), verdict) in cases {
            let mut job = job(policy, tasks, done, failed, cancelled);
            assert_eq!(
                Counters::of(&job).verdict(),
                verdict,
                "{policy:?} {tasks} tasks, {done} done, {failed} failed, {cancelled} cancelled"
            );
            // A multi-stage job goes on to its next phase where a job of one stage
            // would be done; it fails as any job does.
            job.phase = Some("map".to_owned());
            let staged = match verdict {
                End(JobStage::Done) => Advance,
                other => other,
            };
            assert_eq!(Counters::of(&job).verdict(), staged);
        }
    }
}
