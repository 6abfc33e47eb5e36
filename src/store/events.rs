//! The job-event outbox: claim, publish, mark published.

use chrono::Utc;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};

use super::{job_event, Store, StoreError, EVENT_CLAIM};

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
            let claim = chrono::Duration::from_std(EVENT_CLAIM).expect("claim fits");
            let claimed = job_event::Entity::update_many()
                .col_expr(job_event::Column::ClaimedUntil, Expr::value(now + claim))
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

    pub async fn mark_event_published(&self, event_id: i64) -> Result<(), StoreError> {
        self.retrying("mark event published", || async {
            job_event::Entity::update_many()
                .col_expr(job_event::Column::PublishedAt, Expr::value(Utc::now()))
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
