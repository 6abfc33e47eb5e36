use sea_orm_migration::prelude::*;

/// `taskmill jobs` lists the newest jobs first: an index on the creation time, so that
/// the listing reads the jobs it shows instead of sorting every job ever run.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("jobs_created_at")
                    .table(Jobs::Table)
                    .col(Jobs::CreatedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("jobs_created_at")
                    .table(Jobs::Table)
                    .to_owned(),
            )
            .await
    }
}
