use sea_orm_migration::{prelude::*, schema::*};

/// What untrusted producers need the schema to remember:
///
/// - the fate of a job event's producer-named `on_complete` target, kept apart from the
///   events exchange: a target that does not exist is retried a few times with backoff
///   and then given up, and `taskmill status` says why;
/// - a digest of the request that created a job, so a second, different request with
///   the same `job_id` is refused instead of mixing its tasks into the first;
/// - the job's limit on how long one attempt of its tasks may run.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    RequestDigest,
    TaskTimeoutMs,
}

#[derive(DeriveIden)]
enum JobEvents {
    Table,
    TargetAttempts,
    TargetError,
    TargetRetryAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        for column in [
            integer(JobEvents::TargetAttempts).default(0).to_owned(),
            text_null(JobEvents::TargetError).to_owned(),
            timestamp_with_time_zone_null(JobEvents::TargetRetryAt).to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(JobEvents::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        for column in [
            string_len_null(Jobs::RequestDigest, 64).to_owned(),
            big_integer_null(Jobs::TaskTimeoutMs).to_owned(),
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
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            JobEvents::TargetAttempts,
            JobEvents::TargetError,
            JobEvents::TargetRetryAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(JobEvents::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        for column in [Jobs::RequestDigest, Jobs::TaskTimeoutMs] {
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
