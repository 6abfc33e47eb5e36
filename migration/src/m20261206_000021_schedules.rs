use sea_orm_migration::{prelude::*, schema::*};

/// `schedules`: periodic jobs. One row per schedule: its cron pattern and time zone,
/// the request each tick submits, what to do with ticks missed while no pod ran, and
/// the next tick to fire (`schedules_due` finds the due ones). Firing a tick moves
/// `next_tick` on by a compare-and-set on its old value, in the transaction that
/// writes the tick's request to `job_requests`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Schedules {
    Table,
    Name,
    Cron,
    Timezone,
    Request,
    CatchUp,
    NextTick,
    LastTick,
    LastJobId,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Schedules::Table)
                    .if_not_exists()
                    .col(string_len(Schedules::Name, 96).primary_key())
                    .col(string_len(Schedules::Cron, 200))
                    .col(string_len(Schedules::Timezone, 64))
                    .col(text(Schedules::Request))
                    .col(string_len(Schedules::CatchUp, 16))
                    .col(timestamp_with_time_zone(Schedules::NextTick))
                    .col(timestamp_with_time_zone_null(Schedules::LastTick))
                    .col(string_len_null(Schedules::LastJobId, 128))
                    .col(timestamp_with_time_zone(Schedules::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("schedules_due")
                    .table(Schedules::Table)
                    .col(Schedules::NextTick)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Schedules::Table).if_exists().to_owned())
            .await
    }
}
