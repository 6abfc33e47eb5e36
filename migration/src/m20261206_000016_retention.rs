use sea_orm_migration::{prelude::*, schema::*};

/// Ended jobs leave after a retention period (the cleaner, `taskmill prune`):
///
/// - `jobs.removal_started_at`: set on a job whose tasks are too many to delete in one
///   short transaction, before they go in batches, so that a removal cut off half-way
///   is finished by the next cleaner, and a retry never brings back a job losing its
///   rows;
/// - `jobs_ended_at`: the ended jobs by when they ended, the order they leave in, and
///   `jobs_being_removed`, the few whose removal has begun;
/// - `removed_jobs`: how many jobs (and their tasks) have left, per stage, for
///   `taskmill jobs` — one row per stage, so it never grows.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Id,
    RemovalStartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum RemovedJobs {
    Table,
    Stage,
    Jobs,
    Tasks,
    LastRemovedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .add_column(
                        ColumnDef::new(Jobs::RemovalStartedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("jobs_ended_at")
                    .table(Jobs::Table)
                    .col(Jobs::FinishedAt)
                    .and_where(Expr::col(Jobs::FinishedAt).is_not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("jobs_being_removed")
                    .table(Jobs::Table)
                    .col(Jobs::Id)
                    .and_where(Expr::col(Jobs::RemovalStartedAt).is_not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RemovedJobs::Table)
                    .if_not_exists()
                    .col(string_len(RemovedJobs::Stage, 16).primary_key())
                    .col(big_integer(RemovedJobs::Jobs))
                    .col(big_integer(RemovedJobs::Tasks))
                    .col(timestamp_with_time_zone(RemovedJobs::LastRemovedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RemovedJobs::Table).to_owned())
            .await?;
        for name in ["jobs_being_removed", "jobs_ended_at"] {
            manager
                .drop_index(Index::drop().name(name).table(Jobs::Table).to_owned())
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .drop_column(Jobs::RemovalStartedAt)
                    .to_owned(),
            )
            .await
    }
}
