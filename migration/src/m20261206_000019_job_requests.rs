use sea_orm_migration::{prelude::*, schema::*};

/// `job_requests`: the outbox of job requests written in a producer's own transaction
/// (`taskmill::submit_in`, or an INSERT from any language). A relay in the intake's
/// pods publishes each row to the jobs exchange and deletes it once the broker
/// confirmed it, so a row lives only until its request is on its way: a row without
/// `run_at` at once, in id order (`job_requests_now`), and the request of a scheduled
/// job once its `run_at` has come (`job_requests_due`). Both reads stay small however
/// many requests wait for a later time.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum JobRequests {
    Table,
    Id,
    JobId,
    JobType,
    Body,
    RunAt,
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
                    .col(timestamp_with_time_zone_null(JobRequests::RunAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("job_requests_now")
                    .table(JobRequests::Table)
                    .col(JobRequests::Id)
                    .and_where(Expr::col(JobRequests::RunAt).is_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("job_requests_due")
                    .table(JobRequests::Table)
                    .col(JobRequests::RunAt)
                    .col(JobRequests::Id)
                    .and_where(Expr::col(JobRequests::RunAt).is_not_null())
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
