use sea_orm_migration::prelude::*;

/// Runs are part of a task's identity: `run` is the job's run that last put the task
/// back to `pending` (1 until a retry of the failed job does). Claims and finishes
/// name the run of their message, so a message of an earlier run — still in the delay
/// ladder or redelivered when the retry started the next — claims and finishes
/// nothing. A column of the task, not a look at its job's row: every claim reading the
/// job's row was what made a claim costly before (see migration 10).
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Run,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Tasks::Table)
                    .add_column(ColumnDef::new(Tasks::Run).integer().not_null().default(1))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Tasks::Table)
                    .drop_column(Tasks::Run)
                    .to_owned(),
            )
            .await
    }
}
