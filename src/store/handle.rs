//! The [`Store`] handle: its connection pool, migrations, and the retry policy every
//! statement runs under.

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use std::future::Future;
use std::pin::Pin;

use sea_orm::sqlx::postgres::PgPoolOptions;
use sea_orm::sqlx::sqlite::SqlitePoolOptions;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, SqlxPostgresConnector, SqlxSqliteConnector, TransactionTrait,
};

use super::error::StoreError;

const SQLITE_POOL: u32 = 4;
/// Prepared statements kept per SQLite connection (sqlx keeps 100). The batch
/// statements differ in text with their row count, and each compiled one holds its
/// whole program in the worker's memory: 100 of them per connection cost S2's worker
/// tens of MiB. The few statements that repeat stay cached.
const SQLITE_STATEMENT_CACHE: usize = 24;

/// The database: a connection pool to PostgreSQL or SQLite, every statement retried on
/// transient errors. Clones share the pool.
#[derive(Clone, Debug)]
pub struct Store {
    pub(super) db: DatabaseConnection,
    /// The cap on the payloads the store makes itself: a reduce or finalize task's
    /// input, a job's result ([`crate::caps`]).
    pub(super) payload_cap: usize,
}

impl Store {
    /// Connects to `url` with at most `pool_size` connections (at most 4 on SQLite, in
    /// WAL mode), retrying transient failures for up to 90 s. It does not migrate: see
    /// [`Self::migrate`].
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        // SQLite has one writer at a time: more connections add page caches and lock
        // contention, not throughput.
        let pool_size = if url.starts_with("sqlite") {
            pool_size.min(SQLITE_POOL)
        } else {
            pool_size
        };
        let mut options = ConnectOptions::new(url.to_owned());
        options
            .max_connections(pool_size)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .sqlx_logging(false)
            // WAL lets readers run beside the one writer; a long busy timeout turns
            // SQLite's single-writer lock into waiting rather than errors.
            .map_sqlx_sqlite_opts(|opts| {
                opts.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(30))
                    .statement_cache_capacity(SQLITE_STATEMENT_CACHE)
            })
            // Statements are prepared once per connection, and PostgreSQL keeps the
            // generic plan it chose for the table as it was then: prepared while the
            // tasks table was nearly empty, the batch UPDATEs kept scanning the whole
            // table per batch as it grew (until an ANALYZE, which may never come),
            // 4,700 pages per call at 110,000 rows. Plan every execution for its values.
            .map_sqlx_postgres_opts(|opts| {
                opts.options([("plan_cache_mode", "force_custom_plan")])
            });
        let db =
            crate::retry::transient("connect to database", StoreError::db_is_transient, || {
                Database::connect(options.clone())
            })
            .await?;
        Ok(Self {
            db,
            payload_cap: crate::caps::DEFAULT_MAX_PAYLOAD_BYTES,
        })
    }

    /// The same store, capping the payloads it makes at `bytes` (a pod's
    /// `max_payload_bytes`).
    pub fn with_payload_cap(mut self, bytes: usize) -> Self {
        self.payload_cap = bytes;
        self
    }

    /// A store of its own over the same database, for readers that must never hold
    /// up the pipeline (the dashboard): at most `connections` connections, opened when
    /// first needed, and on PostgreSQL a `statement_timeout` on each, so a slow page
    /// is cancelled by the server rather than left running. (SQLite has no statement
    /// timeout: its callers bound their wait themselves.)
    pub fn reader(&self, connections: u32, statement_timeout: Duration) -> Self {
        let connections = connections.max(1);
        let db = match self.backend() {
            DatabaseBackend::Postgres => {
                let options = self
                    .db
                    .get_postgres_connection_pool()
                    .connect_options()
                    .as_ref()
                    .clone()
                    .options([(
                        "statement_timeout",
                        statement_timeout.as_millis().to_string(),
                    )]);
                SqlxPostgresConnector::from_sqlx_postgres_pool(
                    small_pool(PgPoolOptions::new(), connections, statement_timeout)
                        .connect_lazy_with(options),
                )
            }
            _ => {
                let options = self
                    .db
                    .get_sqlite_connection_pool()
                    .connect_options()
                    .as_ref()
                    .clone();
                SqlxSqliteConnector::from_sqlx_sqlite_pool(
                    small_pool(SqlitePoolOptions::new(), connections, statement_timeout)
                        .connect_lazy_with(options),
                )
            }
        };
        Self {
            db,
            payload_cap: self.payload_cap,
        }
    }

    /// Which database it is: PostgreSQL or SQLite.
    pub fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    /// Applies pending migrations. On PostgreSQL an advisory lock serialises pods
    /// that start at once; SQLite's file lock does the same for it.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        if self.backend() == DatabaseBackend::Postgres {
            let txn = self.db.begin().await?;
            txn.execute_unprepared("SELECT pg_advisory_xact_lock(7215862)")
                .await?;
            Migrator::up(&txn, None).await?;
            txn.commit().await?;
        } else {
            Migrator::up(&self.db, None).await?;
        }
        Ok(())
    }

    /// Whether the database answers now: one round trip, not retried (for probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    /// How many of this version's migrations the database lacks; not retried.
    pub async fn pending_migrations(&self) -> Result<usize, StoreError> {
        Ok(Migrator::get_pending_migrations(&self.db).await?.len())
    }

    /// Closes the connection pool.
    pub async fn close(self) -> Result<(), StoreError> {
        Ok(self.db.close().await?)
    }

    /// Runs `work` in one transaction on a task of its own, so that the transaction
    /// ends in a commit or a rollback even when its caller is dropped half-way (a role
    /// stopped at shutdown, a browser that closed its request): cut off in the middle
    /// of a statement, it could leave its connection in the pool still inside the
    /// transaction, holding the locks it took.
    pub(super) async fn transact<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(
                &'c DatabaseTransaction,
            )
                -> Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'c>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let db = self.db.clone();
        tokio::spawn(async move { db.transaction::<F, T, StoreError>(work).await })
            .await
            .map_err(|err| StoreError::Transaction(format!("a transaction's task failed: {err}")))?
            .map_err(StoreError::from)
    }

    pub(super) async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        crate::retry::transient(what, StoreError::is_transient, op).await
    }
}

/// A pool of at most `connections`, none kept open while idle, whose callers wait at
/// most `wait` for a connection.
fn small_pool<DB: sea_orm::sqlx::Database>(
    options: sea_orm::sqlx::pool::PoolOptions<DB>,
    connections: u32,
    wait: Duration,
) -> sea_orm::sqlx::pool::PoolOptions<DB> {
    options
        .max_connections(connections)
        .min_connections(0)
        .acquire_timeout(wait)
}
