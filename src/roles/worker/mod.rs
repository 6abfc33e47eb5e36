//! Worker: runs task messages from one pool's work queue.
//!
//! Per message: check that its attempt may start (a read: a stale or duplicate message
//! finds its row moved on, and goes the way of a claim that found nothing: acked), run
//! the registered handler — claimed, under a renewed lease, once it has run for a
//! second (see `run.rs`) — then record the outcome with a compare-and-set from the
//! attempt's row as it was, and only then ack:
//!
//! - success → `done` + result;
//! - failure, attempt n ≤ max_retries → `retrying`, retry message to the delay queue
//!   for n × retry_delay_ms;
//! - failure otherwise, or permanent → `failed`.
//!
//! A job whose counters say it is over once its outcome is counted ends in that same
//! transaction, its event written to the outbox and published by this worker after
//! the commit; only a job the transaction cannot settle (a multi-stage job whose
//! phase is over, an ending the database refused) gets a finished event for the
//! completion role.
//!
//! Under load the database and broker work is batched without loosening any of that:
//! the deliveries the consumer has buffered are checked in one statement, and the
//! outcomes that finish while a batch is being recorded are recorded together next —
//! one transaction, at most one finished-event message for all of them, every publish
//! confirmed, then the batch acked (coalesced by the `acks` module into `multiple`
//! acks that never cover a delivery still running). A handler panic is a failed attempt.
//!
//! A delivery holds one of `prefetch` message slots from receipt until it is settled,
//! and one of `concurrency` handler slots from just before its check until its handler
//! returns: recording and acking never hold a handler back, and a claimed task never
//! waits for a handler while its lease runs. How many messages the channel holds
//! beyond the handlers follows their pace ([`pace`]).
//!
//! Poison tasks fail alone: an attempt taken over from a worker that died (or lost its
//! channel) runs in quarantine — alone in its pod — and only then is its start
//! counted, so a task that keeps killing its worker fails once it was started more
//! than `max_starts` times, while the tasks that happened to run beside it are
//! never charged for its crashes. (A task that kills its worker within the second it
//! runs unclaimed is charged from its redelivery on, which always claims: one crash
//! more.)

mod pace;
mod record;
mod run;
mod unclaimed;

use std::collections::HashSet;
use std::sync::Arc;

use lapin::message::Delivery;
use lapin::Connection;
use tokio::sync::{mpsc, OwnedSemaphorePermit, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::settle::Settler;
use super::shared::{take_slot, Shared};
use crate::amqp::broker::Publisher;
use crate::amqp::consumer::Consumer;
use crate::error::Error;
use crate::messages::events::EventPublisher;
use crate::protocol::{DecodeError, TaskMessage};
use crate::store::{Claim, TaskOutcome};

/// How much of a pool one pod holds and runs at once. It outlives one connection:
/// work started before a reconnect still counts against it.
pub(crate) struct Capacity {
    /// One per delivery held, from receipt until it is settled (`config.prefetch`).
    slots: Arc<Semaphore>,
    prefetch: usize,
    concurrency: usize,
    /// One per handler running (`config.concurrency`): taken before the claim, so a
    /// claimed task never waits for a handler while its lease runs, and freed when the
    /// handler returns, so recording and acking never hold a handler back.
    handlers: Arc<Semaphore>,
    /// The handlers' mean time, which sets the channel's prefetch.
    pace: Arc<pace::Pace>,
    /// Handlers run under its read side; a taken-over attempt, which may be what
    /// killed a worker, runs under its write side: alone.
    quarantine: Arc<RwLock<()>>,
}

impl Capacity {
    /// `prefetch` and `concurrency` as normalized by the configuration.
    pub fn new(prefetch: usize, concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(prefetch)),
            prefetch,
            concurrency,
            handlers: Arc::new(Semaphore::new(concurrency)),
            pace: Arc::default(),
            quarantine: Arc::new(RwLock::new(())),
        })
    }

    /// Deliveries held now, and handlers running.
    pub fn load(&self) -> (usize, usize) {
        (
            self.prefetch - self.slots.available_permits(),
            self.concurrency - self.handlers.available_permits(),
        )
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    pool: String,
    capacity: Arc<Capacity>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // Normalized: prefetch ≥ concurrency ≥ 1, within what basic.qos carries.
    let (prefetch, concurrency) = (shared.config.prefetch, shared.config.concurrency);
    let publisher = Publisher::open(&connection).await?;
    shared.topology.forget_declared();
    {
        let channel = publisher.channel().await?;
        shared.topology.declare_work_queue(&channel, &pool).await?;
        shared.topology.declare_delay_ladder(&channel).await?;
    }
    let mut consumer = Consumer::start(
        &connection,
        shared.topology.work_queue(&pool),
        // Deeper once the handlers' pace is known (see `pace`).
        concurrency,
        shared.config.max_request_bytes,
    )
    .await?;
    crate::metrics::register_pool(&pool, shared.registry.task_types());
    let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
    let runner = Arc::new(Worker {
        shared: shared.clone(),
        events: EventPublisher::new(
            publisher.clone(),
            shared.topology.clone(),
            shared.store.clone(),
        ),
        publishing: TaskTracker::new(),
        settler: Settler::new(
            publisher.clone(),
            shared.topology.clone(),
            consumer.queue().to_owned(),
        ),
        publisher,
        pool,
        shutdown: shutdown.clone(),
        outcomes,
        quarantine: capacity.quarantine.clone(),
        pace: capacity.pace.clone(),
        unclaimed: Arc::default(),
    });
    let recorder = tokio::spawn(runner.clone().record_loop(outcomes_rx));
    let consuming = shutdown.child_token();
    tokio::spawn(crate::known_pools::keep_registered(
        shared.store.clone(),
        vec![runner.pool.clone()],
        consuming.clone(),
    ));
    let consumed = consume(&mut consumer, &runner, &capacity, &shutdown).await;
    if consumed.is_ok() {
        // Shutdown: handlers in flight get the grace period to finish and be recorded
        // and acked.
        consumer
            .stop(&capacity.slots, prefetch, shared.config.grace_period)
            .await;
    } else {
        consumer.close().await;
    }
    // Whether it stops or fails, this run lets go of everything it opened: the recorder
    // holds the runner (and its publisher), and a restarted run makes its own.
    recorder.abort();
    consuming.cancel();
    runner.publishing.close();
    runner.publishing.wait().await;
    runner.events.close().await;
    runner.publisher.close().await;
    consumed
}

/// Takes deliveries in batches — whatever the consumer has buffered while handlers
/// are free, each with its slot and a handler's — and starts them, until shutdown
/// (`Ok`) or the consumer fails.
async fn consume(
    consumer: &mut Consumer,
    runner: &Arc<Worker>,
    capacity: &Capacity,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let config = &runner.shared.config;
    let mut depth = pace::Depth::new(config.concurrency, config.prefetch);
    let mut next = consumer.next(shutdown).await?;
    while let Some(first) = next {
        runner.settler.received(&first);
        // Every delivery holds a slot until it is settled. Deliveries taken without
        // one at shutdown stay unacked and return to the queue with the channel.
        let Some(slot) = take_slot(&capacity.slots, shutdown).await else {
            return Ok(());
        };
        let Some(handler) = take_slot(&capacity.handlers, shutdown).await else {
            return Ok(());
        };
        let mut batch = vec![Received::decoded(consumer, first, slot, handler)];
        while let Ok(handler) = capacity.handlers.clone().try_acquire_owned() {
            let Some(delivery) = consumer.buffered() else {
                break;
            };
            let delivery = delivery?;
            runner.settler.received(&delivery);
            let Some(slot) = take_slot(&capacity.slots, shutdown).await else {
                break;
            };
            batch.push(Received::decoded(consumer, delivery, slot, handler));
        }
        runner.start_batch(batch).await;
        if let Some(prefetch) = depth.next(&capacity.pace) {
            consumer.set_prefetch(prefetch).await?;
        }
        next = consumer.next(shutdown).await?;
    }
    Ok(())
}

/// A delivery with its slots, decoded.
struct Received {
    delivery: Delivery,
    slot: OwnedSemaphorePermit,
    handler: OwnedSemaphorePermit,
    message: Result<TaskMessage, DecodeError>,
}

impl Received {
    fn decoded(
        consumer: &Consumer,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        handler: OwnedSemaphorePermit,
    ) -> Self {
        let message = consumer.decode(&delivery);
        Self {
            delivery,
            slot,
            handler,
            message,
        }
    }
}

fn new_token() -> Arc<str> {
    uuid::Uuid::new_v4().to_string().into()
}

/// A delivery whose handler has run, on its way to being recorded.
struct Finished {
    delivery: Delivery,
    slot: OwnedSemaphorePermit,
    message: TaskMessage,
    outcome: TaskOutcome,
    /// Held until the outcome is recorded, for an attempt that ran unclaimed: copies
    /// of its message wait for it.
    _unclaimed: Option<unclaimed::Running>,
}

/// How an attempt starts.
enum Start {
    /// Claimed: fresh, or taken over.
    Claimed(Claim),
    /// Unclaimed, until its handler has run [`unclaimed::CLAIM_AFTER`].
    Unclaimed(unclaimed::Running),
}

struct Worker {
    shared: Arc<Shared>,
    publisher: Publisher,
    /// Publishes the events of the jobs whose last outcomes this worker records.
    events: EventPublisher,
    /// The publishing of those events: each batch's runs beside the next batch's
    /// recording, and the run waits for them before it closes.
    publishing: TaskTracker,
    pool: String,
    shutdown: CancellationToken,
    outcomes: mpsc::UnboundedSender<Finished>,
    settler: Settler,
    quarantine: Arc<RwLock<()>>,
    pace: Arc<pace::Pace>,
    unclaimed: Arc<unclaimed::Unclaimed>,
}

impl Worker {
    /// Decodes a batch of deliveries, finds which fresh ones may start (one read, or
    /// one claim for external tasks), and starts a handler for each; a redelivery, or
    /// a delivery that may not start as it is, goes the one-task way.
    async fn start_batch(self: &Arc<Self>, batch: Vec<Received>) {
        // A handler of this pod starts without a claim: the read finds which attempts
        // may start, and the outcome's compare-and-set counts each once. A hand-off is
        // recorded on a claimed row, so an external task is claimed first.
        let mut unclaimed = Vec::with_capacity(batch.len());
        let mut claiming = Vec::new();
        let mut in_batch = HashSet::new();
        for Received {
            delivery,
            slot,
            handler,
            message,
        } in batch
        {
            let message = match message {
                Ok(message) => message,
                Err(err) => {
                    drop(handler);
                    let runner = self.clone();
                    tokio::spawn(async move {
                        runner
                            .settler
                            .park_and_settle(delivery, slot, &err.to_string())
                            .await
                    });
                    continue;
                }
            };
            let key = (message.task_id, message.attempt);
            // A redelivery may need a takeover: the one-task claim handles it.
            if delivery.redelivered {
                self.spawn_single(delivery, slot, handler, message, new_token());
            } else if self.shared.registry.backend(&message.task_type).is_some() {
                // A second copy in the same batch must not share the first one's claim.
                match in_batch.insert(key) {
                    true => claiming.push((delivery, slot, handler, message)),
                    false => self.spawn_single(delivery, slot, handler, message, new_token()),
                }
            } else if let Some(running) = self.unclaimed.start(key) {
                unclaimed.push(((delivery, slot, handler, message), running));
            } else {
                // A copy of an attempt running here unclaimed: once the original is
                // recorded (or claimed), the copy's claim finds it moved on.
                let runner = self.clone();
                tokio::spawn(async move {
                    runner.unclaimed.wait(key, unclaimed::CLAIM_AFTER * 2).await;
                    runner.spawn_single(delivery, slot, handler, message, new_token());
                });
            }
        }
        let token = new_token();
        let key = |m: &TaskMessage| (m.task_id, m.attempt, m.run);
        let store = &self.shared.store;
        let mut startable = HashSet::new();
        if !unclaimed.is_empty() {
            let attempts: Vec<_> = unclaimed.iter().map(|((.., m), _)| key(m)).collect();
            match store.startable_tasks(&attempts).await {
                Ok(found) => startable = found,
                Err(err) => {
                    tracing::error!(%err, "reading a batch of tasks failed; claiming them one by one")
                }
            }
        }
        let mut claimed = HashSet::new();
        if !claiming.is_empty() {
            let claims: Vec<_> = claiming.iter().map(|(.., m)| key(m)).collect();
            match store
                .claim_tasks(&claims, &token, self.shared.config.lease)
                .await
            {
                Ok(found) => claimed = found,
                // Part of the batch may have been claimed before the error: the
                // one-task claims under the same token find those rows claimed by it.
                Err(err) => {
                    tracing::error!(%err, "claiming a batch of tasks failed; trying them one by one")
                }
            }
        }
        let fresh_claim = Claim {
            starts: 1,
            taken_over: false,
        };
        let starts = unclaimed
            .into_iter()
            .map(|(received, running)| (received, &startable, Start::Unclaimed(running)))
            .chain(
                claiming
                    .into_iter()
                    .map(|received| (received, &claimed, Start::Claimed(fresh_claim))),
            );
        for ((delivery, slot, handler, message), found, start) in starts {
            if !found.contains(&message.task_id) {
                drop(start);
                self.spawn_single(delivery, slot, handler, message, token.clone());
                continue;
            }
            let (runner, token) = (self.clone(), token.clone());
            let span = task_span(&message);
            tokio::spawn(
                async move {
                    runner
                        .attempt(delivery, slot, handler, message, &token, start)
                        .await
                }
                .instrument(span),
            );
        }
    }

    /// The one-task path: a claim that may take over a running attempt (redelivered,
    /// lease expired) — or finds the message stale.
    fn spawn_single(
        self: &Arc<Self>,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        handler: OwnedSemaphorePermit,
        message: TaskMessage,
        token: Arc<str>,
    ) {
        let runner = self.clone();
        let span = task_span(&message);
        let attempt = async move {
            let claim = runner
                .shared
                .store
                .claim_task(
                    message.task_id,
                    message.attempt,
                    message.run,
                    &token,
                    delivery.redelivered,
                    runner.shared.config.lease,
                )
                .await;
            match claim {
                Ok(Some(claim)) => {
                    runner
                        .attempt(
                            delivery,
                            slot,
                            handler,
                            message,
                            &token,
                            Start::Claimed(claim),
                        )
                        .await
                }
                Ok(None) => {
                    let settled = runner.settle_stale(&delivery, &message).await;
                    runner.settler.settle(delivery, slot, settled);
                }
                Err(err) => runner.settler.settle(delivery, slot, Err(err.into())),
            }
        };
        tokio::spawn(attempt.instrument(span));
    }
}

/// The span of one attempt: every log line of its claim, handler (the handler's own
/// lines included) and outcome carries the job and task ids.
fn task_span(message: &TaskMessage) -> tracing::Span {
    tracing::info_span!(
        "task",
        job_id = %message.job_id,
        task_id = message.task_id,
        attempt = message.attempt,
        task_type = %message.task_type,
    )
}
