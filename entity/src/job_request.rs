//! The outbox of job requests: written in a producer's own transaction, published to
//! the jobs exchange by the intake's relay after the commit, and deleted once
//! confirmed, so a job exists if and only if the producer's transaction committed.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "job_requests")]
pub struct Model {
    /// The order rows are published in: a job's parts before its seal.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Sent as the message id, which names the job of a request without a `job_id`.
    pub job_id: String,
    /// The routing key.
    pub job_type: String,
    /// The request's JSON, published as it is.
    #[sea_orm(column_type = "Text")]
    pub body: String,
    /// A scheduled job's request waits until then; null: publish at once.
    pub run_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
