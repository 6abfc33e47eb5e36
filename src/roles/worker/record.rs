//! Recording outcomes: a batch of outcomes in one transaction (with the ends of the
//! jobs they end), the retries and the finished-event message it causes, every
//! confirm, then the acks, then the ended jobs' events, published beside the next
//! batch.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use tokio::sync::mpsc;

use crate::amqp::broker::{all_confirmed, Pending};
use crate::error::Error;
use crate::messages;
use crate::metrics::{self, Outcome};
use crate::protocol::{FinishedTask, TaskMessage};
use crate::state::TaskStatus;
use crate::store::{Recorded, StoreError, TaskOutcome, Transition};

use super::{Finished, Worker};

/// Outcomes recorded in one transaction at most.
const RECORD_BATCH: usize = 256;

impl Worker {
    /// Records outcomes in batches: whatever finished while the previous batch was
    /// being recorded goes into the next one.
    pub(super) async fn record_loop(
        self: Arc<Self>,
        mut outcomes: mpsc::UnboundedReceiver<Finished>,
    ) {
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
    pub(super) async fn record(&self, batch: Vec<Finished>) {
        let transitions: Vec<Transition> = batch
            .iter()
            .map(|f| Transition {
                job_id: f.message.job_id.clone(),
                task_id: f.message.task_id,
                attempt: f.message.attempt,
                run: f.message.run,
                outcome: f.outcome.clone(),
            })
            .collect();
        // In a task of its own: when the broker connection fails, this run's recorder
        // is aborted, and a transaction cancelled half-way could return its database
        // connection to the pool still open, holding its job's row lock. Spawned, the
        // transaction commits or rolls back whatever happens to the recorder.
        let store = self.shared.store.clone();
        let written = tokio::spawn(async move { store.finish_tasks(&transitions).await }).await;
        let written = written.unwrap_or_else(|err| {
            Err(StoreError::Db(sea_orm::DbErr::Conn(
                sea_orm::RuntimeErr::Internal(format!("recording outcomes stopped: {err}")),
            )))
        });
        let Recorded {
            ids: recorded,
            ended,
            to_check,
        } = match written {
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
                return self
                    .settler
                    .settle(finished.delivery, finished.slot, Err(err.into()));
            }
            Err(err) => {
                tracing::error!(%err, outcomes = batch.len(), "recording outcomes failed; returning their messages to the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                for finished in batch {
                    self.settler.settle(
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
        for finished in &done {
            let outcome = match finished.outcome {
                TaskOutcome::Done(_) => Outcome::Done,
                TaskOutcome::Retrying(_) => Outcome::Retried,
                TaskOutcome::Failed(_) => Outcome::Failed,
            };
            let latency = messages::since_sent(&finished.delivery);
            metrics::task_recorded(&self.pool, &finished.message.task_type, outcome, latency);
        }
        let mut pending = Vec::new();
        let mut finished_tasks = Vec::new();
        let mut sent = Ok(());
        for finished in &done {
            match &finished.outcome {
                TaskOutcome::Retrying(_) => match self.send_retry(&finished.message).await {
                    Ok(confirm) => pending.push(confirm),
                    Err(err) => sent = Err(err),
                },
                // Only a job the transaction could not settle needs the completion
                // role; the others ended in it or are still going.
                outcome if to_check.contains(&finished.message.job_id) => {
                    finished_tasks.push(finished_task(&finished.message, outcome.status()))
                }
                _ => {}
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
            self.settler
                .settle(finished.delivery, finished.slot, result);
        }
        for finished in stale {
            let settled = self.settle_stale_after_write(&finished.message).await;
            self.settler
                .settle(finished.delivery, finished.slot, settled);
        }
        for event in &ended {
            tracing::info!(job_id = %event.job_id, kind = %event.kind, "job ended");
        }
        // After the acks: the events are safe in the outbox, and one that cannot be
        // published now is the outbox relay's. The next batch need not wait for their
        // confirms.
        if !ended.is_empty() {
            let events = self.events.clone();
            self.publishing
                .spawn(async move { events.publish_or_defer(&ended).await });
        }
    }

    /// A message that claimed nothing: a duplicate, a stale attempt, a message for a
    /// cancelled task — or for no task at all, which is parked.
    pub(super) async fn settle_stale(
        &self,
        delivery: &Delivery,
        message: &TaskMessage,
    ) -> Result<(), Error> {
        if self.shared.store.task(message.task_id).await?.is_none() {
            return self
                .settler
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
    pub(super) async fn settle_stale_after_write(
        &self,
        message: &TaskMessage,
    ) -> Result<(), Error> {
        let Some(row) = self.shared.store.task(message.task_id).await? else {
            return Ok(());
        };
        if row.run > message.run {
            // A copy from before `taskmill retry` reset the task: what it caused is
            // that run's business, and the retry resent the task itself.
            tracing::debug!(
                task_id = message.task_id,
                attempt = message.attempt,
                run = message.run,
                task_run = row.run,
                "task message of an earlier run dropped"
            );
            metrics::stale_run_message(&self.pool);
            return Ok(());
        }
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

    /// Sends attempt n+1 into the delay ladder ([`messages::send_retry`]).
    pub(super) async fn send_retry(&self, message: &TaskMessage) -> Result<Pending, Error> {
        messages::send_retry(&self.publisher, &self.shared.topology, &self.pool, message).await
    }

    pub(super) async fn send_finished(&self, tasks: Vec<FinishedTask>) -> Result<Pending, Error> {
        messages::send_finished(&self.publisher, &self.shared.topology, tasks).await
    }
}

pub(super) fn finished_task(message: &TaskMessage, status: TaskStatus) -> FinishedTask {
    FinishedTask {
        job_id: message.job_id.clone(),
        task_id: message.task_id,
        status: status.as_str().to_owned(),
        attempt: message.attempt,
    }
}
