//! The AMQP connection and confirmed publishing.
//!
//! Every message taskmill sends is JSON, persistent and publisher-confirmed; a nack, or a
//! `mandatory` message the broker returned as unroutable, is an error, never a success.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lapin::{Confirmation, PublisherConfirm};

use crate::protocol::CONTENT_TYPE;

#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker nacked a publish to {0:?}")]
    Nacked(String),
    #[error("the broker returned a publish to {routing_key:?} as unroutable: {reply}")]
    Returned { routing_key: String, reply: String },
    #[error("no confirm for a publish to {0:?} within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout(String),
}

/// How long a publish may wait for its confirm.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn connect(url: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("taskmill-{}", std::process::id()).into());
    Ok(Connection::connect(url, properties).await?)
}

/// One outgoing JSON message.
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    /// Unroutable is an error (for queues that must exist); off for fan-out targets
    /// that may legitimately have no listener.
    pub mandatory: bool,
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
/// each confirm to its publish.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Closes the channel; closing explicitly keeps a drop-time close from racing
    /// the connection's own close.
    pub async fn close(&self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "shutdown".into()).await;
        }
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
            .channel
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

pub fn string_header(value: impl AsRef<str>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_ref()))
}
