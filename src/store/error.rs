//! Store errors, and which of them are worth retrying.

use sea_orm::DbErr;

/// A database failure; [`StoreError::is_transient`] says whether to retry it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An error of the database driver.
    #[error("database: {0}")]
    Db(#[from] DbErr),
    /// A database error known by its message only.
    #[error("database: {0}")]
    Transaction(String),
    /// A job row that should exist does not; holds its id.
    #[error("job {0:?} not found")]
    JobNotFound(String),
    /// Starting a job found another number of task rows than the job was formed with.
    #[error("job {job_id:?}: expected {expected} task rows, found {found}")]
    TaskCountMismatch {
        /// The job being started.
        job_id: String,
        /// Task rows it was formed with.
        expected: i64,
        /// Task rows found.
        found: i64,
    },
    /// Task rows were offered to a job that is not forming; holds its id.
    #[error("job {0:?} is not forming")]
    NotForming(String),
    /// Rows in a state the store's own rules exclude; says which.
    #[error("unexpected row state: {0}")]
    Corrupt(String),
}

impl From<sea_orm::TransactionError<StoreError>> for StoreError {
    fn from(err: sea_orm::TransactionError<StoreError>) -> Self {
        match err {
            sea_orm::TransactionError::Connection(db) => Self::Db(db),
            sea_orm::TransactionError::Transaction(inner) => inner,
        }
    }
}

impl StoreError {
    /// Lost connections, pool timeouts, deadlocks, serialization failures, a busy
    /// SQLite file, a server restarting: worth another try. Anything else is a bug or
    /// bad data, and retrying would only delay the error.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Db(err) => Self::db_is_transient(err),
            Self::Transaction(text) => text_is_transient(text),
            _ => false,
        }
    }

    /// [`Self::is_transient`] for a driver error.
    pub(crate) fn db_is_transient(err: &DbErr) -> bool {
        match err {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
            other => text_is_transient(&other.to_string()),
        }
    }
}

fn text_is_transient(text: &str) -> bool {
    const MARKERS: [&str; 16] = [
        "deadlock",
        "could not serialize",
        // A row the cleaner moved to the partition of kept tasks while this statement
        // waited for it (PostgreSQL's serialization failure for row movement).
        "already moved to another partition",
        // A row routed to the default partition while the cleaner attached the
        // partition it belongs to: routed again, it goes there.
        "violates partition constraint",
        "database is locked",
        "database table is locked",
        "connection",
        "timed out",
        "broken pipe",
        "terminating",
        "shutting down",
        "starting up",
        "pool",
        "io error",
        "error communicating",
        "unexpected eof",
    ];
    let lower = text.to_ascii_lowercase();
    MARKERS.iter().any(|marker| lower.contains(marker))
}
