use sea_orm_migration::{prelude::*, schema::*};

/// Jobs sent in parts: each part's place and digest, and the seal on the job.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    SealedParts,
    SealedTasks,
}

#[derive(DeriveIden)]
enum JobParts {
    Table,
    JobId,
    Number,
    FirstOrdinal,
    TaskCount,
    Digest,
    Stored,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            ColumnDef::new(Jobs::SealedParts)
                .integer()
                .null()
                .to_owned(),
            ColumnDef::new(Jobs::SealedTasks)
                .big_integer()
                .null()
                .to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Jobs::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(JobParts::Table)
                    .if_not_exists()
                    .col(string_len(JobParts::JobId, 128))
                    .col(integer(JobParts::Number))
                    .col(big_integer(JobParts::FirstOrdinal))
                    .col(big_integer(JobParts::TaskCount))
                    .col(string_len(JobParts::Digest, 64))
                    .col(boolean(JobParts::Stored).default(false))
                    .col(timestamp_with_time_zone(JobParts::CreatedAt))
                    .primary_key(Index::create().col(JobParts::JobId).col(JobParts::Number))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JobParts::Table).to_owned())
            .await?;
        for column in [Jobs::SealedParts, Jobs::SealedTasks] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Jobs::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
