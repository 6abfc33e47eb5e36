use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

/// Cheaper task updates: every claim and finish rewrote three secondary indexes.
///
/// - `tasks_job_id_status` goes: per-job queries use `tasks_job_id_ordinal`'s prefix.
/// - `tasks_status_updated_at` becomes a partial index of unfinished tasks only (what
///   the sweeper scans), so finishing a task adds no index entry.
/// - `tasks.counted` goes: jobs now count finished tasks in the transaction that
///   finishes them.
/// - On PostgreSQL, free space on each page lets most updates stay on their page (HOT).
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX IF EXISTS tasks_job_id_status")
            .await?;
        db.execute_unprepared("DROP INDEX IF EXISTS tasks_status_updated_at")
            .await?;
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS tasks_unfinished_updated_at ON tasks (updated_at) \
             WHERE status IN ('pending', 'running', 'retrying')",
        )
        .await?;
        db.execute_unprepared("ALTER TABLE tasks DROP COLUMN counted")
            .await?;
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            db.execute_unprepared("ALTER TABLE tasks SET (fillfactor = 80)")
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "ALTER TABLE tasks ADD COLUMN counted BOOLEAN NOT NULL DEFAULT FALSE",
        )
        .await?;
        db.execute_unprepared("DROP INDEX IF EXISTS tasks_unfinished_updated_at")
            .await?;
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS tasks_status_updated_at ON tasks (status, updated_at)",
        )
        .await?;
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS tasks_job_id_status ON tasks (job_id, status)",
        )
        .await?;
        Ok(())
    }
}
