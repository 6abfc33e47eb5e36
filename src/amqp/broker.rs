//! The AMQP connection and confirmed publishing.
//!
//! Every message taskmill sends is JSON, persistent and publisher-confirmed; a nack, or a
//! `mandatory` message the broker returned as unroutable, is an error, never a success.
//! A channel the broker closes (a 404, a 406) is reopened on the same connection by the
//! next publish: only a lost connection is the broker link's business.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lapin::{Confirmation, PublisherConfirm};

use crate::protocol::CONTENT_TYPE;

/// A failure talking to the broker; [`Self::is_transient`] and
/// [`Self::is_connection_lost`] classify it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    /// An error of the AMQP client, such as a lost connection or a channel the broker
    /// closed.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused a publish (a negative confirm); holds its routing key.
    #[error("the broker nacked a publish to {0:?}")]
    Nacked(String),
    /// The broker returned a `mandatory` publish that no queue took.
    #[error("the broker returned a publish to {routing_key:?} as unroutable: {reply}")]
    Returned {
        /// The publish's routing key.
        routing_key: String,
        /// The broker's reply text.
        reply: String,
    },
    /// No confirm came within [`CONFIRM_TIMEOUT`]; holds the publish's routing key.
    #[error("no confirm for a publish to {0:?} within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout(String),
    /// The connection handshake took longer than [`CONNECT_TIMEOUT`].
    #[error("the broker did not complete the connection handshake within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    /// A consumer's stream ended because its channel closed; holds the queue.
    #[error("the consumer of {0:?} ended: its channel closed")]
    ConsumerEnded(String),
    /// A publishing channel found closed with its connection: the connection is lost,
    /// whatever the channel's own error would say.
    #[error("the broker connection is closed")]
    ConnectionClosed,
}

impl BrokerError {
    /// The connection itself is gone (as opposed to one channel closed by the broker,
    /// a nack, an unroutable message, or a missing confirm): the link reconnects, and
    /// the deliveries of its channels return to their queues by themselves.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Amqp(err) => is_connection_error(err),
            Self::ConnectTimeout | Self::ConnectionClosed => true,
            _ => false,
        }
    }
}

impl BrokerError {
    /// Worth another try: everything but the broker refusing what a message names
    /// (a channel-level error such as 404 NOT_FOUND, 406 PRECONDITION_FAILED or 403
    /// ACCESS_REFUSED), which would fail the same way every time.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Amqp(err) => !err.is_amqp_soft_error(),
            _ => true,
        }
    }
}

/// A lapin error that means the connection is lost, not just a channel.
pub(crate) fn is_connection_error(err: &lapin::Error) -> bool {
    use lapin::ErrorKind;
    match err.kind() {
        ErrorKind::ProtocolError(_) => err.is_amqp_hard_error(),
        ErrorKind::InvalidChannelState(..) | ErrorKind::InvalidChannel(_) => false,
        _ => true,
    }
}

/// How long a publish may wait for its confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long opening a connection may take: a broker that accepts the socket but never
/// answers the handshake must not hold a reconnect loop, or a shutdown, forever.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing a channel or connection may wait for the broker's answer.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Opens a connection to `url`, named `taskmill-<pid>`, giving up after
/// [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str) -> Result<Arc<Connection>, BrokerError> {
    connect_any(url, 0).await.map(|(connection, _)| connection)
}

/// Connects to the first of `urls` (comma-separated: the nodes of a cluster) that
/// answers, trying them in turn from the one at `first`; the connection and that
/// URL's index. The last failure when none answers.
pub async fn connect_any(
    urls: &str,
    first: usize,
) -> Result<(Arc<Connection>, usize), BrokerError> {
    let urls: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let mut failure = BrokerError::ConnectTimeout;
    for turn in 0..urls.len().max(1) {
        let index = (first + turn) % urls.len().max(1);
        let url = urls.get(index).copied().unwrap_or_default();
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("taskmill-{}", std::process::id()).into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
            Ok(Ok(connection)) => return Ok((Arc::new(connection), index)),
            Ok(Err(err)) => failure = err.into(),
            Err(_) => failure = BrokerError::ConnectTimeout,
        }
    }
    Err(failure)
}

/// Closes a channel if it is open, waiting at most [`CLOSE_TIMEOUT`]: a broker that no
/// longer answers must not hold a shutdown.
pub async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "bye".into())).await;
    }
}

/// Closes a connection if it is open, waiting at most [`CLOSE_TIMEOUT`].
pub async fn close_connection(connection: &Connection) {
    if connection.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "bye".into())).await;
    }
}

/// One outgoing JSON message.
pub struct Outgoing<'a> {
    /// The exchange; `""` is the default exchange.
    pub exchange: &'a str,
    /// The routing key: a queue's name on the default exchange.
    pub routing_key: &'a str,
    /// The JSON body.
    pub body: &'a [u8],
    /// Unroutable is an error (for queues that must exist); off for fan-out targets
    /// that may legitimately have no listener.
    pub mandatory: bool,
    /// Headers sent by [`Publisher::send`]; [`Publisher::send_with`] takes its headers
    /// from the properties it is given instead.
    pub headers: Option<FieldTable>,
}

impl<'a> Outgoing<'a> {
    /// A mandatory message straight to a queue through the default exchange.
    pub fn to_queue(queue: &'a str, body: &'a [u8]) -> Self {
        Self {
            exchange: "",
            routing_key: queue,
            body,
            mandatory: true,
            headers: None,
        }
    }
}

/// A channel in confirm mode. Publishes from many tasks may share it: lapin matches
/// each confirm to its publish. When the broker closes the channel (a channel-level
/// error: a missing exchange, a queue declared with other arguments), the next use
/// opens a new one on the same connection.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Arc<tokio::sync::Mutex<Channel>>,
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

impl Publisher {
    /// Opens a channel in confirm mode on `connection`.
    pub async fn open(connection: &Arc<Connection>) -> Result<Self, BrokerError> {
        let channel = confirm_channel(connection).await?;
        Ok(Self {
            connection: connection.clone(),
            channel: Arc::new(tokio::sync::Mutex::new(channel)),
        })
    }

    /// The connection the channel is on.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// The live channel, reopened first if the broker closed it while the connection
    /// stayed up. On a lost connection it fails: reconnecting is the link's job.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() && !self.connection.status().connected() {
            // Its channel's "invalid channel state" would read as one channel closed
            // by the broker, and the role would retry on it instead of reconnecting.
            return Err(BrokerError::ConnectionClosed);
        }
        if !channel.status().connected() {
            tracing::warn!(
                channel = channel.id(),
                "the broker closed a publishing channel; opening a new one"
            );
            crate::metrics::publisher_channel_reopened();
            *channel = confirm_channel(&self.connection).await?;
        }
        Ok(channel.clone())
    }

    /// Closes the channel; closing explicitly keeps a drop-time close from racing
    /// the connection's own close.
    pub async fn close(&self) {
        close_channel(&*self.channel.lock().await).await;
    }

    /// Publishes without waiting for the confirm, to pipeline many messages; await
    /// each returned [`Pending`] before acting on the publish having happened.
    pub async fn send(&self, message: Outgoing<'_>) -> Result<Pending, BrokerError> {
        let mut properties = BasicProperties::default().with_content_type(CONTENT_TYPE.into());
        if let Some(headers) = message.headers.clone() {
            properties = properties.with_headers(headers);
        }
        self.send_with(message, properties).await
    }

    /// [`Self::send`] with the caller's properties (made persistent here).
    pub async fn send_with(
        &self,
        message: Outgoing<'_>,
        properties: BasicProperties,
    ) -> Result<Pending, BrokerError> {
        let properties = properties.with_delivery_mode(2);
        let confirm = self
            .channel()
            .await?
            .basic_publish(
                message.exchange.into(),
                message.routing_key.into(),
                BasicPublishOptions {
                    mandatory: message.mandatory,
                    ..Default::default()
                },
                message.body,
                properties,
            )
            .await?;
        Ok(Pending {
            confirm,
            routing_key: message.routing_key.to_owned(),
        })
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), BrokerError> {
        self.send(message).await?.confirmed().await
    }
}

/// A publish whose confirm has not been seen yet.
pub struct Pending {
    confirm: PublisherConfirm,
    routing_key: String,
}

impl Pending {
    /// The broker's answer; a confirm that never comes (its channel died and lapin
    /// did not fail it) is an error after [`CONFIRM_TIMEOUT`], so the message is
    /// reported and retried rather than holding its delivery forever.
    pub async fn confirmed(self) -> Result<(), BrokerError> {
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, self.confirm)
            .await
            .map_err(|_| BrokerError::ConfirmTimeout(self.routing_key.clone()))??;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(BrokerError::Returned {
                routing_key: self.routing_key,
                reply: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(BrokerError::Nacked(self.routing_key)),
        }
    }
}

/// Waits for every pending confirm, reporting the first failure.
pub async fn all_confirmed(pending: Vec<Pending>) -> Result<(), BrokerError> {
    let results = futures::future::join_all(pending.into_iter().map(Pending::confirmed)).await;
    results.into_iter().collect()
}

/// A text value for an AMQP header.
pub(crate) fn string_header(value: impl AsRef<str>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_ref()))
}
