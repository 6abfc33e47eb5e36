//! The outbox of job requests: rows a producer writes in its own transaction, and
//! the requests of scheduled jobs, which wait for their `run_at`; read by the
//! intake's relay and deleted once the broker confirmed them.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, Func};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, FromQueryResult,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
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
    /// Publish it then (a scheduled job's); `None`: at once.
    pub run_at: Option<DateTime<Utc>>,
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
            run_at: Set(request.run_at),
            ..Default::default()
        })
        .exec_without_returning(connection)
        .await?;
    }
    Ok(())
}

impl Store {
    /// The requests to handle now, with their sizes, at most `limit`: those to
    /// publish at once in id order, then those whose `run_at` has come, soonest
    /// first, then those whose `run_at` is past `beyond` (written by SQL past the
    /// intake's bound: the relay answers them). Each read is a range of its own index,
    /// however many wait for a later time.
    pub async fn waiting_requests(
        &self,
        limit: u64,
        now: DateTime<Utc>,
        beyond: DateTime<Utc>,
    ) -> Result<Vec<WaitingRequest>, StoreError> {
        self.retrying("list waiting requests", || async {
            let sized = || {
                job_request::Entity::find()
                    .select_only()
                    .column(job_request::Column::Id)
                    .expr_as(
                        Func::char_length(Expr::col(job_request::Column::Body)),
                        "size",
                    )
            };
            let mut waiting = sized()
                .filter(job_request::Column::RunAt.is_null())
                .order_by_asc(job_request::Column::Id)
                .limit(limit)
                .into_model::<WaitingRequest>()
                .all(&self.db)
                .await?;
            for due in [
                job_request::Column::RunAt.lte(now),
                job_request::Column::RunAt.gt(beyond),
            ] {
                let room = limit - waiting.len() as u64;
                if room == 0 {
                    break;
                }
                waiting.extend(
                    sized()
                        .filter(due)
                        .order_by_asc(job_request::Column::RunAt)
                        .order_by_asc(job_request::Column::Id)
                        .limit(room)
                        .into_model::<WaitingRequest>()
                        .all(&self.db)
                        .await?,
                );
            }
            Ok(waiting)
        })
        .await
    }

    /// Adds one request to the outbox (a part of a scheduled job, say).
    pub async fn add_request(&self, request: NewRequest) -> Result<(), StoreError> {
        self.retrying("add request", || async {
            write_requests(&self.db, vec![request.clone()]).await
        })
        .await
    }

    /// The requests `ids`, in the order given.
    pub async fn requests(&self, ids: Vec<i64>) -> Result<Vec<job_request::Model>, StoreError> {
        let backend = self.backend();
        let mut rows = self
            .retrying("read requests", || async {
                Ok(job_request::Entity::find()
                    .filter(one_of(backend, job_request::Column::Id, ids.clone()))
                    .all(&self.db)
                    .await?)
            })
            .await?;
        rows.sort_by_key(|row| ids.iter().position(|id| *id == row.id));
        Ok(rows)
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

    /// Requests to publish now and not yet published.
    pub async fn waiting_request_count(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.retrying("count waiting requests", || async {
            Ok(job_request::Entity::find()
                .filter(
                    Condition::any()
                        .add(job_request::Column::RunAt.is_null())
                        .add(job_request::Column::RunAt.lte(now)),
                )
                .count(&self.db)
                .await?)
        })
        .await
    }
}
