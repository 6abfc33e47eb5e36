use sea_orm_migration::{prelude::*, schema::*};

/// External tasks: a task handed to an external system stays `running` with the
/// backend's id for it, and the syncer polls the backend for it by next sync time.
/// The last poll and the last progress (a higher update id) are kept apart, so that a
/// task whose backend answers but never moves times out.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tasks {
    Table,
    ExternalBackend,
    ExternalId,
    ExternalAttempt,
    ExternalUpdateId,
    NextSyncAt,
    LastPollAt,
    LastProgressAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        for column in [
            string_len_null(Tasks::ExternalBackend, 100).to_owned(),
            string_len_null(Tasks::ExternalId, 255).to_owned(),
            integer_null(Tasks::ExternalAttempt).to_owned(),
            big_integer_null(Tasks::ExternalUpdateId).to_owned(),
            timestamp_with_time_zone_null(Tasks::NextSyncAt).to_owned(),
            timestamp_with_time_zone_null(Tasks::LastPollAt).to_owned(),
            timestamp_with_time_zone_null(Tasks::LastProgressAt).to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Tasks::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        // What the syncer scans: only tasks waiting on a backend, by when they are due.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS tasks_external_due ON tasks (next_sync_at) \
                 WHERE next_sync_at IS NOT NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS tasks_external_due")
            .await?;
        for column in [
            Tasks::ExternalBackend,
            Tasks::ExternalId,
            Tasks::ExternalAttempt,
            Tasks::ExternalUpdateId,
            Tasks::NextSyncAt,
            Tasks::LastPollAt,
            Tasks::LastProgressAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Tasks::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
