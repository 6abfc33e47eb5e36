//! The parking lot: where a message goes when it cannot be processed (malformed,
//! unknown type, oversize, unknown task). Never retried forever: it waits there, with
//! the reason in its headers, until an operator lists, replays or purges it.
//!
//! The lot is bounded ([`Topology::parking_max`] messages; each at most
//! `TASKMILL_MAX_REQUEST_BYTES`). A park first counts the lot: from 80% of the bound
//! on, each park warns; at the bound the message is dropped instead, with an error log
//! carrying its reason, ids and the start of its body, and
//! `taskmill_parks_refused_total`. Dropped rather than left in its queue, where it
//! would come back for ever and hold its consumer's slot. Pods parking at the same
//! moment may each see room: the lot can pass its bound by the parks in flight.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use serde::Serialize;

use crate::amqp::broker::{string_header, BrokerError, Outgoing, Publisher};
use crate::amqp::topology::Topology;

/// Header of a parked message: why it was parked (at most 1,000 characters).
pub const REASON_HEADER: &str = "x-taskmill-reason";
/// Header of a parked message: the queue it was consumed from.
pub const SOURCE_HEADER: &str = "x-taskmill-source-queue";
/// Header of a parked message: when it was parked (RFC 3339).
pub const PARKED_AT_HEADER: &str = "x-taskmill-parked-at";
/// Header of a parked message: the exchange it was first published to, where
/// [`replay`] sends it.
pub const EXCHANGE_HEADER: &str = "x-taskmill-original-exchange";
/// Header of a parked message: its original routing key.
pub const ROUTING_KEY_HEADER: &str = "x-taskmill-original-routing-key";
/// Header of a parked message: a UUID that names it for [`replay`].
pub const PARKED_ID_HEADER: &str = "x-taskmill-parked-id";
const OUR_HEADER_PREFIX: &str = "x-taskmill-";
/// From this share of the bound on, every park warns.
const NEARLY_FULL: f64 = 0.8;

/// Copies the delivery to the parking lot with the reason (confirmed), or, with the
/// lot at its bound, logs it as dropped. Either way the caller acks the original
/// afterwards.
pub async fn park(
    publisher: &Publisher,
    topology: &Topology,
    delivery: &Delivery,
    source_queue: &str,
    reason: &str,
) -> Result<(), BrokerError> {
    let held = topology.parked_now(&publisher.channel().await?).await?;
    let max = topology.parking_max();
    if held >= max {
        let body: String = String::from_utf8_lossy(&delivery.data)
            .chars()
            .take(500)
            .collect();
        tracing::error!(
            queue = source_queue,
            routing_key = %delivery.routing_key,
            message_id = delivery.properties.message_id().as_ref().map(|id| id.as_str()),
            bytes = delivery.data.len(),
            reason,
            body,
            parked = held,
            max,
            "parking lot full (TASKMILL_PARKING_MAX): message dropped, not parked"
        );
        crate::metrics::park_refused(source_queue);
        return Ok(());
    }
    if f64::from(held) >= NEARLY_FULL * f64::from(max) {
        tracing::warn!(
            parked = held,
            max,
            "parking lot nearly full: past TASKMILL_PARKING_MAX messages are dropped; \
             see `taskmill dead list`, `replay` and `purge`"
        );
    }
    tracing::warn!(
        queue = source_queue,
        routing_key = %delivery.routing_key,
        bytes = delivery.data.len(),
        reason,
        "parking message"
    );
    crate::metrics::message_parked(source_queue);
    // x-death would make the broker see a dead-letter cycle when the message is
    // replayed; the parking headers carry what an operator needs instead.
    let mut headers = FieldTable::default();
    if let Some(original) = delivery.properties.headers() {
        for (key, value) in original.inner() {
            if key.as_str() != "x-death" {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    let reason: String = reason.chars().take(1000).collect();
    headers.insert(
        PARKED_ID_HEADER.into(),
        string_header(uuid::Uuid::new_v4().to_string()),
    );
    headers.insert(REASON_HEADER.into(), string_header(reason));
    headers.insert(SOURCE_HEADER.into(), string_header(source_queue));
    headers.insert(
        PARKED_AT_HEADER.into(),
        string_header(Utc::now().to_rfc3339()),
    );
    headers.insert(
        EXCHANGE_HEADER.into(),
        string_header(delivery.exchange.as_str()),
    );
    headers.insert(
        ROUTING_KEY_HEADER.into(),
        string_header(delivery.routing_key.as_str()),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    publisher
        .send_with(
            Outgoing::to_queue(&topology.parking_queue(), &delivery.data),
            properties,
        )
        .await?
        .confirmed()
        .await?;
    Ok(())
}

/// A parked message as an operator sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Parked {
    /// Its [`PARKED_ID_HEADER`], the id [`replay`] takes; empty when missing, as are the
    /// other header fields.
    pub id: String,
    /// Why it was parked.
    pub reason: String,
    /// The queue it was consumed from.
    pub source_queue: String,
    /// When it was parked (RFC 3339).
    pub parked_at: String,
    /// The exchange it was first published to.
    pub exchange: String,
    /// Its original routing key.
    pub routing_key: String,
    /// Its AMQP content type, when it has one.
    pub content_type: Option<String>,
    /// Its body's size in bytes.
    pub bytes: usize,
    /// The body as text when it is UTF-8 (lossy otherwise), cut at 2,000 characters.
    pub body_preview: String,
}

impl Parked {
    fn from_delivery(delivery: &Delivery) -> Self {
        let header = |name: &str| {
            delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|headers| headers.inner().get(name).cloned())
                .and_then(|value| match value {
                    AMQPValue::LongString(text) => Some(text.to_string()),
                    AMQPValue::ShortString(text) => Some(text.to_string()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        Self {
            id: header(PARKED_ID_HEADER),
            reason: header(REASON_HEADER),
            source_queue: header(SOURCE_HEADER),
            parked_at: header(PARKED_AT_HEADER),
            exchange: header(EXCHANGE_HEADER),
            routing_key: header(ROUTING_KEY_HEADER),
            content_type: delivery
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.to_string()),
            bytes: delivery.data.len(),
            body_preview: String::from_utf8_lossy(&delivery.data)
                .chars()
                .take(2000)
                .collect(),
        }
    }
}

/// Lists the first `limit` messages of the parking lot without removing anything: each
/// is fetched unacked and returns to the queue when the channel closes.
pub async fn list(
    connection: &Connection,
    topology: &Topology,
    limit: usize,
) -> Result<Vec<Parked>, BrokerError> {
    let channel = connection.create_channel().await?;
    let queue = topology.parking_queue();
    let mut parked = Vec::new();
    while parked.len() < limit {
        let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        parked.push(Parked::from_delivery(&message.delivery));
    }
    channel.close(200, "listed".into()).await?;
    Ok(parked)
}

/// Sends parked messages back where they were first published (the `ids` given, or
/// all), without the parking headers; each is removed from the parking lot only after
/// its replay was confirmed. Returns how many were replayed. Only the messages in the
/// lot when it starts are looked at: one that is parked again at once (it is as bad
/// as it was) waits for the next replay instead of going round for ever.
pub async fn replay(
    connection: &Arc<Connection>,
    topology: &Topology,
    ids: Option<&[String]>,
) -> Result<usize, BrokerError> {
    let mut lot = LotWalk::open(connection, topology).await?;
    let publisher = Publisher::open(connection).await?;
    let mut replayed = 0;
    while let Some(delivery) = lot.next().await? {
        let delivery = &delivery;
        let parked = Parked::from_delivery(delivery);
        if ids.is_some_and(|ids| !ids.contains(&parked.id)) {
            continue;
        }
        let mut headers = FieldTable::default();
        if let Some(original) = delivery.properties.headers() {
            for (key, value) in original.inner() {
                if !key.as_str().starts_with(OUR_HEADER_PREFIX) {
                    headers.insert(key.clone(), value.clone());
                }
            }
        }
        let properties = delivery.properties.clone().with_headers(headers);
        publisher
            .send_with(
                Outgoing {
                    exchange: &parked.exchange,
                    routing_key: &parked.routing_key,
                    body: &delivery.data,
                    mandatory: true,
                    headers: None,
                },
                properties,
            )
            .await?
            .confirmed()
            .await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed += 1;
    }
    publisher.close().await;
    lot.close("replayed").await?;
    Ok(replayed)
}

/// Empties the parking lot; returns how many messages were removed.
pub async fn purge(connection: &Connection, topology: &Topology) -> Result<u32, BrokerError> {
    let channel = connection.create_channel().await?;
    let count = channel
        .queue_purge(
            topology.parking_queue().as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await?;
    channel.close(200, "purged".into()).await?;
    Ok(count)
}

/// Removes parked messages from the head of the lot, where the oldest wait, while
/// they were parked before `cut_off`; the first later one (or one without a readable
/// [`PARKED_AT_HEADER`]) goes back and ends the purge. Returns how many were removed.
/// Pods' clocks differ a little, so a message parked just before the cut-off behind
/// one parked just after it stays.
pub async fn purge_parked_before(
    connection: &Connection,
    topology: &Topology,
    cut_off: DateTime<Utc>,
) -> Result<u32, BrokerError> {
    let mut lot = LotWalk::open(connection, topology).await?;
    let mut purged = 0;
    while let Some(delivery) = lot.next().await? {
        let parked_at = Parked::from_delivery(&delivery).parked_at;
        let older = DateTime::parse_from_rfc3339(&parked_at).is_ok_and(|at| at < cut_off);
        if !older {
            let back = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            delivery.acker.nack(back).await?;
            break;
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        purged += 1;
    }
    lot.close("purged").await?;
    Ok(purged)
}

/// The messages in the lot when the walk began, one at a time and unacked: each is
/// acked, or goes back when the walk's channel closes. Counting first keeps a message
/// parked again meanwhile (by a replay, say) from being met twice.
struct LotWalk {
    channel: lapin::Channel,
    queue: String,
    left: u32,
}

impl LotWalk {
    async fn open(connection: &Connection, topology: &Topology) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        let queue = topology.parking_queue();
        let left = crate::amqp::topology::ready_in(&channel, &queue).await?;
        Ok(Self {
            channel,
            queue,
            left,
        })
    }

    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let message = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
            .await?;
        Ok(message.map(|message| message.delivery))
    }

    async fn close(self, why: &str) -> Result<(), BrokerError> {
        self.channel.close(200, why.into()).await?;
        Ok(())
    }
}
