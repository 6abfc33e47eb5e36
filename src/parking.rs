//! The parking lot: where a message goes when it cannot be processed (malformed,
//! unknown type, oversize, unknown task). Never dropped, never retried forever: it
//! waits there, with the reason in its headers, until an operator lists, replays or
//! purges it.

use chrono::Utc;
use lapin::message::Delivery;
use lapin::types::FieldTable;

use crate::broker::{string_header, BrokerError, Outgoing, Publisher};
use crate::topology::Topology;

pub const REASON_HEADER: &str = "x-taskmill-reason";
pub const SOURCE_HEADER: &str = "x-taskmill-source-queue";
pub const PARKED_AT_HEADER: &str = "x-taskmill-parked-at";
pub const EXCHANGE_HEADER: &str = "x-taskmill-original-exchange";
pub const ROUTING_KEY_HEADER: &str = "x-taskmill-original-routing-key";

/// Copies the delivery to the parking lot with the reason (confirmed). The caller acks
/// the original afterwards.
pub async fn park(
    publisher: &Publisher,
    topology: &Topology,
    delivery: &Delivery,
    source_queue: &str,
    reason: &str,
) -> Result<(), BrokerError> {
    tracing::warn!(
        queue = source_queue,
        routing_key = %delivery.routing_key,
        bytes = delivery.data.len(),
        reason,
        "parking message"
    );
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
    let parking = topology.parking_queue();
    let properties = delivery.properties.clone().with_headers(headers);
    publisher
        .send_with(Outgoing::to_queue(&parking, &delivery.data), properties)
        .await?
        .confirmed()
        .await?;
    Ok(())
}
