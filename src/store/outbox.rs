//! The job-event outbox: claim, publish, mark published; and the fate of each event's
//! `on_complete` target.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Statement,
};

use super::error::StoreError;
use super::handle::Store;
use super::pg_batch::one_of;
use crate::clock;
use entity::job_event;

/// How long the process that ends a job owns the publishing of its event before the
/// outbox relay may publish it instead: twice the longest a confirm may take (30 s),
/// so a slow confirm does not let the relay send the event a second time beside it.
/// The publisher's floor checks the two agree (`messages::events`).
pub const EVENT_CLAIM: Duration = Duration::from_secs(60);

/// What one try at an event's `on_complete` target came to.
#[derive(Clone, Debug)]
pub enum TargetOutcome {
    /// The target took the event.
    Sent {
        /// Tries at the target so far, this one included.
        attempts: i32,
    },
    /// The try failed.
    Failed {
        /// Tries at the target so far, this one included.
        attempts: i32,
        /// What went wrong, naming the exchange and routing key.
        error: String,
        /// When to try again; `None`: given up.
        retry_in: Option<Duration>,
    },
}

impl TargetOutcome {
    fn apply(
        &self,
        update: sea_orm::UpdateMany<job_event::Entity>,
    ) -> sea_orm::UpdateMany<job_event::Entity> {
        let (attempts, error, retry_at) = match self {
            Self::Sent { attempts } => (*attempts, None, None),
            Self::Failed {
                attempts,
                error,
                retry_in,
            } => (
                *attempts,
                Some(error.clone()),
                retry_in.map(clock::from_now),
            ),
        };
        update
            .col_expr(job_event::Column::TargetAttempts, Expr::value(attempts))
            .col_expr(job_event::Column::TargetError, Expr::value(error))
            .col_expr(job_event::Column::TargetRetryAt, Expr::value(retry_at))
    }
}

impl Store {
    /// Events not yet published whose claim has lapsed (their publisher died or
    /// failed), oldest first.
    pub async fn stray_events(&self, limit: u64) -> Result<Vec<job_event::Model>, StoreError> {
        self.retrying("list unpublished events", || async {
            Ok(job_event::Entity::find()
                .filter(job_event::Column::PublishedAt.is_null())
                .filter(
                    Condition::any()
                        .add(job_event::Column::ClaimedUntil.is_null())
                        .add(job_event::Column::ClaimedUntil.lt(Utc::now())),
                )
                .order_by_asc(job_event::Column::Id)
                .limit(limit)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Claims a stray event for publishing; `false` if someone else holds it.
    pub async fn claim_event(&self, event_id: i64) -> Result<bool, StoreError> {
        self.retrying("claim event", || async {
            let now = Utc::now();
            let claimed = job_event::Entity::update_many()
                .col_expr(
                    job_event::Column::ClaimedUntil,
                    Expr::value(clock::after(now, EVENT_CLAIM)),
                )
                .filter(job_event::Column::Id.eq(event_id))
                .filter(job_event::Column::PublishedAt.is_null())
                .filter(
                    Condition::any()
                        .add(job_event::Column::ClaimedUntil.is_null())
                        .add(job_event::Column::ClaimedUntil.lt(now)),
                )
                .exec(&self.db)
                .await?;
            Ok(claimed.rows_affected == 1)
        })
        .await
    }

    /// Marks events confirmed by the events exchange, each with what became of its
    /// target (if it has one) on the same try: one statement for the events without
    /// a target, one per number of tries for those whose target took them, one for
    /// each whose target failed — all in one transaction when there are several.
    pub async fn mark_events_published(
        &self,
        events: &[(i64, Option<TargetOutcome>)],
    ) -> Result<(), StoreError> {
        let mut plain = Vec::new();
        let mut sent: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        let mut failed = Vec::new();
        for (id, target) in events {
            match target {
                None => plain.push(*id),
                Some(TargetOutcome::Sent { attempts }) => {
                    sent.entry(*attempts).or_default().push(*id)
                }
                Some(outcome @ TargetOutcome::Failed { .. }) => failed.push((*id, outcome.clone())),
            }
        }
        let backend = self.backend();
        let now = Utc::now();
        let mut statements: Vec<sea_orm::UpdateMany<job_event::Entity>> = Vec::new();
        let published = || {
            job_event::Entity::update_many()
                .col_expr(job_event::Column::PublishedAt, Expr::value(now))
        };
        if !plain.is_empty() {
            statements.push(published().filter(one_of(backend, job_event::Column::Id, plain)));
        }
        for (attempts, ids) in sent {
            statements.push(
                TargetOutcome::Sent { attempts }
                    .apply(published())
                    .filter(one_of(backend, job_event::Column::Id, ids)),
            );
        }
        for (id, outcome) in failed {
            statements.push(
                outcome
                    .apply(published())
                    .filter(job_event::Column::Id.eq(id)),
            );
        }
        let statements: Vec<Statement> = statements
            .into_iter()
            .map(|update| backend.build(&update.into_query()))
            .collect();
        self.retrying("mark events published", || async {
            if let [one] = statements.as_slice() {
                self.db.execute_raw(one.clone()).await?;
                return Ok(());
            }
            let statements = statements.clone();
            self.transact(move |txn| {
                Box::pin(async move {
                    for statement in statements {
                        txn.execute_raw(statement).await?;
                    }
                    Ok(())
                })
            })
            .await
        })
        .await
    }

    /// Published events whose target is due for another try.
    pub async fn targets_due(&self, limit: u64) -> Result<Vec<job_event::Model>, StoreError> {
        self.retrying("list targets due", || async {
            Ok(job_event::Entity::find()
                .filter(job_event::Column::PublishedAt.is_not_null())
                .filter(job_event::Column::TargetRetryAt.lt(Utc::now()))
                .order_by_asc(job_event::Column::TargetRetryAt)
                .limit(limit)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Claims the next try at an event's target (a compare-and-set on the time it was
    /// due, moved past the claim window); `false` if another relay took it.
    pub async fn claim_target(&self, event: &job_event::Model) -> Result<bool, StoreError> {
        let Some(due) = event.target_retry_at else {
            return Ok(false);
        };
        self.retrying("claim target", || async {
            let claimed = job_event::Entity::update_many()
                .col_expr(
                    job_event::Column::TargetRetryAt,
                    Expr::value(clock::from_now(EVENT_CLAIM)),
                )
                .filter(job_event::Column::Id.eq(event.id))
                .filter(job_event::Column::TargetRetryAt.eq(due))
                .exec(&self.db)
                .await?;
            Ok(claimed.rows_affected == 1)
        })
        .await
    }

    /// Records a try at an event's target.
    pub async fn record_target(
        &self,
        event_id: i64,
        outcome: TargetOutcome,
    ) -> Result<(), StoreError> {
        self.retrying("record target", || async {
            outcome
                .apply(job_event::Entity::update_many())
                .filter(job_event::Column::Id.eq(event_id))
                .exec(&self.db)
                .await?;
            Ok(())
        })
        .await
    }

    /// Job events written but not yet confirmed by the broker.
    pub async fn unpublished_event_count(&self) -> Result<u64, StoreError> {
        self.retrying("count unpublished events", || async {
            Ok(job_event::Entity::find()
                .filter(job_event::Column::PublishedAt.is_null())
                .count(&self.db)
                .await?)
        })
        .await
    }

    /// The outbox row of the job's event; `None` until the job has ended.
    pub async fn job_event(&self, job_id: &str) -> Result<Option<job_event::Model>, StoreError> {
        self.retrying("read event", || async {
            Ok(job_event::Entity::find()
                .filter(job_event::Column::JobId.eq(job_id))
                .one(&self.db)
                .await?)
        })
        .await
    }
}
