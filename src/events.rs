//! Job events: publishing an outbox row to the events exchange and to the job's
//! `on_complete` target, and the relay that publishes rows whose publisher died.
//!
//! The row is written in the transaction that ends the job and claimed by its writer;
//! it is marked published only after the broker confirmed it. A crash in between
//! leaves the row for the relay, once the claim lapses.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::{Outgoing, Pending, Publisher};
use crate::error::Error;
use crate::protocol::Target;
use crate::store::{job_event, Store};
use crate::topology::Topology;

const RELAY_BATCH: u64 = 100;

#[derive(Clone)]
pub struct EventPublisher {
    publisher: Publisher,
    topology: Topology,
    store: Store,
}

impl EventPublisher {
    pub fn new(publisher: Publisher, topology: Topology, store: Store) -> Self {
        Self {
            publisher,
            topology,
            store,
        }
    }

    /// Publishes one event (confirmed) and marks it published.
    pub async fn publish(&self, event: &job_event::Model) -> Result<(), Error> {
        let body = serde_json::to_vec(&event.body).expect("JSON values serialize");
        let exchange = self.topology.events_exchange();
        let routing_key = Topology::event_routing_key(&event.kind, &event.job_id);
        // Not mandatory: an events exchange with no listener bound is normal.
        let mut pending = vec![
            self.publisher
                .send(Outgoing {
                    exchange: &exchange,
                    routing_key: &routing_key,
                    body: &body,
                    mandatory: false,
                    headers: None,
                })
                .await?,
        ];
        if let Some(target) = event_target(event) {
            pending.push(self.send_to(&target, &body).await?);
        }
        crate::broker::all_confirmed(pending).await?;
        self.store.mark_event_published(event.id).await?;
        tracing::info!(job_id = %event.job_id, kind = %event.kind, "job event published");
        Ok(())
    }

    /// Publishes a stored event to one target only (confirmed).
    pub async fn publish_to(&self, target: &Target, event: &job_event::Model) -> Result<(), Error> {
        let body = serde_json::to_vec(&event.body).expect("JSON values serialize");
        self.send_to(target, &body).await?.confirmed().await?;
        Ok(())
    }

    /// Not mandatory: a producer's reply queue may be gone, and that must not block
    /// the event from going anywhere else.
    async fn send_to(&self, target: &Target, body: &[u8]) -> Result<Pending, Error> {
        Ok(self
            .publisher
            .send(Outgoing {
                exchange: &target.exchange,
                routing_key: &target.routing_key,
                body,
                mandatory: false,
                headers: None,
            })
            .await?)
    }

    /// Publishes a freshly written event, leaving it to the relay on failure.
    pub async fn publish_or_defer(&self, event: &job_event::Model) {
        if let Err(err) = self.publish(event).await {
            tracing::warn!(job_id = %event.job_id, %err, "job event not published yet; the relay will retry");
        }
    }

    /// Publishes every unpublished event whose claim has lapsed.
    pub async fn relay_strays(&self) -> Result<usize, Error> {
        let mut published = 0;
        for event in self.store.stray_events(RELAY_BATCH).await? {
            if self.store.claim_event(event.id).await? {
                self.publish(&event).await?;
                published += 1;
            }
        }
        Ok(published)
    }

    /// Runs [`Self::relay_strays`] every `interval` until shutdown.
    pub async fn run_relay(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.relay_strays().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "relayed stray job events"),
                Err(err) => tracing::warn!(%err, "job event relay failed; will retry"),
            }
        }
    }
}

fn event_target(event: &job_event::Model) -> Option<Target> {
    let value = event.on_complete.clone()?;
    serde_json::from_value(value).ok()
}
