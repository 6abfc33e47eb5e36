//! How many jobs, and tasks of theirs, retention has removed, per stage they ended in.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "removed_jobs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub stage: String,
    pub jobs: i64,
    pub tasks: i64,
    pub last_removed_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
