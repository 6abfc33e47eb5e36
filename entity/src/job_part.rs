//! One part of a job sent in parts: where its tasks go and whether they are stored.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "job_parts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub job_id: String,
    /// The part's number, from 1.
    #[sea_orm(primary_key, auto_increment = false)]
    pub number: i32,
    /// The ordinal of its first task.
    pub first_ordinal: i64,
    pub task_count: i64,
    /// SHA-256 of the part's place and tasks: a part sent again must match it.
    pub digest: String,
    /// Every task row of the part is in.
    pub stored: bool,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
