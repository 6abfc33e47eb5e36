//! The library's top-level error: what a role or the client can fail with.

use crate::broker::BrokerError;
use crate::protocol::DecodeError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A failure of the broker connection or channel (as opposed to a nack, an
    /// unroutable message, or a database or data problem): reported once per outage
    /// by the broker link rather than once per message.
    pub fn is_broker_connection(&self) -> bool {
        matches!(self, Self::Broker(BrokerError::Amqp(_)))
    }
}

impl From<lapin::Error> for Error {
    fn from(err: lapin::Error) -> Self {
        Self::Broker(BrokerError::Amqp(err))
    }
}
