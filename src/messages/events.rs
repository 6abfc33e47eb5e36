//! Job events: publishing an outbox row to the events exchange and to the job's
//! `on_complete` target, and the relay that publishes what is left over.
//!
//! The row is written in the transaction that ends the job and claimed by its writer;
//! it is marked published only after the events exchange confirmed it. A crash in
//! between leaves the row for the relay, once the claim lapses.
//!
//! The `on_complete` target is named by the producer and may not exist. It is published
//! on a channel of its own (a missing exchange makes the broker close the channel it was
//! published on), its failure never holds the event back from the events exchange, and
//! it is recorded on the row and retried [`TARGET_ATTEMPTS`] times in all, with waits
//! doubling from [`TARGET_FIRST_WAIT`], then given up with a warning.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::amqp::broker::{all_confirmed, BrokerError, Outgoing, Pending, Publisher};
use crate::amqp::topology::Topology;
use crate::error::Error;
use crate::protocol::{JobEvent, ReplyAddress, Target, REJECTED, STAGE};
use crate::store::{job_event, PhaseChange, Store, TargetOutcome};

const RELAY_BATCH: u64 = 100;
/// Publishes to an `on_complete` target before it is given up.
pub const TARGET_ATTEMPTS: i32 = 5;
/// The wait after the first failed publish to a target; each later one doubles it.
pub const TARGET_FIRST_WAIT: Duration = Duration::from_secs(2);

/// Publishes job events from the outbox: to the events exchange and each job's
/// `on_complete` target, and, as the relay, whatever a publisher left behind.
#[derive(Clone)]
pub(crate) struct EventPublisher {
    publisher: Publisher,
    /// The channel `on_complete` targets are published on first, opened on first use.
    targets: Arc<OnceCell<Publisher>>,
    topology: Topology,
    store: Store,
}

impl EventPublisher {
    /// An event publisher over `store`'s outbox, publishing on `publisher` to the names
    /// of `topology`.
    pub fn new(publisher: Publisher, topology: Topology, store: Store) -> Self {
        Self {
            publisher,
            targets: Arc::default(),
            topology,
            store,
        }
    }

    /// Closes the channel of the `on_complete` targets, if one was opened; the main
    /// publisher is its owner's to close.
    pub async fn close(&self) {
        if let Some(targets) = self.targets.get() {
            targets.close().await;
        }
    }

    /// Publishes events to the events exchange (confirms pipelined) and marks them
    /// published; each event's target, if any, is tried once beside it and its fate
    /// recorded.
    pub async fn publish(&self, events: &[job_event::Model]) -> Result<(), Error> {
        let bodies: Vec<Vec<u8>> = events
            .iter()
            .map(|event| serde_json::to_vec(&event.body).expect("JSON values serialize"))
            .collect();
        let mut pending = Vec::with_capacity(events.len());
        for (event, body) in events.iter().zip(&bodies) {
            pending.push(self.send(&event.kind, &event.job_id, body).await?);
        }
        let targets = self.attempt_targets(events, &bodies).await;
        all_confirmed(pending).await?;
        let outcomes: Vec<(i64, Option<TargetOutcome>)> =
            events.iter().map(|event| event.id).zip(targets).collect();
        self.store.mark_events_published(&outcomes).await?;
        for event in events {
            tracing::info!(job_id = %event.job_id, kind = %event.kind, "job event published");
            // Counted here, once per event marked published, rather than where jobs
            // end: a job ends in several places (completion, cancel, the sweeper, the
            // intake's rejections) but its event is published through this one.
            let field = |name| event.body.get(name).and_then(|v| v.as_str()).unwrap_or("");
            crate::metrics::job_finished(field("job_type"), field("stage"));
        }
        Ok(())
    }

    /// Publishes a stored event to one target only (confirmed), on its own channel.
    pub async fn publish_to(&self, target: &Target, event: &job_event::Model) -> Result<(), Error> {
        let body = serde_json::to_vec(&event.body).expect("JSON values serialize");
        publish_to_target(&self.publisher, target, &body).await
    }

    /// One try at each event's target, if it has one: all sent on one shared channel,
    /// confirms pipelined. A target the broker refuses may close that channel under the
    /// others' publishes, so a send that fails there gets its try on a channel of its
    /// own ([`Self::attempt_target`]) before it counts as failed.
    async fn attempt_targets(
        &self,
        events: &[job_event::Model],
        bodies: &[Vec<u8>],
    ) -> Vec<Option<TargetOutcome>> {
        let mut sent = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let Some(target) = event_target(event) else {
                continue;
            };
            let pending = match self.shared_targets().await {
                Ok(shared) => shared
                    .send(Outgoing {
                        exchange: &target.exchange,
                        routing_key: &target.routing_key,
                        body: &bodies[index],
                        mandatory: true,
                        headers: None,
                    })
                    .await
                    .ok(),
                Err(_) => None,
            };
            sent.push((index, target, pending));
        }
        let mut outcomes: Vec<Option<TargetOutcome>> = events.iter().map(|_| None).collect();
        for (index, target, pending) in sent {
            let confirmed = match pending {
                Some(pending) => pending.confirmed().await.is_ok(),
                None => false,
            };
            let event = &events[index];
            outcomes[index] = Some(if confirmed {
                TargetOutcome::Sent {
                    attempts: event.target_attempts + 1,
                }
            } else {
                self.attempt_target(event, &target, &bodies[index]).await
            });
        }
        outcomes
    }

    async fn shared_targets(&self) -> Result<&Publisher, BrokerError> {
        self.targets
            .get_or_try_init(|| Publisher::open(self.publisher.connection()))
            .await
    }

    /// One try at a target, on a channel of its own; what the store should remember
    /// of it.
    async fn attempt_target(
        &self,
        event: &job_event::Model,
        target: &Target,
        body: &[u8],
    ) -> TargetOutcome {
        let attempts = event.target_attempts + 1;
        match publish_to_target(&self.publisher, target, body).await {
            Ok(()) => TargetOutcome::Sent { attempts },
            Err(err) => {
                let error = format!(
                    "publishing to exchange {:?} with routing key {:?}: {err}",
                    target.exchange, target.routing_key
                );
                let retry_in = (attempts < TARGET_ATTEMPTS)
                    .then(|| TARGET_FIRST_WAIT * 2u32.pow(attempts as u32 - 1));
                match retry_in {
                    Some(wait) => {
                        tracing::warn!(job_id = %event.job_id, attempts, %error, ?wait, "on_complete target failed; will retry")
                    }
                    None => {
                        tracing::warn!(job_id = %event.job_id, attempts, %error, "on_complete target failed; giving up")
                    }
                }
                TargetOutcome::Failed {
                    attempts,
                    error,
                    retry_in,
                }
            }
        }
    }

    /// Answers a request that was parked instead of becoming a job with a
    /// `job.rejected` event, to the events exchange (when the id is the request's own
    /// to answer for) and to its `on_complete` target. Best effort: the request itself
    /// is safe in the parking lot whatever happens here.
    pub async fn publish_rejection(
        &self,
        reply: &ReplyAddress,
        reason: &str,
        to_events_exchange: bool,
    ) {
        let event = JobEvent::rejected(&reply.job_id, &reply.job_type, reason);
        // Counted once per rejection answered, sent or not: it has no outbox row, so
        // `publish` never sees it.
        crate::metrics::job_finished(&event.job_type, &event.stage);
        let body = serde_json::to_vec(&event).expect("an event serializes");
        if to_events_exchange {
            let exchange = self.topology.events_exchange();
            let routing_key = Topology::event_routing_key(REJECTED, &reply.job_id);
            let sent = self
                .publisher
                .publish(Outgoing {
                    exchange: &exchange,
                    routing_key: &routing_key,
                    body: &body,
                    mandatory: false,
                    headers: None,
                })
                .await;
            if let Err(err) = sent {
                tracing::warn!(job_id = %reply.job_id, %err, "job.rejected event not published");
            }
        }
        if let Some(target) = &reply.on_complete {
            if let Err(err) = publish_to_target(&self.publisher, target, &body).await {
                tracing::warn!(job_id = %reply.job_id, %err, "job.rejected event not delivered to on_complete");
            }
        }
    }

    /// Publishes the `job.stage` events of jobs that entered a phase, to the events
    /// exchange only. Best effort: they report progress, and the phase's tasks are safe
    /// in the store whatever happens here.
    pub async fn publish_progress(&self, changes: &[PhaseChange]) {
        if changes.is_empty() {
            return;
        }
        if let Err(err) = self.try_publish_progress(changes).await {
            tracing::warn!(%err, "job.stage events not published");
        }
    }

    async fn try_publish_progress(&self, changes: &[PhaseChange]) -> Result<(), BrokerError> {
        let mut pending = Vec::with_capacity(changes.len());
        for change in changes {
            let body = serde_json::to_vec(&change.event).expect("an event serializes");
            pending.push(self.send(STAGE, &change.job.id, &body).await?);
        }
        all_confirmed(pending).await
    }

    /// Sends an event of `kind` about `job_id` to the events exchange, its confirm
    /// pending. Not mandatory: an events exchange with no listener bound is normal.
    async fn send(&self, kind: &str, job_id: &str, body: &[u8]) -> Result<Pending, BrokerError> {
        let exchange = self.topology.events_exchange();
        let routing_key = Topology::event_routing_key(kind, job_id);
        self.publisher
            .send(Outgoing {
                exchange: &exchange,
                routing_key: &routing_key,
                body,
                mandatory: false,
                headers: None,
            })
            .await
    }

    /// Publishes freshly written events, leaving them to the relay on failure.
    pub async fn publish_or_defer(&self, events: &[job_event::Model]) {
        if events.is_empty() {
            return;
        }
        if let Err(err) = self.publish(events).await {
            let jobs: Vec<&str> = events.iter().map(|e| e.job_id.as_str()).collect();
            tracing::warn!(?jobs, %err, "job events not published yet; the relay will retry");
        }
    }

    /// Publishes every unpublished event whose claim has lapsed, and retries the
    /// targets that are due. Returns how many events it published.
    pub async fn relay_strays(&self) -> Result<usize, Error> {
        let mut published = 0;
        for event in self.store.stray_events(RELAY_BATCH).await? {
            if self.store.claim_event(event.id).await? {
                self.publish(std::slice::from_ref(&event)).await?;
                published += 1;
            }
        }
        for event in self.store.targets_due(RELAY_BATCH).await? {
            let Some(target) = event_target(&event) else {
                continue;
            };
            if self.store.claim_target(&event).await? {
                let body = serde_json::to_vec(&event.body).expect("JSON values serialize");
                let outcome = self.attempt_target(&event, &target, &body).await;
                self.store.record_target(event.id, outcome).await?;
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

/// Publishes to a producer-named target on a channel of its own, so that a target the
/// broker refuses closes nothing anyone else uses. Mandatory: an unroutable event is a
/// failure to record, not a success.
async fn publish_to_target(
    publisher: &Publisher,
    target: &Target,
    body: &[u8],
) -> Result<(), Error> {
    let own = Publisher::open(publisher.connection()).await?;
    let sent = own
        .publish(Outgoing {
            exchange: &target.exchange,
            routing_key: &target.routing_key,
            body,
            mandatory: true,
            headers: None,
        })
        .await;
    own.close().await;
    Ok(sent?)
}

fn event_target(event: &job_event::Model) -> Option<Target> {
    let value = event.on_complete.clone()?;
    serde_json::from_value(value).ok()
}

#[cfg(test)]
mod tests {
    use crate::amqp::broker::{CLOSE_TIMEOUT, CONFIRM_TIMEOUT};
    use crate::store::EVENT_CLAIM;

    #[test]
    fn an_event_claim_outlives_a_slow_confirm() {
        assert!(EVENT_CLAIM >= 2 * CONFIRM_TIMEOUT);
        assert!(EVENT_CLAIM > CONFIRM_TIMEOUT + CLOSE_TIMEOUT);
    }
}
