//! Worker: runs task messages from one pool's work queue.
//!
//! Per message: claim the task row (a conditional UPDATE: a stale or duplicate
//! message claims nothing and is acked), run the registered handler with its lease
//! renewed, then record the outcome and only then ack:
//!
//! - success → `done` + result, finished event;
//! - failure, attempt n ≤ max_retries → `retrying`, retry message to the delay queue
//!   for n × retry_delay_ms;
//! - failure otherwise, or permanent → `failed`, finished event.
//!
//! Under load the database and broker work is batched without loosening any of that:
//! the deliveries the consumer has buffered are claimed in one statement, and the
//! outcomes that finish while a batch is being recorded are recorded together next —
//! one transaction, one finished-event message for all of them, every publish
//! confirmed, then the batch acked (coalesced by the `acks` module into `multiple`
//! acks that never cover a delivery still running). A handler panic is a failed attempt.
//!
//! Poison tasks fail alone: an attempt taken over from a worker that died (or lost its
//! channel) runs in quarantine — alone in its pod — and only then is its start
//! counted, so a task that keeps killing its worker fails once it was started more
//! than `max_deliveries` times, while the tasks that happened to run beside it are
//! never charged for its crashes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::sync::{
    mpsc, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, OwnedSemaphorePermit, RwLock, Semaphore,
};
use tokio_util::sync::CancellationToken;

use super::{take_slot, Shared};
use crate::amqp::acks::{Acks, Settlement};
use crate::amqp::broker::{all_confirmed, BrokerError, Outgoing, Pending, Publisher};
use crate::amqp::parking::park;
use crate::amqp::topology::Topology;
use crate::error::Error;
use crate::protocol::{self, FinishedTask, TaskMessage, TasksFinished};
use crate::registry::{TaskContext, TaskError};
use crate::state::TaskStatus;
use crate::store::{Claim, TaskOutcome, Transition};

/// Outcomes recorded in one transaction at most.
const RECORD_BATCH: usize = 256;
/// How long a handler whose timeout passed gets to return after its stop token fired,
/// before it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// How much of a pool one pod runs at once. It outlives one connection: handlers
/// started before a reconnect still count against it.
pub(crate) struct Capacity {
    /// One per delivery being handled (`config.concurrency`).
    slots: Arc<Semaphore>,
    /// Handlers run under its read side; a taken-over attempt, which may be what
    /// killed a worker, runs under its write side: alone.
    quarantine: Arc<RwLock<()>>,
}

impl Capacity {
    pub fn new(concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(concurrency)),
            quarantine: Arc::new(RwLock::new(())),
        })
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    pool: String,
    capacity: Arc<Capacity>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let slots = &capacity.slots;
    // Normalized: at least 1 and within what basic.qos carries.
    let concurrency = shared.config.concurrency;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(concurrency as u16, BasicQosOptions::default())
        .await?;
    shared.topology.forget_declared();
    shared.topology.declare_work_queue(&channel, &pool).await?;
    shared.topology.declare_delay_ladder(&channel).await?;
    let publisher = Publisher::open(&connection).await?;
    let queue = shared.topology.work_queue(&pool);
    let tag = format!("taskmill-worker-{}", uuid::Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue, concurrency, "worker consuming");
    let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
    let runner = Arc::new(Runner {
        shared: shared.clone(),
        publisher,
        pool,
        queue,
        shutdown: shutdown.clone(),
        outcomes,
        acks: Acks::start(),
        quarantine: capacity.quarantine.clone(),
    });
    let recorder = tokio::spawn(runner.clone().record_loop(outcomes_rx));
    let consuming = shutdown.child_token();
    tokio::spawn(crate::pools::keep_registered(
        shared.store.clone(),
        vec![runner.pool.clone()],
        consuming.clone(),
    ));
    let consumed = consume(&mut consumer, &runner, slots, &shutdown, concurrency).await;
    if consumed.is_ok() {
        // Shutdown: stop deliveries, then give handlers in flight the grace period to
        // finish and be recorded and acked; whatever is still unacked returns to the
        // queue when the channel closes.
        let _ = tokio::time::timeout(
            crate::amqp::broker::CLOSE_TIMEOUT,
            channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await;
        let grace = shared.config.grace_period;
        if tokio::time::timeout(grace, slots.acquire_many(concurrency as u32))
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "handlers still running after the grace period; leaving their tasks to redelivery"
            );
        }
    }
    // Whether it stops or fails, this run lets go of everything it opened: the recorder
    // holds the runner (and its channel), and a restarted run makes its own.
    recorder.abort();
    consuming.cancel();
    crate::amqp::broker::close_channel(&channel).await;
    runner.publisher.close().await;
    consumed
}

/// Takes deliveries in batches (whatever the consumer has buffered, each with a slot)
/// and dispatches them, until shutdown (`Ok`) or the consumer fails.
async fn consume(
    consumer: &mut lapin::Consumer,
    runner: &Arc<Runner>,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    concurrency: usize,
) -> Result<(), Error> {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => return Err(Error::Other("worker consumer ended".into())),
            },
        };
        runner.acks.received(&first);
        // Every delivery holds a slot until it is settled. Deliveries taken without
        // one at shutdown stay unacked and return to the queue with the channel.
        let Some(slot) = take_slot(slots, shutdown).await else {
            return Ok(());
        };
        let mut batch = vec![(first, slot)];
        while batch.len() < concurrency {
            let Some(Some(delivery)) = consumer.next().now_or_never() else {
                break;
            };
            let delivery = delivery?;
            runner.acks.received(&delivery);
            let Some(slot) = take_slot(slots, shutdown).await else {
                break;
            };
            batch.push((delivery, slot));
        }
        runner.dispatch(batch).await;
    }
}

/// A claimed attempt's turn to run its handler, held while it runs, with the starts
/// of its attempt so far.
struct Turn {
    starts: i32,
    _beside: Option<OwnedRwLockReadGuard<()>>,
    _alone: Option<OwnedRwLockWriteGuard<()>>,
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
}

struct Runner {
    shared: Arc<Shared>,
    publisher: Publisher,
    pool: String,
    queue: String,
    shutdown: CancellationToken,
    outcomes: mpsc::UnboundedSender<Finished>,
    acks: Acks,
    quarantine: Arc<RwLock<()>>,
}

impl Runner {
    /// Decodes a batch of deliveries, claims the fresh ones in one statement, and
    /// starts a handler for each claimed task.
    async fn dispatch(self: &Arc<Self>, batch: Vec<(Delivery, OwnedSemaphorePermit)>) {
        let mut fresh = Vec::with_capacity(batch.len());
        let mut in_batch = HashSet::with_capacity(batch.len());
        for (delivery, slot) in batch {
            match self.decode(&delivery) {
                // A second copy in the same batch must not share the first one's claim.
                Ok(message)
                    if !delivery.redelivered
                        && in_batch.insert((message.task_id, message.attempt)) =>
                {
                    fresh.push((delivery, slot, message))
                }
                // A redelivery may need a takeover: the one-task claim handles it.
                Ok(message) => self.spawn_single(delivery, slot, message, new_token()),
                Err(reason) => {
                    let runner = self.clone();
                    tokio::spawn(async move {
                        let parked = runner.park(&delivery, &reason).await;
                        runner.settle(delivery, slot, parked);
                    });
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        let token = new_token();
        let claims: Vec<(i64, i32)> = fresh
            .iter()
            .map(|(_, _, m)| (m.task_id, m.attempt))
            .collect();
        let claimed = match self
            .shared
            .store
            .claim_tasks(&claims, &token, self.shared.config.lease)
            .await
        {
            Ok(claimed) => claimed,
            // Part of the batch may have been claimed before the error: the one-task
            // claims under the same token find those rows claimed by it already.
            Err(err) => {
                tracing::error!(%err, "claiming a batch of tasks failed; trying them one by one");
                HashSet::new()
            }
        };
        for (delivery, slot, message) in fresh {
            if claimed.contains(&message.task_id) {
                let (runner, token) = (self.clone(), token.clone());
                let claim = Claim {
                    deliveries: 1,
                    taken_over: false,
                };
                tokio::spawn(async move {
                    runner.attempt(delivery, slot, message, &token, claim).await
                });
            } else {
                self.spawn_single(delivery, slot, message, token.clone());
            }
        }
    }

    /// The one-task path: a claim that may take over a running attempt (redelivered,
    /// lease expired) — or finds the message stale.
    fn spawn_single(
        self: &Arc<Self>,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        message: TaskMessage,
        token: Arc<str>,
    ) {
        let runner = self.clone();
        tokio::spawn(async move {
            let claim = runner
                .shared
                .store
                .claim_task(
                    message.task_id,
                    message.attempt,
                    &token,
                    delivery.redelivered,
                    runner.shared.config.lease,
                )
                .await;
            match claim {
                Ok(Some(claim)) => runner.attempt(delivery, slot, message, &token, claim).await,
                Ok(None) => {
                    let settled = runner.settle_stale(&delivery, &message).await;
                    runner.settle(delivery, slot, settled);
                }
                Err(err) => runner.settle(delivery, slot, Err(err.into())),
            }
        });
    }

    fn decode(&self, delivery: &Delivery) -> Result<TaskMessage, String> {
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str());
        protocol::decode(
            &delivery.data,
            content_type,
            self.shared.config.max_request_bytes,
        )
        .and_then(|m: TaskMessage| protocol::check_message_version(m.version).map(|()| m))
        .map_err(|err| err.to_string())
    }

    /// Runs one claimed attempt and hands its outcome to the recorder.
    async fn attempt(
        &self,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        message: TaskMessage,
        token: &str,
        claim: Claim,
    ) {
        let result = if !self.shared.registry.knows_task_type(&message.task_type) {
            if let Err(err) = self
                .park(
                    &delivery,
                    &format!("unknown task type {:?}", message.task_type),
                )
                .await
            {
                return self.settle(delivery, slot, Err(err));
            }
            Err(TaskError::permanent(format!(
                "unknown task type {:?} in pool {:?}",
                message.task_type, self.pool
            )))
        } else {
            // A taken-over attempt may be what killed the last worker: it runs alone,
            // so that if it kills this one too, no neighbour was running beside it. Its
            // start is counted only now, so waiting for its turn costs it nothing.
            let turn = if claim.taken_over {
                let alone = tokio::select! {
                    biased;
                    alone = self.quarantine.clone().write_owned() => alone,
                    // Its start not counted yet, it returns to the queue unsettled.
                    _ = self.shutdown.cancelled() => return,
                };
                match self
                    .shared
                    .store
                    .count_start(message.task_id, message.attempt, token)
                    .await
                {
                    Ok(Some(starts)) => Turn {
                        starts,
                        _beside: None,
                        _alone: Some(alone),
                    },
                    Ok(None) => {
                        let settled = self.settle_stale(&delivery, &message).await;
                        return self.settle(delivery, slot, settled);
                    }
                    Err(err) => return self.settle(delivery, slot, Err(err.into())),
                }
            } else {
                // A fresh claim counted its start already, so it runs whenever it can
                // — at once unless a quarantined attempt runs — even during shutdown,
                // like any claimed attempt; only a pod stopping while it waits behind
                // a quarantined one leaves it to redelivery, one start overcounted.
                tokio::select! {
                    biased;
                    beside = self.quarantine.clone().read_owned() => Turn {
                        starts: claim.deliveries,
                        _beside: Some(beside),
                        _alone: None,
                    },
                    _ = self.shutdown.cancelled() => return,
                }
            };
            let starts = turn.starts;
            let result = if starts > self.shared.config.max_deliveries {
                Err(TaskError::permanent(format!(
                    "attempt {} was started {starts} times without finishing: the task keeps killing its worker",
                    message.attempt
                )))
            } else {
                self.run_handler(&message, token).await
            };
            drop(turn);
            result
        };
        let outcome = match result {
            Ok(value) => TaskOutcome::Done(value),
            Err(err) if !err.is_permanent() && message.attempt <= message.max_retries => {
                tracing::debug!(task_id = message.task_id, attempt = message.attempt, error = %err, "attempt failed; will retry");
                TaskOutcome::Retrying(err.message().to_owned())
            }
            Err(err) => {
                tracing::warn!(task_id = message.task_id, attempt = message.attempt, error = %err, "task failed for good");
                TaskOutcome::Failed(err.message().to_owned())
            }
        };
        let finished = Finished {
            delivery,
            slot,
            message,
            outcome,
        };
        if let Err(mpsc::error::SendError(finished)) = self.outcomes.send(finished) {
            // The recorder is gone (shutdown past its grace): leave it to redelivery.
            drop(finished);
        }
    }

    /// How long this attempt may run: the job's limit, else the handler's, else the
    /// pod's default.
    fn timeout_of(&self, message: &TaskMessage) -> Duration {
        message
            .task_timeout_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis)
            .or_else(|| self.shared.registry.timeout(&message.task_type))
            .unwrap_or(self.shared.config.task_timeout)
    }

    /// Runs the handler in its own task (so a panic is an error, not a dead worker),
    /// renewing the lease while it runs. When its timeout passes, its stop token
    /// fires; if it has not returned [`STOP_GRACE`] later it is dropped, and the
    /// attempt fails (retryably) as timed out, freeing its slot.
    async fn run_handler(
        &self,
        message: &TaskMessage,
        token: &str,
    ) -> Result<serde_json::Value, TaskError> {
        let stop = CancellationToken::new();
        let ctx = TaskContext {
            job_id: message.job_id.clone(),
            task_id: message.task_id,
            task_type: message.task_type.clone(),
            attempt: message.attempt,
            max_retries: message.max_retries,
            payload: message.payload.clone(),
            shutdown: self.shutdown.clone(),
            stop: stop.clone(),
        };
        let timeout = self.timeout_of(message);
        let timed_out = || TaskError::retryable(format!("timed out after {timeout:?}"));
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut stopping = false;
        let Some(future) = self.shared.registry.start(ctx) else {
            return Err(TaskError::permanent(format!(
                "unknown task type {:?}",
                message.task_type
            )));
        };
        let mut handle = tokio::spawn(future);
        let lease = self.shared.config.lease;
        let mut renew =
            tokio::time::interval_at(tokio::time::Instant::now() + lease / 3, lease / 3);
        let started = std::time::Instant::now();
        // RabbitMQ closes the channel of a delivery unacked past consumer_timeout; the
        // task then comes back as a redelivery and runs a second time. Say so early.
        let warn_after = self.shared.config.consumer_timeout.mul_f64(0.8);
        let mut warned = false;
        loop {
            tokio::select! {
                joined = &mut handle => {
                    return match joined {
                        Ok(Err(_)) if stopping => Err(timed_out()),
                        Ok(result) => result,
                        Err(err) if err.is_panic() => Err(TaskError::retryable(format!(
                            "handler panicked: {}",
                            panic_message(err.into_panic())
                        ))),
                        Err(err) => Err(TaskError::retryable(format!("handler aborted: {err}"))),
                    };
                }
                _ = &mut deadline => {
                    if stopping {
                        handle.abort();
                        tracing::warn!(task_id = message.task_id, attempt = message.attempt, ?timeout, "handler dropped: it did not stop after its timeout");
                        return Err(timed_out());
                    }
                    stopping = true;
                    stop.cancel();
                    deadline.as_mut().reset(tokio::time::Instant::now() + STOP_GRACE);
                }
                _ = renew.tick() => {
                    if !warned && started.elapsed() > warn_after {
                        warned = true;
                        tracing::warn!(
                            task_id = message.task_id,
                            running = ?started.elapsed(),
                            consumer_timeout = ?self.shared.config.consumer_timeout,
                            "handler is nearing the broker's consumer_timeout; raise it in rabbitmq.conf for tasks this long"
                        );
                    }
                    match self.shared.store.renew_lease(message.task_id, message.attempt, token, lease).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(task_id = message.task_id, "lease lost while the handler runs"),
                        Err(err) => tracing::warn!(task_id = message.task_id, %err, "lease renewal failed"),
                    }
                }
            }
        }
    }

    /// Records outcomes in batches: whatever finished while the previous batch was
    /// being recorded goes into the next one.
    async fn record_loop(self: Arc<Self>, mut outcomes: mpsc::UnboundedReceiver<Finished>) {
        while let Some(first) = outcomes.recv().await {
            let mut batch = vec![first];
            while batch.len() < RECORD_BATCH {
                match outcomes.try_recv() {
                    Ok(finished) => batch.push(finished),
                    Err(_) => break,
                }
            }
            self.record(batch).await;
        }
    }

    /// Commits a batch of outcomes, sends what they cause (retries, one finished-event
    /// message), waits for every confirm, then acks.
    async fn record(&self, batch: Vec<Finished>) {
        let transitions: Vec<Transition> = batch
            .iter()
            .map(|f| Transition {
                job_id: f.message.job_id.clone(),
                task_id: f.message.task_id,
                attempt: f.message.attempt,
                outcome: f.outcome.clone(),
            })
            .collect();
        let recorded = match self.shared.store.finish_tasks(&transitions).await {
            Ok(recorded) => recorded,
            Err(err) if batch.len() > 1 && !err.is_transient() => {
                // One bad row must not fail its neighbours: record them one by one.
                for finished in batch {
                    Box::pin(self.record(vec![finished])).await;
                }
                return;
            }
            Err(err) if !err.is_transient() => {
                let mut finished = batch.into_iter().next().expect("one outcome");
                if let TaskOutcome::Done(_) = finished.outcome {
                    // A result the database refuses for good would fail the same way
                    // on every redelivery: fail the task with the reason instead.
                    tracing::error!(task_id = finished.message.task_id, %err, "could not record the task's result");
                    finished.outcome =
                        TaskOutcome::Failed(format!("could not record the result: {err}"));
                    return Box::pin(self.record(vec![finished])).await;
                }
                return self.settle(finished.delivery, finished.slot, Err(err.into()));
            }
            Err(err) => {
                tracing::error!(%err, outcomes = batch.len(), "recording outcomes failed; returning their messages to the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                for finished in batch {
                    self.settle(
                        finished.delivery,
                        finished.slot,
                        Err(Error::Other(err.to_string())),
                    );
                }
                return;
            }
        };
        let (done, stale): (Vec<Finished>, Vec<Finished>) = batch
            .into_iter()
            .partition(|f| recorded.contains(&f.message.task_id));
        let mut pending = Vec::new();
        let mut finished_tasks = Vec::new();
        let mut sent = Ok(());
        for finished in &done {
            match &finished.outcome {
                TaskOutcome::Retrying(_) => match self.send_retry(&finished.message).await {
                    Ok(confirm) => pending.push(confirm),
                    Err(err) => sent = Err(err),
                },
                outcome => finished_tasks.push(finished_task(&finished.message, outcome.status())),
            }
        }
        if !finished_tasks.is_empty() && sent.is_ok() {
            match self.send_finished(finished_tasks).await {
                Ok(confirm) => pending.push(confirm),
                Err(err) => sent = Err(err),
            }
        }
        if sent.is_ok() {
            sent = all_confirmed(pending).await.map_err(Error::from);
        }
        for finished in done {
            // Each delivery gets the error; a broker one stays one, so that a lost
            // connection is reported once per outage, not once per message.
            let result = match &sent {
                Ok(()) => Ok(()),
                Err(Error::Broker(err)) => Err(Error::Broker(err.clone())),
                Err(err) => Err(Error::Other(err.to_string())),
            };
            self.settle(finished.delivery, finished.slot, result);
        }
        for finished in stale {
            let settled = self.settle_stale_after_write(&finished.message).await;
            self.settle(finished.delivery, finished.slot, settled);
        }
    }

    /// Acks a delivery whose effects are committed and confirmed, or returns it to the
    /// queue; its slot is freed once that is on its way.
    fn settle(&self, delivery: Delivery, slot: OwnedSemaphorePermit, result: Result<(), Error>) {
        match result {
            Ok(()) => self.acks.settle(delivery, Settlement::Ack, slot),
            // The channel is gone: the broker returns the message by itself.
            Err(err) if err.is_broker_connection() => {
                tracing::debug!(%err, "task message not settled: broker connection lost");
            }
            Err(err) => {
                if let Error::Broker(BrokerError::Returned { .. }) = err {
                    // A queue this process declared is gone (deleted, a broker reset):
                    // declare it again on the next send instead of bouncing forever.
                    self.shared.topology.forget_declared();
                }
                tracing::error!(%err, "task message not settled; returning it to the queue");
                self.acks.settle(delivery, Settlement::Requeue, slot);
            }
        }
    }

    /// A message that claimed nothing: a duplicate, a stale attempt, a message for a
    /// cancelled task — or for no task at all, which is parked.
    async fn settle_stale(&self, delivery: &Delivery, message: &TaskMessage) -> Result<(), Error> {
        if self.shared.store.task(message.task_id).await?.is_none() {
            return self
                .park(
                    delivery,
                    &format!("task {} does not exist", message.task_id),
                )
                .await;
        }
        self.settle_stale_after_write(message).await
    }

    /// If the row shows that what this attempt should have caused may not have been
    /// sent (a crash between commit and publish), send it again: duplicates of those
    /// messages are harmless.
    async fn settle_stale_after_write(&self, message: &TaskMessage) -> Result<(), Error> {
        let Some(row) = self.shared.store.task(message.task_id).await? else {
            return Ok(());
        };
        match row.status.parse::<TaskStatus>().ok() {
            Some(TaskStatus::Retrying) if row.attempts == message.attempt => {
                self.send_retry(message).await?.confirmed().await?;
            }
            // Re-checking a job that already ended costs one row lock.
            Some(status @ (TaskStatus::Done | TaskStatus::Failed)) => {
                self.send_finished(vec![finished_task(message, status)])
                    .await?
                    .confirmed()
                    .await?;
            }
            _ => {
                tracing::debug!(task_id = message.task_id, attempt = message.attempt, status = %row.status, "stale task message acked");
            }
        }
        Ok(())
    }

    /// Sends attempt n+1 into the delay ladder to wait n × retry_delay_ms; the broker
    /// moves it back to the pool's work queue when the wait is over. No worker sleeps
    /// meanwhile.
    async fn send_retry(&self, message: &TaskMessage) -> Result<Pending, Error> {
        let delay_ms = protocol::retry_wait_ms(message.attempt, message.retry_delay_ms);
        let topology = &self.shared.topology;
        topology
            .declare_delay_ladder(&self.publisher.channel().await?)
            .await?;
        let body = message.next_attempt().to_body();
        let entry = topology.delay_entry(delay_ms);
        let routing_key = Topology::delay_routing_key(delay_ms, &self.pool);
        Ok(self
            .publisher
            .send(Outgoing {
                exchange: &entry,
                routing_key: &routing_key,
                body: &body,
                mandatory: true,
                headers: None,
            })
            .await?)
    }

    async fn send_finished(&self, tasks: Vec<FinishedTask>) -> Result<Pending, Error> {
        let body =
            serde_json::to_vec(&TasksFinished::new(tasks)).expect("a finished event serializes");
        let queue = self.shared.topology.completion_queue();
        Ok(self
            .publisher
            .send(Outgoing::to_queue(&queue, &body))
            .await?)
    }

    async fn park(&self, delivery: &Delivery, reason: &str) -> Result<(), Error> {
        Ok(park(
            &self.publisher,
            &self.shared.topology,
            delivery,
            &self.queue,
            reason,
        )
        .await?)
    }
}

fn finished_task(message: &TaskMessage, status: TaskStatus) -> FinishedTask {
    FinishedTask {
        job_id: message.job_id.clone(),
        task_id: message.task_id,
        status: status.as_str().to_owned(),
        attempt: message.attempt,
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
