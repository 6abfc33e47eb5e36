//! The bench's own SQL, kept out of the production `Store`: the database baseline's
//! scratch table (updated one row and 100 rows per statement), PostgreSQL's own
//! counters of transactions, rows and WAL written, and the sizes of the database and
//! its tasks table.

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, QueryResult,
    Statement,
};
use serde::Serialize;

const TABLE: &str = "taskmill_bench_rows";
/// The partitions of `tasks`, with their indexes and TOAST, in bytes.
const TASKS_BYTES: &str = "(SELECT COALESCE(SUM(pg_total_relation_size(inhrelid)), 0)::bigint \
     FROM pg_inherits WHERE inhparent = 'tasks'::regclass)";

/// How large the database is now.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sizes {
    /// PostgreSQL: `pg_database_size`; SQLite: the file's pages (its WAL aside).
    pub database_bytes: i64,
    /// The tasks table with its indexes (PostgreSQL).
    pub tasks_bytes: Option<i64>,
    /// The jobs table with its indexes (PostgreSQL).
    pub jobs_bytes: Option<i64>,
    /// The partitions of the tasks table (PostgreSQL).
    pub partitions: Option<i64>,
    /// Pages of the file on SQLite's free list, reused before the file grows.
    pub free_bytes: Option<i64>,
}

/// Cumulative server counters (PostgreSQL only).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerCounters {
    pub transactions: i64,
    pub rows_written: i64,
    /// The server's WAL position in bytes: what every database wrote to the log.
    pub wal_bytes: i64,
    /// The `tasks` table with its indexes and TOAST, in bytes.
    pub tasks_bytes: i64,
}

/// A connection pool of the bench's own, apart from the pipeline's.
pub struct BenchDb {
    db: DatabaseConnection,
}

impl BenchDb {
    pub async fn connect(url: &str, pool_size: u32) -> anyhow::Result<Self> {
        let mut options = ConnectOptions::new(url.to_owned());
        options.max_connections(pool_size).sqlx_logging(false);
        Ok(Self {
            db: Database::connect(options).await?,
        })
    }

    fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    /// Creates the scratch table with `rows` rows.
    pub async fn prepare(&self, rows: i64) -> anyhow::Result<()> {
        self.drop_table().await?;
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
    pub async fn update_one(&self, id: i64) -> anyhow::Result<()> {
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
    pub async fn update_many(&self, ids: &[i64]) -> anyhow::Result<()> {
        let list: Vec<String> = ids.iter().map(i64::to_string).collect();
        self.db
            .execute_unprepared(&format!(
                "UPDATE {TABLE} SET n = n + 1 WHERE id IN ({})",
                list.join(", ")
            ))
            .await?;
        Ok(())
    }

    pub async fn drop_table(&self) -> anyhow::Result<()> {
        self.db
            .execute_unprepared(&format!("DROP TABLE IF EXISTS {TABLE}"))
            .await?;
        Ok(())
    }

    /// Transactions and rows written so far in this database, as PostgreSQL counts
    /// them (its statistics lag by up to a second); `None` on SQLite.
    pub async fn server_counters(&self) -> anyhow::Result<Option<ServerCounters>> {
        let row = self
            .postgres_row(&format!(
                "SELECT (xact_commit + xact_rollback)::bigint AS transactions, \
                 (tup_inserted + tup_updated + tup_deleted)::bigint AS rows_written, \
                 (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint AS wal_bytes, \
                 {TASKS_BYTES} AS tasks_bytes \
                 FROM pg_stat_database WHERE datname = current_database()"
            ))
            .await?;
        Ok(row.map(|row| ServerCounters {
            transactions: row.try_get("", "transactions").unwrap_or(0),
            rows_written: row.try_get("", "rows_written").unwrap_or(0),
            wal_bytes: row.try_get("", "wal_bytes").unwrap_or(0),
            tasks_bytes: row.try_get("", "tasks_bytes").unwrap_or(0),
        }))
    }

    /// The database's size now.
    pub async fn sizes(&self) -> anyhow::Result<Sizes> {
        let sql = match self.backend() {
            DatabaseBackend::Postgres => format!(
                "SELECT pg_database_size(current_database())::bigint AS database_bytes, \
                 {TASKS_BYTES} AS tasks_bytes, \
                 pg_total_relation_size('jobs')::bigint AS jobs_bytes, \
                 (SELECT COUNT(*) FROM pg_inherits \
                  WHERE inhparent = 'tasks'::regclass)::bigint AS partitions"
            ),
            _ => "SELECT page_count * page_size AS database_bytes, \
                  freelist_count * page_size AS free_bytes \
                  FROM pragma_page_count(), pragma_page_size(), pragma_freelist_count()"
                .to_owned(),
        };
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.backend(), sql))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no size"))?;
        Ok(Sizes {
            database_bytes: row.try_get("", "database_bytes")?,
            tasks_bytes: row.try_get("", "tasks_bytes").ok(),
            jobs_bytes: row.try_get("", "jobs_bytes").ok(),
            partitions: row.try_get("", "partitions").ok(),
            free_bytes: row.try_get("", "free_bytes").ok(),
        })
    }

    /// The number `sql` counts as `n`.
    pub async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(self.backend(), sql.to_owned()))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no count"))?;
        Ok(row.try_get("", "n")?)
    }

    /// Whether PostgreSQL's autovacuum is on; `None` on SQLite, which has none.
    pub async fn autovacuum(&self) -> anyhow::Result<Option<bool>> {
        let row = self
            .postgres_row("SELECT current_setting('autovacuum') = 'on' AS enabled")
            .await?;
        Ok(row.and_then(|row| row.try_get("", "enabled").ok()))
    }

    /// The one row of a query about the PostgreSQL server; `None` on SQLite.
    async fn postgres_row(&self, sql: &str) -> anyhow::Result<Option<QueryResult>> {
        if self.backend() != DatabaseBackend::Postgres {
            return Ok(None);
        }
        Ok(self
            .db
            .query_one_raw(Statement::from_string(DatabaseBackend::Postgres, sql))
            .await?)
    }

    pub async fn close(self) -> anyhow::Result<()> {
        Ok(self.db.close().await?)
    }
}
