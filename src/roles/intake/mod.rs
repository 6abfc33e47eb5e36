//! Intake: turns job requests into a job row, task rows and task messages.
//!
//! Per request: decode and check it (or park it). A job of at most
//! [`group::WHOLE_JOB_TASKS`] tasks goes to the group former, which makes the small jobs
//! of every request waiting at that moment in one transaction, `running` at once, and
//! publishes their task messages. A larger job is created in `formation` (idempotent on
//! the job id), its task rows inserted in adaptive batches — publishing each batch's
//! task messages, confirmed, as soon as its rows are committed, so that workers start
//! on a large job while the rest of it is stored — then moved to `running` with its
//! task count in one transaction. Either way the request is acked only then. A
//! redelivered request for an existing job resumes where the last attempt stopped
//! instead of duplicating anything. A job too large for one request comes in parts
//! ([`parts`]), each stored like a slice of a large job. Requests written in a
//! producer's own transaction reach the intake queue through the [`relay`]. This file
//! takes requests and settles them; [`form`] makes the job, [`group`] many at once.

mod form;
mod group;
mod parts;
mod relay;
mod ticks;

use std::sync::Arc;

use lapin::message::Delivery;
use lapin::Connection;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use self::group::GroupFormer;
use super::feed::Feeder;
use super::settle::Settler;
use super::shared::{take_slot, Shared};
use crate::amqp::broker::{BrokerError, Publisher};
use crate::amqp::consumer::{decode, Consumer};
use crate::error::Error;
use crate::messages::events::EventPublisher;
use crate::protocol::{self, DecodeError, JobRequest, ReplyAddress};
use crate::retry::Delays;
use crate::state::JobStage;

/// Job requests handled at once by one intake.
const CONCURRENT_REQUESTS: usize = 32;
/// Requests larger than this (the parts of a large job, say) are decoded and stored
/// [`LARGE_AT_ONCE`] at a time: 32 parts of 10,000 tasks decoded at once took a pod
/// from 50 to 92 MiB, and two keep the rows going in faster than workers take them.
const LARGE_REQUEST_BYTES: usize = 64 * 1024;
const LARGE_AT_ONCE: usize = 2;

/// The intake's request slots, created once per pod: they outlive a connection.
pub(crate) fn slots() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(CONCURRENT_REQUESTS))
}

/// Requests in flight hold `slots`, which outlive one connection: requests started
/// before a reconnect still count against the limit.
pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // A new connection may find queues gone (a broker reset): declare them again.
    shared.topology.forget_declared();
    let publisher = Publisher::open(&connection).await?;
    let events = EventPublisher::new(
        publisher.clone(),
        shared.topology.clone(),
        shared.store.clone(),
    );
    let mut consumer = Consumer::start(
        &connection,
        shared.topology.intake_queue(),
        CONCURRENT_REQUESTS,
        shared.config.max_request_bytes,
    )
    .await?;
    // Feeders publish on this connection: they stop with it, and a pod whose intake
    // runs again on a new connection takes their jobs back by the orphan scan.
    let feeding = shutdown.child_token();
    let _stop_feeding = feeding.clone().drop_guard();
    let intake = Arc::new(Intake {
        shared: shared.clone(),
        publisher: publisher.clone(),
        events,
        settler: Settler::new(
            publisher.clone(),
            shared.topology.clone(),
            consumer.queue().to_owned(),
        ),
        shutdown: shutdown.clone(),
        groups: GroupFormer::start(
            publisher.clone(),
            shared.topology.clone(),
            shared.store.clone(),
        ),
        feeder: {
            let feeder = Feeder::new(shared.clone(), publisher.clone(), feeding);
            feeder.scan_for_orphans();
            feeder
        },
    });
    // The relay publishes on this run's connection, and stops with it.
    let relaying = shutdown.child_token();
    let _stop_relaying = relaying.clone().drop_guard();
    let relay = tokio::spawn(intake.clone().relay(relaying.clone()));
    let large = Arc::new(Semaphore::new(LARGE_AT_ONCE));
    let max_bytes = shared.config.max_request_bytes;
    // Past the grace period the broker has every unsettled request back: a handler
    // still running then must not go on to park it (a second copy) or touch its job.
    let abandoned = CancellationToken::new();
    let _abandon = abandoned.clone().drop_guard();
    while let Some(delivery) = consumer.next(&shutdown).await? {
        intake.settler.received(&delivery);
        let Some(slot) = take_slot(&slots, &shutdown).await else {
            break;
        };
        let (intake, large, abandoned) = (intake.clone(), large.clone(), abandoned.clone());
        tokio::spawn(async move {
            let handled = async {
                let _large = match delivery.data.len() > LARGE_REQUEST_BYTES {
                    true => large.acquire_owned().await.ok(),
                    false => None,
                };
                let request = decode(&delivery, max_bytes);
                intake.handle(delivery, slot, request).await;
            };
            tokio::select! {
                _ = handled => {}
                _ = abandoned.cancelled() => {}
            }
        });
    }
    // Requests in flight get the grace period to finish.
    consumer
        .drain(&slots, CONCURRENT_REQUESTS, shared.config.grace_period)
        .await;
    abandoned.cancel();
    relaying.cancel();
    let _ = relay.await;
    consumer.close().await;
    intake.feeder.stop().await;
    intake.events.close().await;
    publisher.close().await;
    Ok(())
}

struct Intake {
    shared: Arc<Shared>,
    publisher: Publisher,
    events: EventPublisher,
    settler: Settler,
    shutdown: CancellationToken,
    groups: GroupFormer,
    feeder: Feeder,
}

/// Why a request was not turned into a job.
enum Rejection {
    /// The request itself is bad: park it.
    Park(String),
    /// Something failed on the way: [`Error::is_transient`] decides what next. Shared:
    /// a failure of a group of jobs reaches every request of the group.
    Retry(Arc<Error>),
}

impl From<Arc<Error>> for Rejection {
    fn from(err: Arc<Error>) -> Self {
        Self::Retry(err)
    }
}

impl From<Error> for Rejection {
    fn from(err: Error) -> Self {
        Self::Retry(Arc::new(err))
    }
}

impl From<crate::store::StoreError> for Rejection {
    fn from(err: crate::store::StoreError) -> Self {
        Error::from(err).into()
    }
}

impl From<crate::amqp::broker::BrokerError> for Rejection {
    fn from(err: crate::amqp::broker::BrokerError) -> Self {
        Error::from(err).into()
    }
}

impl From<DecodeError> for Rejection {
    fn from(err: DecodeError) -> Self {
        Self::Park(err.to_string())
    }
}

impl Intake {
    /// Turns one request into a job and settles it. A failure gets one of three
    /// answers: a bad request is parked with its reason; a transient failure is retried
    /// here with backoff (10 ms growing to 10 s) and parked once 90 s have passed; a
    /// lost connection leaves the request to the broker, which redelivers it.
    async fn handle(
        &self,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        request: Result<JobRequest<Box<RawValue>>, DecodeError>,
    ) {
        let request = match request {
            Ok(request) => request,
            Err(err) => return self.park_request(delivery, slot, &err.to_string()).await,
        };
        let mut delays = Delays::transient();
        let verdict = loop {
            let err = match self.accept(&delivery, &request).await {
                Ok(()) => break Ok(()),
                Err(Rejection::Park(reason)) => break Err(reason),
                Err(Rejection::Retry(err)) => err,
            };
            // Retrying on a lost connection would race the redelivered copy on the new
            // connection (and, once that copy has made the job, try to park this one
            // as "left formation"): the request is left to the broker.
            if self.settler.connection_lost(&err) {
                return self.settler.settle_failed(delivery, slot, &err);
            }
            if !err.is_transient() {
                break Err(err.to_string());
            }
            if let Error::Broker(BrokerError::Returned { .. }) = *err {
                // A queue this process declared is gone: declare it again.
                self.shared.topology.forget_declared();
            }
            let Some(delay) = delays.next() else {
                break Err(format!("gave up after 90 s of transient errors: {err}"));
            };
            tracing::warn!(%err, ?delay, "job request failed; retrying");
            tokio::select! {
                _ = self.shutdown.cancelled() => return self.settler.requeue(delivery, slot),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        match verdict {
            Ok(()) => self.settler.settle(delivery, slot, Ok(())),
            Err(reason) => self.park_request(delivery, slot, &reason).await,
        }
    }

    /// Parks a request that makes no job, answers its producer, then acks it.
    async fn park_request(&self, delivery: Delivery, slot: OwnedSemaphorePermit, reason: &str) {
        let parked = self.settler.park(&delivery, reason).await;
        if parked.is_ok() {
            let message_id = delivery.properties.message_id().as_ref();
            self.answer_rejection(&delivery.data, message_id.map(|id| id.as_str()), reason)
                .await;
        }
        self.settler.settle(delivery, slot, parked);
    }

    /// A producer waiting for its job's event hears why there will be none: a
    /// `job.rejected` event for a request that made no job; for one whose formation it
    /// had begun, that job fails with the reason (its `job.failed` event says it). A
    /// request reusing another job's id is answered on its own `on_complete` only: the
    /// events of that id belong to the other job.
    async fn answer_rejection(&self, body: &[u8], message_id: Option<&str>, reason: &str) {
        let Some(reply) = ReplyAddress::read(body, message_id) else {
            return;
        };
        let existing = match self.shared.store.job(&reply.job_id).await {
            Ok(existing) => existing,
            Err(err) => {
                tracing::warn!(job_id = %reply.job_id, %err, "cannot tell whether a parked request made a job; not answering it");
                return;
            }
        };
        let Some(job) = existing else {
            return self.events.publish_rejection(&reply, reason, true).await;
        };
        let ours = protocol::decode::<JobRequest<Box<RawValue>>>(body, None, usize::MAX)
            .is_ok_and(|request| job.request_digest.as_deref() == Some(request.digest().as_str()));
        if ours && job.stage == JobStage::Formation.as_str() {
            match self.shared.store.fail_formation(&job.id, reason).await {
                Ok(Some(event)) => self.events.publish_or_defer(&[event]).await,
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(job_id = %job.id, %err, "could not fail the formation of a parked request; the sweeper will")
                }
            }
        } else if !ours {
            self.events.publish_rejection(&reply, reason, false).await;
        }
    }
}
