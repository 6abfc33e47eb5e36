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
//! Every publish is confirmed before the ack. A handler panic is a failed attempt. A
//! task whose attempt was delivered more than `max_deliveries` times without finishing
//! (it keeps killing its worker) fails instead of looping forever.

use std::sync::Arc;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::broker::{Outgoing, Publisher};
use crate::error::Error;
use crate::parking::park;
use crate::pod::Shared;
use crate::protocol::{self, TaskFinished, TaskMessage, SCHEMA_VERSION};
use crate::registry::{TaskContext, TaskError};
use crate::state::TaskStatus;
use crate::store::TaskOutcome;

/// Handlers in flight hold `slots` (sized `config.concurrency`), which outlive one
/// connection: handlers started before a reconnect still count against the limit.
pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    pool: String,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let concurrency = shared.config.concurrency.max(1);
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(
            concurrency.min(u16::MAX as usize) as u16,
            BasicQosOptions::default(),
        )
        .await?;
    shared.topology.declare_work_queue(&channel, &pool).await?;
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
    let runner = Arc::new(Runner {
        shared: shared.clone(),
        publisher,
        pool,
        queue,
        shutdown: shutdown.clone(),
    });
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => return Err(Error::Other("worker consumer ended".into())),
            },
        };
        let slot = slots.clone().acquire_owned().await.expect("semaphore open");
        let runner = runner.clone();
        tokio::spawn(async move {
            runner.handle(delivery).await;
            drop(slot);
        });
    }
    // Stop deliveries, then give handlers in flight the grace period to finish and
    // ack; whatever is still unacked returns to the queue when the channel closes.
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
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
    let _ = channel.close(200, "shutdown".into()).await;
    runner.publisher.close().await;
    Ok(())
}

struct Runner {
    shared: Arc<Shared>,
    publisher: Publisher,
    pool: String,
    queue: String,
    shutdown: CancellationToken,
}

impl Runner {
    async fn handle(&self, delivery: Delivery) {
        if let Err(err) = self.process(&delivery).await {
            // Unacked, the message returns to the queue when the channel closes, and
            // the conditional transitions make its second run harmless.
            if err.is_broker_connection() {
                tracing::debug!(%err, "task message not settled: broker connection lost");
            } else {
                tracing::error!(%err, "task message not settled; returning it to the queue");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                if let Err(err) = delivery.acker.nack(requeue).await {
                    tracing::debug!(%err, "nack failed; the broker will redeliver");
                }
            }
            return;
        }
        if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
            tracing::debug!(%err, "ack failed; the broker will redeliver");
        }
    }

    /// Everything but the ack. Returning `Ok` means the ack may go out: every row
    /// change is committed and every message it caused is confirmed.
    async fn process(&self, delivery: &Delivery) -> Result<(), Error> {
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str());
        let message: TaskMessage = match protocol::decode(
            &delivery.data,
            content_type,
            self.shared.config.max_request_bytes,
        )
        .and_then(|m: TaskMessage| protocol::check_message_version(m.version).map(|()| m))
        {
            Ok(message) => message,
            Err(err) => return self.park(delivery, &err.to_string()).await,
        };
        let token = uuid::Uuid::new_v4().to_string();
        let store = &self.shared.store;
        let claim = store
            .claim_task(
                message.task_id,
                message.attempt,
                &token,
                delivery.redelivered,
                self.shared.config.lease,
            )
            .await?;
        let Some(claim) = claim else {
            return self.settle_stale(delivery, &message).await;
        };
        let outcome = if !self.shared.registry.knows_task_type(&message.task_type) {
            self.park(
                delivery,
                &format!("unknown task type {:?}", message.task_type),
            )
            .await?;
            Err(TaskError::permanent(format!(
                "unknown task type {:?} in pool {:?}",
                message.task_type, self.pool
            )))
        } else if claim.deliveries > self.shared.config.max_deliveries {
            Err(TaskError::permanent(format!(
                "attempt {} was delivered {} times without finishing: the task keeps killing its worker",
                message.attempt, claim.deliveries
            )))
        } else {
            self.run_handler(&message, &token).await
        };
        self.record(&message, outcome).await
    }

    /// Runs the handler in its own task (so a panic is an error, not a dead worker),
    /// renewing the lease while it runs.
    async fn run_handler(
        &self,
        message: &TaskMessage,
        token: &str,
    ) -> Result<serde_json::Value, TaskError> {
        let ctx = TaskContext {
            job_id: message.job_id.clone(),
            task_id: message.task_id,
            task_type: message.task_type.clone(),
            attempt: message.attempt,
            max_retries: message.max_retries,
            payload: message.payload.clone(),
            shutdown: self.shutdown.clone(),
        };
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
                        Ok(result) => result,
                        Err(err) if err.is_panic() => Err(TaskError::retryable(format!(
                            "handler panicked: {}",
                            panic_message(err.into_panic())
                        ))),
                        Err(err) => Err(TaskError::retryable(format!("handler aborted: {err}"))),
                    };
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

    /// Commits the attempt's outcome and sends what it causes.
    async fn record(
        &self,
        message: &TaskMessage,
        outcome: Result<serde_json::Value, TaskError>,
    ) -> Result<(), Error> {
        let store = &self.shared.store;
        let (task_id, attempt) = (message.task_id, message.attempt);
        let mut final_outcome = match outcome {
            Ok(result) => TaskOutcome::Done(result),
            Err(err) if !err.is_permanent() && attempt <= message.max_retries => {
                tracing::debug!(task_id, attempt, error = %err, "attempt failed; will retry");
                if store.retry_task(task_id, attempt, err.message()).await? {
                    return self.publish_retry(message).await;
                }
                return self.settle_stale_after_write(message).await;
            }
            Err(err) => {
                tracing::warn!(task_id, attempt, error = %err, "task failed for good");
                TaskOutcome::Failed(err.message().to_owned())
            }
        };
        let recorded = match store.finish_task(task_id, attempt, &final_outcome).await {
            // A result the database refuses for good (not a passing outage) would
            // fail the same way on every redelivery: fail the task with the reason.
            Err(err) if !err.is_transient() && matches!(final_outcome, TaskOutcome::Done(_)) => {
                tracing::error!(task_id, %err, "could not record the task's result");
                final_outcome = TaskOutcome::Failed(format!("could not record the result: {err}"));
                store.finish_task(task_id, attempt, &final_outcome).await?
            }
            recorded => recorded?,
        };
        if recorded {
            let status = match final_outcome {
                TaskOutcome::Done(_) => TaskStatus::Done,
                TaskOutcome::Failed(_) => TaskStatus::Failed,
            };
            return self.publish_finished(message, status).await;
        }
        self.settle_stale_after_write(message).await
    }

    /// A message that claimed nothing: a duplicate, a stale attempt, or a message
    /// for a cancelled task. If the row shows that what this attempt should have
    /// caused may not have been sent (a crash between commit and publish), send it
    /// again: duplicates of those messages are harmless.
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

    async fn settle_stale_after_write(&self, message: &TaskMessage) -> Result<(), Error> {
        let Some(row) = self.shared.store.task(message.task_id).await? else {
            return Ok(());
        };
        let status = row.status.parse::<TaskStatus>().ok();
        match status {
            Some(TaskStatus::Retrying) if row.attempts == message.attempt => {
                self.publish_retry(message).await
            }
            Some(status @ (TaskStatus::Done | TaskStatus::Failed)) if !row.counted => {
                self.publish_finished(message, status).await
            }
            _ => {
                tracing::debug!(task_id = message.task_id, attempt = message.attempt, status = %row.status, "stale task message acked");
                Ok(())
            }
        }
    }

    /// Sends attempt n+1 to the delay queue for n × retry_delay_ms; the broker moves
    /// it back to the work queue when the wait is over. No worker sleeps meanwhile.
    async fn publish_retry(&self, message: &TaskMessage) -> Result<(), Error> {
        let delay_ms = i64::from(message.attempt) * message.retry_delay_ms;
        let delay_queue = self
            .shared
            .topology
            .declare_delay_queue(self.publisher.channel(), &self.pool, delay_ms)
            .await?;
        let next = TaskMessage {
            attempt: message.attempt + 1,
            ..message.clone()
        };
        let body = serde_json::to_vec(&next).expect("a task message serializes");
        self.publisher
            .publish(Outgoing::to_queue(&delay_queue, &body))
            .await?;
        Ok(())
    }

    async fn publish_finished(
        &self,
        message: &TaskMessage,
        status: TaskStatus,
    ) -> Result<(), Error> {
        let event = TaskFinished {
            version: SCHEMA_VERSION,
            job_id: message.job_id.clone(),
            task_id: message.task_id,
            status: status.as_str().to_owned(),
            attempt: message.attempt,
        };
        let body = serde_json::to_vec(&event).expect("a finished event serializes");
        let queue = self.shared.topology.completion_queue();
        self.publisher
            .publish(Outgoing::to_queue(&queue, &body))
            .await?;
        Ok(())
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

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
