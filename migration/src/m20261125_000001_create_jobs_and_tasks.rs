use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Id,
    Type,
    Queue,
    Stage,
    Params,
    MaxRetries,
    RetryDelayMs,
    OnFailure,
    TaskCount,
    FirstTaskId,
    DoneCount,
    FailedCount,
    CancelledCount,
    FirstError,
    OnComplete,
    TasksPublished,
    CreatedAt,
    UpdatedAt,
    StartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Id,
    JobId,
    Ordinal,
    Type,
    Payload,
    Status,
    Attempts,
    Deliveries,
    Info,
    Result,
    Version,
    Counted,
    ClaimedBy,
    LeaseUntil,
    CreatedAt,
    UpdatedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum JobEvents {
    Table,
    Id,
    JobId,
    Kind,
    Body,
    OnComplete,
    ClaimedUntil,
    PublishedAt,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Jobs::Table)
                    .if_not_exists()
                    .col(string_len(Jobs::Id, 128).primary_key())
                    .col(string_len(Jobs::Type, 255))
                    .col(string_len(Jobs::Queue, 255))
                    .col(string_len(Jobs::Stage, 16))
                    .col(json_binary(Jobs::Params))
                    .col(integer(Jobs::MaxRetries))
                    .col(big_integer(Jobs::RetryDelayMs))
                    .col(string_len(Jobs::OnFailure, 16))
                    .col(big_integer(Jobs::TaskCount).default(0))
                    .col(big_integer_null(Jobs::FirstTaskId))
                    .col(big_integer(Jobs::DoneCount).default(0))
                    .col(big_integer(Jobs::FailedCount).default(0))
                    .col(big_integer(Jobs::CancelledCount).default(0))
                    .col(text_null(Jobs::FirstError))
                    .col(json_binary_null(Jobs::OnComplete))
                    .col(boolean(Jobs::TasksPublished).default(false))
                    .col(timestamp_with_time_zone(Jobs::CreatedAt))
                    .col(timestamp_with_time_zone(Jobs::UpdatedAt))
                    .col(timestamp_with_time_zone_null(Jobs::StartedAt))
                    .col(timestamp_with_time_zone_null(Jobs::FinishedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("jobs_stage_updated_at")
                    .table(Jobs::Table)
                    .col(Jobs::Stage)
                    .col(Jobs::UpdatedAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Tasks::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Tasks::Id))
                    .col(string_len(Tasks::JobId, 128))
                    .col(integer(Tasks::Ordinal))
                    .col(string_len(Tasks::Type, 255))
                    .col(json_binary(Tasks::Payload))
                    .col(string_len(Tasks::Status, 16))
                    .col(integer(Tasks::Attempts).default(0))
                    .col(integer(Tasks::Deliveries).default(0))
                    .col(text_null(Tasks::Info))
                    .col(json_binary_null(Tasks::Result))
                    .col(big_integer(Tasks::Version).default(0))
                    .col(boolean(Tasks::Counted).default(false))
                    .col(string_len_null(Tasks::ClaimedBy, 64))
                    .col(timestamp_with_time_zone_null(Tasks::LeaseUntil))
                    .col(timestamp_with_time_zone(Tasks::CreatedAt))
                    .col(timestamp_with_time_zone(Tasks::UpdatedAt))
                    .col(timestamp_with_time_zone_null(Tasks::FinishedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("tasks_job_id_fkey")
                            .from(Tasks::Table, Tasks::JobId)
                            .to(Jobs::Table, Jobs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("tasks_job_id_ordinal")
                    .table(Tasks::Table)
                    .col(Tasks::JobId)
                    .col(Tasks::Ordinal)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("tasks_job_id_status")
                    .table(Tasks::Table)
                    .col(Tasks::JobId)
                    .col(Tasks::Status)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("tasks_status_updated_at")
                    .table(Tasks::Table)
                    .col(Tasks::Status)
                    .col(Tasks::UpdatedAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(JobEvents::Table)
                    .if_not_exists()
                    .col(big_pk_auto(JobEvents::Id))
                    .col(string_len_uniq(JobEvents::JobId, 128))
                    .col(string_len(JobEvents::Kind, 32))
                    .col(json_binary(JobEvents::Body))
                    .col(json_binary_null(JobEvents::OnComplete))
                    .col(timestamp_with_time_zone_null(JobEvents::ClaimedUntil))
                    .col(timestamp_with_time_zone_null(JobEvents::PublishedAt))
                    .col(timestamp_with_time_zone(JobEvents::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("job_events_published_at")
                    .table(JobEvents::Table)
                    .col(JobEvents::PublishedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            JobEvents::Table.into_iden(),
            Tasks::Table.into_iden(),
            Jobs::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
