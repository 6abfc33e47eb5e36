//! Task transitions, each one conditional UPDATE naming the state it expects:
//!
//! - claim: `pending|retrying` with `attempts = n-1` → `running`, `attempts = n`; or a
//!   `running` attempt n taken over (redelivery after a dead worker, expired lease, or
//!   our own retried write), which bumps `deliveries` instead of `attempts`;
//! - finish: `running` attempt n → `done` (+ result) or `failed` (+ info);
//! - retry: `running` attempt n → `retrying` (+ info).
//!
//! Zero rows changed means the message was stale or a duplicate.

use std::time::Duration;

use chrono::Utc;
use sea_orm::sea_query::{CaseStatement, Expr, ExprTrait};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter};
use serde_json::Value;

use super::{task, Store, StoreError};
use crate::state::TaskStatus;

/// A successful claim.
#[derive(Clone, Debug)]
pub struct Claim {
    /// Claims of this attempt so far, this one included.
    pub deliveries: i32,
}

/// How an attempt ended for good.
#[derive(Clone, Debug)]
pub enum TaskOutcome {
    Done(Value),
    Failed(String),
}

fn lease_deadline(lease: Duration) -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX)
}

impl Store {
    /// Claims attempt `attempt` of a task for the holder of `token`. `redelivered`
    /// (the broker's flag) lets a running attempt be taken over: its previous holder's
    /// channel died, so nobody will finish it.
    pub async fn claim_task(
        &self,
        task_id: i64,
        attempt: i32,
        token: &str,
        redelivered: bool,
        lease: Duration,
    ) -> Result<Option<Claim>, StoreError> {
        self.retrying("claim task", || async {
            let now = Utc::now();
            let fresh = Condition::all()
                .add(
                    task::Column::Status
                        .is_in([TaskStatus::Pending.as_str(), TaskStatus::Retrying.as_str()]),
                )
                .add(task::Column::Attempts.eq(attempt - 1));
            let mut takeover_allowed = Condition::any()
                .add(task::Column::ClaimedBy.eq(token))
                .add(task::Column::LeaseUntil.lt(now));
            if redelivered {
                takeover_allowed = takeover_allowed.add(Expr::value(true));
            }
            let takeover = Condition::all()
                .add(task::Column::Status.eq(TaskStatus::Running.as_str()))
                .add(task::Column::Attempts.eq(attempt))
                .add(takeover_allowed);
            let deliveries = CaseStatement::new()
                .case(
                    task::Column::Status.eq(TaskStatus::Running.as_str()),
                    Expr::col(task::Column::Deliveries).add(1),
                )
                .finally(1);
            let claimed = task::Entity::update_many()
                .col_expr(
                    task::Column::Status,
                    Expr::value(TaskStatus::Running.as_str()),
                )
                .col_expr(task::Column::Attempts, Expr::value(attempt))
                .col_expr(task::Column::Deliveries, deliveries.into())
                .col_expr(task::Column::ClaimedBy, Expr::value(token))
                .col_expr(task::Column::LeaseUntil, Expr::value(lease_deadline(lease)))
                .col_expr(
                    task::Column::Version,
                    Expr::col(task::Column::Version).add(1),
                )
                .col_expr(task::Column::UpdatedAt, Expr::value(now))
                .filter(task::Column::Id.eq(task_id))
                .filter(Condition::any().add(fresh).add(takeover))
                .exec_with_returning(&self.db)
                .await?;
            Ok(claimed.into_iter().next().map(|row| Claim {
                deliveries: row.deliveries,
            }))
        })
        .await
    }

    /// Extends the lease of a claim that is still ours.
    pub async fn renew_lease(
        &self,
        task_id: i64,
        attempt: i32,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.retrying("renew lease", || async {
            let renewed = task::Entity::update_many()
                .col_expr(task::Column::LeaseUntil, Expr::value(lease_deadline(lease)))
                .filter(task::Column::Id.eq(task_id))
                .filter(task::Column::Status.eq(TaskStatus::Running.as_str()))
                .filter(task::Column::Attempts.eq(attempt))
                .filter(task::Column::ClaimedBy.eq(token))
                .exec(&self.db)
                .await?;
            Ok(renewed.rows_affected == 1)
        })
        .await
    }

    /// Records the final outcome of a running attempt. `false`: the attempt was no
    /// longer running (a duplicate, or the job was cancelled).
    pub async fn finish_task(
        &self,
        task_id: i64,
        attempt: i32,
        outcome: &TaskOutcome,
    ) -> Result<bool, StoreError> {
        self.retrying("finish task", || async {
            let now = Utc::now();
            let mut update = task::Entity::update_many();
            update = match outcome {
                TaskOutcome::Done(result) => update
                    .col_expr(task::Column::Status, Expr::value(TaskStatus::Done.as_str()))
                    .col_expr(task::Column::Result, Expr::value(result.clone())),
                TaskOutcome::Failed(info) => update
                    .col_expr(
                        task::Column::Status,
                        Expr::value(TaskStatus::Failed.as_str()),
                    )
                    .col_expr(task::Column::Info, Expr::value(info.as_str())),
            };
            let finished = update
                .col_expr(task::Column::FinishedAt, Expr::value(now))
                .col_expr(
                    task::Column::LeaseUntil,
                    Expr::value(Option::<chrono::DateTime<Utc>>::None),
                )
                .col_expr(
                    task::Column::Version,
                    Expr::col(task::Column::Version).add(1),
                )
                .col_expr(task::Column::UpdatedAt, Expr::value(now))
                .filter(running_attempt(task_id, attempt))
                .exec(&self.db)
                .await?;
            Ok(finished.rows_affected == 1)
        })
        .await
    }

    /// Moves a failed attempt to `retrying`, keeping its error. `false`: the attempt
    /// was no longer running.
    pub async fn retry_task(
        &self,
        task_id: i64,
        attempt: i32,
        info: &str,
    ) -> Result<bool, StoreError> {
        self.retrying("retry task", || async {
            let now = Utc::now();
            let moved = task::Entity::update_many()
                .col_expr(
                    task::Column::Status,
                    Expr::value(TaskStatus::Retrying.as_str()),
                )
                .col_expr(task::Column::Info, Expr::value(info))
                .col_expr(
                    task::Column::LeaseUntil,
                    Expr::value(Option::<chrono::DateTime<Utc>>::None),
                )
                .col_expr(
                    task::Column::Version,
                    Expr::col(task::Column::Version).add(1),
                )
                .col_expr(task::Column::UpdatedAt, Expr::value(now))
                .filter(running_attempt(task_id, attempt))
                .exec(&self.db)
                .await?;
            Ok(moved.rows_affected == 1)
        })
        .await
    }

    pub async fn task(&self, task_id: i64) -> Result<Option<task::Model>, StoreError> {
        self.retrying("read task", || async {
            Ok(task::Entity::find_by_id(task_id).one(&self.db).await?)
        })
        .await
    }
}

fn running_attempt(task_id: i64, attempt: i32) -> Condition {
    Condition::all()
        .add(task::Column::Id.eq(task_id))
        .add(task::Column::Status.eq(TaskStatus::Running.as_str()))
        .add(task::Column::Attempts.eq(attempt))
}
