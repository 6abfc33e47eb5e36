//! A periodic job: a cron pattern in a time zone, the request each tick submits, and
//! the next tick to fire.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "schedules")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// Five fields (minute to weekday), or six with seconds first.
    pub cron: String,
    /// An IANA time zone the pattern is read in (`UTC`, `Europe/Paris`).
    pub timezone: String,
    /// The request's JSON, without `job_id`: each tick's job gets `<name>:<tick>`.
    #[sea_orm(column_type = "Text")]
    pub request: String,
    /// `skip` or `all`: what a pod does with ticks missed while none ran.
    pub catch_up: String,
    /// The next tick to fire.
    pub next_tick: DateTimeUtc,
    pub last_tick: Option<DateTimeUtc>,
    pub last_job_id: Option<String>,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
