use sea_orm_migration::{prelude::*, schema::*};

/// The worker pools a deployment serves, registered by the pods that consume them and
/// refreshed while they do: the intake accepts requests only for known pools (so a
/// producer cannot name a work queue into existence), and a running job whose pool
/// has not been consumed for a while is reported instead of waiting silently.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Pools {
    Table,
    Name,
    LastSeenAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Pools::Table)
                    .if_not_exists()
                    .col(string_len(Pools::Name, 100).primary_key())
                    .col(timestamp_with_time_zone(Pools::LastSeenAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Pools::Table).if_exists().to_owned())
            .await
    }
}
