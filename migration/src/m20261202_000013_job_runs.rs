use sea_orm_migration::prelude::*;

/// A failed job can be retried: its failed and cancelled tasks run again and the job
/// ends once more. `run` counts the job's runs (1 for the first); its event and its
/// task messages carry it, so that consumers and external backends tell the runs apart.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Run,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .add_column(ColumnDef::new(Jobs::Run).integer().not_null().default(1))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .drop_column(Jobs::Run)
                    .to_owned(),
            )
            .await
    }
}
