use sea_orm_migration::{prelude::*, schema::*};

/// Jobs of more than one stage (map → reduce → finalize): what the job's type planned
/// after the map stage, which stage it is in, where that stage's tasks begin, and the
/// job's result.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    StagePlan,
    Phase,
    PhaseFirstOrdinal,
    Result,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        for column in [
            json_binary_null(Jobs::StagePlan).to_owned(),
            string_len_null(Jobs::Phase, 16).to_owned(),
            big_integer(Jobs::PhaseFirstOrdinal).default(0).to_owned(),
            json_binary_null(Jobs::Result).to_owned(),
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
            Jobs::StagePlan,
            Jobs::Phase,
            Jobs::PhaseFirstOrdinal,
            Jobs::Result,
        ] {
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
