//! The outbox of job events: written in the transaction that ends a job, published
//! after the commit, so an event can be neither lost nor sent for a job that did not end.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "job_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Unique: one event per job, whoever races to end it.
    #[sea_orm(unique)]
    pub job_id: String,
    /// `job.done`, `job.failed` or `job.cancelled`.
    pub kind: String,
    pub body: Json,
    pub on_complete: Option<Json>,
    /// A publisher holds the row until then; afterwards anyone may publish it.
    pub claimed_until: Option<DateTimeUtc>,
    /// When the events exchange confirmed it.
    pub published_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    /// Publishes to `on_complete` tried so far.
    pub target_attempts: i32,
    /// Why the last publish to `on_complete` failed (cleared when one succeeds).
    pub target_error: Option<String>,
    /// When `on_complete` is tried again; none once it was reached or given up.
    pub target_retry_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
