use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

/// On PostgreSQL each partition of the tasks table gets its own unique index on `id`
/// alone, in place of the partitioned table's primary key `(id, filed_at)`.
///
/// Why: claims and finishes look tasks up by id, a batch of up to a few hundred at a
/// time, without knowing their `filed_at`. A partition the planner has no statistics
/// for (a fresh one, and every one when autovacuum is off) gets the default estimate
/// of 200 distinct ids, so it expects each id to match hundreds of rows and reads the
/// whole partition, once per batch, instead of probing its index: finishes ran at a
/// third of their speed until an ANALYZE. A unique index on `id` alone tells the
/// planner that an id matches one row, statistics or not. PostgreSQL only enforces a
/// unique index across partitions when it holds the partition key, hence one per
/// partition; ids come from one sequence, so they are unique across partitions too.
///
/// The cleaner makes each new partition with the same index
/// (`taskmill::store::partitions`).
#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
ALTER TABLE tasks DROP CONSTRAINT tasks_pkey;
DO $$
DECLARE leaf regclass;
BEGIN
    FOR leaf IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'tasks'::regclass
    LOOP
        EXECUTE format('CREATE UNIQUE INDEX %I ON %s (id)', leaf::text || '_id', leaf);
    END LOOP;
END $$;
"#;

const DOWN: &str = r#"
DO $$
DECLARE leaf regclass;
BEGIN
    FOR leaf IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'tasks'::regclass
    LOOP
        EXECUTE format('DROP INDEX IF EXISTS %I', leaf::text || '_id');
    END LOOP;
END $$;
ALTER TABLE tasks ADD CONSTRAINT tasks_pkey PRIMARY KEY (id, filed_at);
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager.get_connection().execute_unprepared(UP).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager.get_connection().execute_unprepared(DOWN).await?;
        }
        Ok(())
    }
}
