use sea_orm_migration::prelude::*;

/// A feeder records how far it has published a job's task messages (`fed_through`, the
/// last ordinal sent and confirmed; -1 for none), so that the next feeder of the job —
/// after a crash, or after one that rested while a job in parts waited for its next
/// part — starts there instead of reading the job's rows again from the first.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    FedThrough,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .add_column(
                        ColumnDef::new(Jobs::FedThrough)
                            .big_integer()
                            .not_null()
                            .default(-1),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .drop_column(Jobs::FedThrough)
                    .to_owned(),
            )
            .await
    }
}
