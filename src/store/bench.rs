//! Measurement support for `taskmill bench`: the database baseline (a scratch table
//! updated one row and 100 rows per statement), the server's own counters, and task
//! latencies. Nothing in the pipeline uses these.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, EntityTrait, QueryFilter, QuerySelect, Statement,
};

use super::{task, Store, StoreError};

const TABLE: &str = "taskmill_bench_rows";

/// Cumulative server counters (PostgreSQL only).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerCounters {
    pub transactions: i64,
    pub rows_written: i64,
}

impl Store {
    /// Creates the scratch table with `rows` rows.
    pub async fn bench_prepare(&self, rows: i64) -> Result<(), StoreError> {
        self.bench_drop().await?;
        self.db
            .execute_unprepared(&format!(
                "CREATE TABLE {TABLE} (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)"
            ))
            .await?;
        let ids: Vec<i64> = (1..=rows).collect();
        for chunk in ids.chunks(500) {
            let values: Vec<String> = chunk.iter().map(|id| format!("({id}, 0)")).collect();
            self.db
                .execute_unprepared(&format!(
                    "INSERT INTO {TABLE} (id, n) VALUES {}",
                    values.join(", ")
                ))
                .await?;
        }
        Ok(())
    }

    /// One single-row UPDATE by primary key (its own transaction).
    pub async fn bench_update_one(&self, id: i64) -> Result<(), StoreError> {
        let sql = match self.backend() {
            DatabaseBackend::Postgres => format!("UPDATE {TABLE} SET n = n + 1 WHERE id = $1"),
            _ => format!("UPDATE {TABLE} SET n = n + 1 WHERE id = ?"),
        };
        self.db
            .execute_raw(Statement::from_sql_and_values(
                self.backend(),
                sql,
                [id.into()],
            ))
            .await?;
        Ok(())
    }

    /// One UPDATE of many rows by primary key (its own transaction).
    pub async fn bench_update_many(&self, ids: &[i64]) -> Result<(), StoreError> {
        let list: Vec<String> = ids.iter().map(i64::to_string).collect();
        self.db
            .execute_unprepared(&format!(
                "UPDATE {TABLE} SET n = n + 1 WHERE id IN ({})",
                list.join(", ")
            ))
            .await?;
        Ok(())
    }

    pub async fn bench_drop(&self) -> Result<(), StoreError> {
        self.db
            .execute_unprepared(&format!("DROP TABLE IF EXISTS {TABLE}"))
            .await?;
        Ok(())
    }

    /// Transactions and rows written so far in this database, as PostgreSQL counts
    /// them (its statistics lag by up to a second); `None` on SQLite.
    pub async fn server_counters(&self) -> Result<Option<ServerCounters>, StoreError> {
        if self.backend() != DatabaseBackend::Postgres {
            return Ok(None);
        }
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT (xact_commit + xact_rollback)::bigint AS transactions, \
                 (tup_inserted + tup_updated + tup_deleted)::bigint AS rows_written \
                 FROM pg_stat_database WHERE datname = current_database()",
            ))
            .await?;
        Ok(row.map(|row| ServerCounters {
            transactions: row.try_get("", "transactions").unwrap_or(0),
            rows_written: row.try_get("", "rows_written").unwrap_or(0),
        }))
    }

    /// When each task of a job finished.
    pub async fn finish_times(&self, job_id: &str) -> Result<Vec<DateTime<Utc>>, StoreError> {
        self.retrying("read finish times", || async {
            let times: Vec<Option<DateTime<Utc>>> = task::Entity::find()
                .select_only()
                .column(task::Column::FinishedAt)
                .filter(task::Column::JobId.eq(job_id))
                .into_tuple()
                .all(&self.db)
                .await?;
            Ok(times.into_iter().flatten().collect())
        })
        .await
    }
}
