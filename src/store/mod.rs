//! The store: every SQL statement taskmill runs, each state change a named function.
//!
//! Transitions are conditional UPDATEs whose WHERE names the state they expect, so a
//! stale or duplicate message changes nothing (`rows_affected = 0`) instead of
//! counting twice. Every call is retried on transient errors (lost connection,
//! deadlock, serialization failure, a busy SQLite file) with the policy in
//! [`crate::retry`]; a write that timed out but landed is recognised on the retry by
//! the same conditions.

mod error;
mod job_ends;
mod jobs;
mod outbox;
mod pg_batch;
mod pools;
mod stuck;
mod tasks;

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    TransactionTrait,
};

pub use error::StoreError;
pub use job_ends::Progress;
pub use jobs::{JobStatus, NewJob, NewTask, StartOutcome};
pub use outbox::TargetOutcome;
pub use pools::SilentPool;
pub use stuck::SWEEP_WRITE_BATCH;
pub use tasks::{Claim, TaskOutcome, Transition};

pub use entity::{job, job_event, pool, task};

/// How long the process that ends a job owns the publishing of its event before the
/// outbox relay may publish it instead: twice the longest a confirm may take, so a
/// slow confirm does not let the relay send the event a second time beside it.
pub const EVENT_CLAIM: Duration =
    Duration::from_secs(2 * crate::amqp::broker::CONFIRM_TIMEOUT.as_secs());

const SQLITE_POOL: u32 = 4;

#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
}

impl Store {
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
            });
        let db =
            crate::retry::transient("connect to database", StoreError::db_is_transient, || {
                Database::connect(options.clone())
            })
            .await?;
        Ok(Self { db })
    }

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

    pub async fn close(self) -> Result<(), StoreError> {
        Ok(self.db.close().await?)
    }

    async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        crate::retry::transient(what, StoreError::is_transient, op).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_event_claim_outlives_a_slow_confirm() {
        let slowest_publish =
            crate::amqp::broker::CONFIRM_TIMEOUT + crate::amqp::broker::CLOSE_TIMEOUT;
        assert!(super::EVENT_CLAIM > slowest_publish);
    }
}
