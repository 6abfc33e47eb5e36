//! Running a failed job again: its failed and cancelled tasks go back to `pending`
//! with fresh attempts in the job's next run (their `run`, which claims and finishes
//! check), and the job back to `running` in that run, in one
//! transaction under the job's row lock; the completion role then ends it once more,
//! with one new event.

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

use super::error::StoreError;
use super::handle::Store;
use super::job_ends::lock_job;
use super::partitions;
use crate::state::{JobStage, TaskStatus};
use entity::{job, job_event, task};

/// The statuses of the tasks a retry runs again.
const AGAIN: [&str; 2] = [TaskStatus::Failed.as_str(), TaskStatus::Cancelled.as_str()];

/// What [`Store::rerun_job`] did.
#[derive(Clone, Debug)]
pub enum Rerun {
    /// The job runs again: its row as it is now (`running`, its new run), and how
    /// many of its tasks are `pending` again, to be sent.
    Started {
        /// The job's row.
        job: Box<job::Model>,
        /// Tasks put back to `pending`.
        tasks: u64,
    },
    /// The job is not retried, and why.
    Refused(String),
    /// No job has this id.
    UnknownJob,
}

/// Why `job` cannot be retried, or `None` when its row and `again` — how many of its
/// tasks are failed or cancelled — allow it: the rules [`Store::rerun_job`] applies
/// under the job's lock, and that the dashboard asks before it offers a retry.
pub fn retry_refused(job: &job::Model, again: u64) -> Option<String> {
    if job.removal_started_at.is_some() {
        return Some("the job is past its retention and being removed".into());
    }
    if job.stage != JobStage::Failed.as_str() {
        return Some(format!(
            "the job is {}: only a failed job can be retried",
            job.stage
        ));
    }
    if job.started_at.is_none() {
        return Some(
            "the job failed in formation, before all its tasks were stored: submit it again".into(),
        );
    }
    if again == 0 {
        return Some(format!(
            "no task failed or was cancelled: the job failed as a whole ({}); running it again would fail the same way",
            job.first_error.as_deref().unwrap_or("no error recorded")
        ));
    }
    None
}

impl Store {
    /// Runs a failed job's failed and cancelled tasks again (see the module docs).
    /// Refused unless the job is `failed` after running (a job whose formation failed
    /// never had all its tasks: submit it again) and its event has gone out — the
    /// event's row makes way for the next run's, so the last one must be delivered
    /// first.
    pub async fn rerun_job(&self, job_id: &str) -> Result<Rerun, StoreError> {
        self.retrying("retry a job", || async {
            let job_id = job_id.to_owned();
            self
                .transact(move |txn| {
                    Box::pin(async move {
                        partitions::lock_for_rerun(txn).await?;
                        let Some(job) = lock_job(txn, &job_id, JobStage::Failed).await? else {
                            return Ok(match job::Entity::find_by_id(&job_id).one(txn).await? {
                                // Failed since the lock was tried: a retry may still run.
                                Some(job) => Rerun::Refused(retry_refused(&job, 0).unwrap_or_else(
                                    || "the job changed while it was read: try again".into(),
                                )),
                                None => Rerun::UnknownJob,
                            });
                        };
                        if let Some(reason) = partitions::rerun_refused(txn, &job).await? {
                            return Ok(Rerun::Refused(reason));
                        }
                        let again = if job.started_at.is_some() {
                            task::Entity::find()
                                .filter(task::Column::JobId.eq(job_id.as_str()))
                                .filter(task::Column::Status.is_in(AGAIN))
                                .count(txn)
                                .await?
                        } else {
                            0
                        };
                        if let Some(reason) = retry_refused(&job, again) {
                            return Ok(Rerun::Refused(reason));
                        }

                        let event = job_event::Entity::find()
                            .filter(job_event::Column::JobId.eq(job_id.as_str()))
                            .one(txn)
                            .await?;
                        if let Some(event) = &event {
                            if event.published_at.is_none() || event.target_retry_at.is_some() {
                                return Ok(Rerun::Refused(
                                    "the job's last event is still being delivered: try again in a moment".into(),
                                ));
                            }
                            job_event::Entity::delete_by_id(event.id).exec(txn).await?;
                        }
                        let now = Utc::now();
                        let reset = task::Entity::update_many()
                            .col_expr(task::Column::Status, Expr::value(TaskStatus::Pending.as_str()))
                            .col_expr(task::Column::Attempts, Expr::value(0))
                            .col_expr(task::Column::Deliveries, Expr::value(0))
                            .col_expr(task::Column::Info, Expr::value(Option::<String>::None))
                            .col_expr(task::Column::Result, Expr::value(Option::<serde_json::Value>::None))
                            .col_expr(task::Column::ClaimedBy, Expr::value(Option::<String>::None))
                            .col_expr(task::Column::LeaseUntil, Expr::value(Option::<chrono::DateTime<Utc>>::None))
                            .col_expr(task::Column::FinishedAt, Expr::value(Option::<chrono::DateTime<Utc>>::None))
                            .col_expr(task::Column::ExternalId, Expr::value(Option::<String>::None))
                            .col_expr(task::Column::ExternalAttempt, Expr::value(Option::<i32>::None))
                            .col_expr(task::Column::ExternalUpdateId, Expr::value(Option::<i64>::None))
                            .col_expr(task::Column::NextSyncAt, Expr::value(Option::<chrono::DateTime<Utc>>::None))
                            // Attempts start over: the run tells them from the last run's.
                            .col_expr(task::Column::Run, Expr::value(job.run + 1))
                            .col_expr(task::Column::Version, Expr::col(task::Column::Version).add(1))
                            .col_expr(task::Column::UpdatedAt, Expr::value(now))
                            .filter(task::Column::JobId.eq(job_id.as_str()))
                            .filter(task::Column::Status.is_in(AGAIN))
                            .exec(txn)
                            .await?;
                        let rows = job::Entity::update_many()
                            .col_expr(job::Column::Stage, Expr::value(JobStage::Running.as_str()))
                            .col_expr(job::Column::Run, Expr::col(job::Column::Run).add(1))
                            // Its tasks are a feeder's, as a new job's are: the orphan
                            // scan finds the job and feeds its phase from the start.
                            .col_expr(job::Column::TasksPublished, Expr::value(false))
                            .col_expr(
                                job::Column::FedThrough,
                                Expr::col(job::Column::PhaseFirstOrdinal).sub(1),
                            )
                            .col_expr(job::Column::FailedCount, Expr::value(0))
                            .col_expr(job::Column::CancelledCount, Expr::value(0))
                            .col_expr(job::Column::FirstError, Expr::value(Option::<String>::None))
                            .col_expr(job::Column::FinishedAt, Expr::value(Option::<chrono::DateTime<Utc>>::None))
                            .col_expr(job::Column::UpdatedAt, Expr::value(now))
                            .filter(job::Column::Id.eq(job_id.as_str()))
                            .filter(job::Column::Stage.eq(JobStage::Failed.as_str()))
                            .exec_with_returning(txn)
                            .await?;
                        let job = rows.into_iter().next().ok_or_else(|| {
                            StoreError::Corrupt(format!("job {job_id} left failed while its row was locked"))
                        })?;
                        Ok(Rerun::Started {
                            job: Box::new(job),
                            tasks: reset.rows_affected,
                        })
                    })
                })
                .await
        })
        .await
    }
}
