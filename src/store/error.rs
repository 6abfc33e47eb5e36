//! Store errors, and which of them are worth retrying.

use sea_orm::DbErr;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] DbErr),
    #[error("database: {0}")]
    Transaction(String),
    #[error("job {0:?} not found")]
    JobNotFound(String),
    #[error("job {job_id:?}: expected {expected} task rows, found {found}")]
    TaskCountMismatch {
        job_id: String,
        expected: i64,
        found: i64,
    },
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

    pub fn db_is_transient(err: &DbErr) -> bool {
        match err {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
            other => text_is_transient(&other.to_string()),
        }
    }
}

fn text_is_transient(text: &str) -> bool {
    const MARKERS: [&str; 14] = [
        "deadlock",
        "could not serialize",
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
