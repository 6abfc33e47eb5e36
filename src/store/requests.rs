//! The outbox of job requests: rows a producer writes in its own transaction, read
//! by the intake's relay in id order and deleted once the broker confirmed them.

use sea_orm::sea_query::{Expr, Func};
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

use super::error::StoreError;
use super::handle::Store;
use super::pg_batch::one_of;
use entity::job_request;

/// A request to write into the outbox: its job id (sent as the message id), its
/// routing key, and its JSON.
#[derive(Clone, Debug)]
pub struct NewRequest {
    /// The job the request makes or adds to.
    pub job_id: String,
    /// The job type: the routing key.
    pub job_type: String,
    /// The request's JSON text.
    pub body: String,
}

/// A waiting request's place and size, read before its body so that one batch of
/// bodies stays within a memory budget.
#[derive(Clone, Debug, FromQueryResult)]
pub struct WaitingRequest {
    /// The row's id.
    pub id: i64,
    /// Characters of its body: a quarter of its bytes at least.
    pub size: i32,
}

/// Writes `requests` into the outbox through `connection`, the caller's transaction:
/// they exist, and are published, only if it commits. One statement per request, so
/// that a job in parts never becomes one statement of its whole size.
pub async fn write_requests<C: ConnectionTrait>(
    connection: &C,
    requests: Vec<NewRequest>,
) -> Result<(), StoreError> {
    for request in requests {
        job_request::Entity::insert(job_request::ActiveModel {
            job_id: Set(request.job_id),
            job_type: Set(request.job_type),
            body: Set(request.body),
            ..Default::default()
        })
        .exec_without_returning(connection)
        .await?;
    }
    Ok(())
}

impl Store {
    /// The oldest `limit` requests waiting to be published, with their sizes.
    pub async fn waiting_requests(&self, limit: u64) -> Result<Vec<WaitingRequest>, StoreError> {
        self.retrying("list waiting requests", || async {
            Ok(job_request::Entity::find()
                .select_only()
                .column(job_request::Column::Id)
                .expr_as(
                    Func::char_length(Expr::col(job_request::Column::Body)),
                    "size",
                )
                .order_by_asc(job_request::Column::Id)
                .limit(limit)
                .into_model::<WaitingRequest>()
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// The requests `ids`, in id order.
    pub async fn requests(&self, ids: Vec<i64>) -> Result<Vec<job_request::Model>, StoreError> {
        let backend = self.backend();
        self.retrying("read requests", || async {
            Ok(job_request::Entity::find()
                .filter(one_of(backend, job_request::Column::Id, ids.clone()))
                .order_by_asc(job_request::Column::Id)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Removes requests the broker confirmed (or that were answered without it).
    pub async fn remove_requests(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        let backend = self.backend();
        self.retrying("remove requests", || async {
            job_request::Entity::delete_many()
                .filter(one_of(backend, job_request::Column::Id, ids.clone()))
                .exec(&self.db)
                .await?;
            Ok(())
        })
        .await
    }

    /// Requests written and not yet published.
    pub async fn waiting_request_count(&self) -> Result<u64, StoreError> {
        self.retrying("count waiting requests", || async {
            Ok(job_request::Entity::find().count(&self.db).await?)
        })
        .await
    }
}
