//! The library's top-level error: what a role or the client can fail with.

use crate::amqp::broker::BrokerError;
use crate::protocol::DecodeError;
use crate::store::StoreError;

/// Any failure of the library; [`Error::is_transient`] says whether another try may
/// succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A database failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A broker failure.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A message that cannot be decoded or fails the protocol's checks.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A configuration that cannot work: an environment variable that does not parse,
    /// or a call the setup does not allow (a cancel without a store).
    #[error("configuration: {0}")]
    Config(String),
    /// The request was parked instead of becoming a job.
    #[error("job {job_id} was rejected: {reason}")]
    Rejected {
        /// The id the request was answered for.
        job_id: String,
        /// Why it was parked.
        reason: String,
    },
    /// No job has this id.
    #[error("no job {0:?}")]
    UnknownJob(String),
    /// A retry that was refused: the job is not failed, or cannot run again.
    #[error("job {job_id} was not retried: {reason}")]
    NotRetried {
        /// The job asked to run again.
        job_id: String,
        /// Why it cannot.
        reason: String,
    },
    /// The pod's HTTP endpoint cannot listen where it was asked to.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Serve {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it cannot be bound (in use, not an address of this host, ...).
        source: std::io::Error,
    },
    /// Any other failure, by its text; counted as transient.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A stored event that does not parse is corrupt, not transient: waiting would not
    /// mend it.
    pub(crate) fn unreadable_event(job_id: &str, err: &serde_json::Error) -> Self {
        Self::Store(StoreError::Corrupt(format!(
            "stored event of {job_id} is unreadable: {err}"
        )))
    }

    /// The broker connection is lost (as opposed to one channel closed by the broker,
    /// a nack, an unroutable message, or a database or data problem): reported once
    /// per outage by the broker link rather than once per message.
    pub fn is_broker_connection(&self) -> bool {
        matches!(self, Self::Broker(err) if err.is_connection_lost())
    }

    /// The one place that decides whether a failure is worth another try (a lost
    /// connection, a busy or restarting database, a nack, a missing confirm) or is a
    /// decision to make now (the database refuses the data, the broker refuses what
    /// the message names, the message itself is bad). Intake, worker and completion
    /// all ask it: a transient failure is retried with backoff for a bounded time, a
    /// permanent one parks the request or fails the task with the reason.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(err) => err.is_transient(),
            Self::Broker(err) => err.is_transient(),
            Self::Decode(_)
            | Self::Config(_)
            | Self::Rejected { .. }
            | Self::UnknownJob(_)
            | Self::NotRetried { .. }
            | Self::Serve { .. } => false,
            Self::Other(_) => true,
        }
    }
}

impl From<crate::config::ConfigError> for Error {
    fn from(err: crate::config::ConfigError) -> Self {
        Self::Config(err.to_string())
    }
}

impl From<lapin::Error> for Error {
    fn from(err: lapin::Error) -> Self {
        Self::Broker(BrokerError::Amqp(err))
    }
}

#[cfg(test)]
mod tests {
    use super::Error;
    use crate::protocol::DecodeError;
    use crate::store::StoreError;

    #[test]
    fn database_trouble_that_may_pass_is_transient() {
        let deadlock = StoreError::Transaction("deadlock detected".into());
        assert!(Error::from(deadlock).is_transient());
        let busy = StoreError::Transaction("database is locked".into());
        assert!(Error::from(busy).is_transient());
        let restart = StoreError::Db(sea_orm::DbErr::Custom(
            "the database system is shutting down".into(),
        ));
        assert!(Error::from(restart).is_transient());
    }

    #[test]
    fn refusals_and_bad_data_are_decided_at_once() {
        let refused = StoreError::Db(sea_orm::DbErr::Custom(
            "unsupported Unicode escape sequence".into(),
        ));
        assert!(!Error::from(refused).is_transient());
        assert!(!Error::from(StoreError::Corrupt("two rows".into())).is_transient());
        assert!(!Error::from(DecodeError::TooLarge { size: 2, limit: 1 }).is_transient());
        let rejected = Error::Rejected {
            job_id: "j".into(),
            reason: "unknown pool".into(),
        };
        assert!(!rejected.is_transient());
        assert!(!Error::Config("bad".into()).is_transient());
    }
}
