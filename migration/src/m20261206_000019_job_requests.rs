use sea_orm_migration::{prelude::*, schema::*};

/// `job_requests`: the outbox of job requests written in a producer's own transaction
/// (`taskmill::submit_in`, or an INSERT from any language). A relay in the intake's
/// pods publishes each row to the jobs exchange in id order and deletes it once the
/// broker confirmed it, so a row lives only until its request is on its way.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum JobRequests {
    Table,
    Id,
    JobId,
    JobType,
    Body,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(JobRequests::Table)
                    .if_not_exists()
                    .col(big_pk_auto(JobRequests::Id))
                    .col(string_len(JobRequests::JobId, 128))
                    .col(string_len(JobRequests::JobType, 200))
                    .col(text(JobRequests::Body))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(JobRequests::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
