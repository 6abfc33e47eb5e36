//! Running one attempt: its turn (alone in quarantine if it was taken over), its
//! handler under a lease and a timeout, and the outcome handed to the recorder.
//!
//! A fresh attempt of a handler starts unclaimed: a handler that returns within
//! [`CLAIM_AFTER`] costs no write but its outcome's. One still running then is claimed,
//! so that it shows as running, holds a lease the sweeper respects, and counts its
//! start: a task that kills its worker later than that is charged from its first
//! start; one that kills it sooner, from its redelivery on (which always claims).

use std::time::Duration;

use lapin::message::Delivery;
use tokio::sync::{mpsc, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::Error;
use crate::external::Backend;
use crate::metrics;
use crate::protocol::TaskMessage;
use crate::registry::{TaskContext, TaskError};
use crate::store::TaskOutcome;

use super::unclaimed::CLAIM_AFTER;
use super::{Finished, Start, Worker};

/// How long a handler whose timeout passed gets to return after its stop token fired,
/// before it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// Tries of one hand-off under its key at most, before its attempt fails.
const HAND_OFF_TRIES: u32 = 4;
/// The wait after a hand-off's first failed try; it doubles after each.
const HAND_OFF_RETRY_WAIT: Duration = Duration::from_millis(250);

/// A claimed attempt's turn to run its handler, held while it runs, with the starts
/// of its attempt so far.
struct Turn {
    starts: i32,
    _handler: OwnedSemaphorePermit,
    _beside: Option<OwnedRwLockReadGuard<()>>,
    _alone: Option<OwnedRwLockWriteGuard<()>>,
}

impl Worker {
    /// Runs one attempt, claimed or still unclaimed, and hands its outcome to the
    /// recorder.
    pub(super) async fn attempt(
        &self,
        delivery: Delivery,
        slot: OwnedSemaphorePermit,
        handler: OwnedSemaphorePermit,
        message: TaskMessage,
        token: &str,
        start: Start,
    ) {
        let (claim, unclaimed) = match start {
            Start::Claimed(claim) => (Some(claim), None),
            Start::Unclaimed(running) => (None, Some(running)),
        };
        let result = if !self.shared.registry.knows_task_type(&message.task_type) {
            drop(handler);
            if let Err(err) = self
                .settler
                .park(
                    &delivery,
                    &format!("unknown task type {:?}", message.task_type),
                )
                .await
            {
                return self.settler.settle(delivery, slot, Err(err));
            }
            Err(TaskError::permanent(format!(
                "unknown task type {:?} in pool {:?}",
                message.task_type, self.pool
            )))
        } else {
            // A taken-over attempt may be what killed the last worker: it runs alone,
            // so that if it kills this one too, no neighbour was running beside it. Its
            // start is counted only now, so waiting for its turn costs it nothing.
            let turn = if claim.is_some_and(|claim| claim.taken_over) {
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
                        _handler: handler,
                        _beside: None,
                        _alone: Some(alone),
                    },
                    Ok(None) => {
                        let settled = self.settle_stale(&delivery, &message).await;
                        return self.settler.settle(delivery, slot, settled);
                    }
                    Err(err) => return self.settler.settle(delivery, slot, Err(err.into())),
                }
            } else {
                // A fresh attempt runs whenever it can — at once unless a quarantined
                // attempt runs — even during shutdown, like any claimed attempt; only
                // a pod stopping while it waits behind a quarantined one leaves it to
                // redelivery (a claimed one with a start overcounted).
                tokio::select! {
                    biased;
                    beside = self.quarantine.clone().read_owned() => Turn {
                        starts: claim.map_or(1, |claim| claim.starts),
                        _handler: handler,
                        _beside: Some(beside),
                        _alone: None,
                    },
                    _ = self.shutdown.cancelled() => return,
                }
            };
            let starts = turn.starts;
            let result = if starts > self.shared.config.max_starts {
                Err(TaskError::permanent(format!(
                    "attempt {} was started {starts} times without finishing: the task keeps killing its worker",
                    message.attempt
                )))
            } else if let Some(backend) = self.shared.registry.backend(&message.task_type) {
                match self.hand_off(&message, backend.as_ref()).await {
                    Ok(external_id) => {
                        drop(turn);
                        let recorded = self
                            .record_hand_off(&delivery, &message, &external_id)
                            .await;
                        return self.settler.settle(delivery, slot, recorded);
                    }
                    Err(err) => Err(err),
                }
            } else {
                let started = std::time::Instant::now();
                metrics::task_started(&self.pool, &message.task_type);
                let result = self.run_handler(&message, token, claim.is_some()).await;
                let ran = started.elapsed();
                self.pace.record(ran);
                metrics::task_ran(&self.pool, &message.task_type, ran);
                result
            };
            drop(turn);
            result
        };
        let cap = self.shared.config.max_payload_bytes;
        let outcome = match result.map(|value| (crate::caps::json_bytes(&value), value)) {
            // A result over the cap would be a payload over it in the next phase, or a
            // job result nobody can be sent: the same input would make it again.
            Ok((bytes, _)) if bytes > cap as u64 => {
                let what = format!(
                    "the result of task {} ({}, attempt {})",
                    message.task_id, message.task_type, message.attempt
                );
                TaskOutcome::Failed(crate::caps::over_cap(&what, bytes, cap))
            }
            Ok((_, value)) => TaskOutcome::Done(value),
            Err(err) => {
                let error = err.message().to_owned();
                let outcome = if err.is_permanent() {
                    TaskOutcome::Failed(error)
                } else {
                    TaskOutcome::of_failure(error, message.attempt, message.max_retries)
                };
                match outcome {
                    TaskOutcome::Retrying(_) => {
                        tracing::debug!(task_id = message.task_id, attempt = message.attempt, error = %err, "attempt failed; will retry")
                    }
                    _ => {
                        tracing::warn!(task_id = message.task_id, attempt = message.attempt, error = %err, "task failed for good")
                    }
                }
                outcome
            }
        };
        let finished = Finished {
            delivery,
            slot,
            message,
            outcome,
            _unclaimed: unclaimed,
        };
        if let Err(mpsc::error::SendError(finished)) = self.outcomes.send(finished) {
            // The recorder is gone (shutdown past its grace): leave it to redelivery.
            drop(finished);
        }
    }

    /// Claims a running attempt not claimed yet (`Some(false)`), or renews the lease of
    /// one claimed (`Some(true)`); returns what the attempt is now. An attempt that
    /// cannot be claimed moved on meanwhile (a copy finished it, its job ended): the
    /// handler runs on, and its outcome will find the row moved (`None`).
    async fn keep_claim(
        &self,
        message: &TaskMessage,
        token: &str,
        ours: Option<bool>,
    ) -> Option<bool> {
        let store = &self.shared.store;
        let (task_id, lease) = (message.task_id, self.shared.config.lease);
        match ours {
            Some(false) => {
                let attempt = [(task_id, message.attempt, message.run)];
                match store.claim_tasks(&attempt, token, lease).await {
                    Ok(claimed) if claimed.contains(&task_id) => Some(true),
                    Ok(_) => {
                        tracing::debug!(task_id, "task moved on while its unclaimed handler runs");
                        None
                    }
                    Err(err) => {
                        tracing::warn!(task_id, %err, "claiming a running attempt failed");
                        Some(false)
                    }
                }
            }
            Some(true) => {
                match store
                    .renew_lease(task_id, message.attempt, token, lease)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(task_id, "lease lost while the handler runs"),
                    Err(err) => tracing::warn!(task_id, %err, "lease renewal failed"),
                }
                Some(true)
            }
            None => None,
        }
    }

    /// Hands an external task's attempt to its backend, keyed `"<task id>:<attempt>"`
    /// (`"<task id>:<attempt>:r<run>"` after a retry of the failed job, whose attempts
    /// start over) so that a second hand-off of the attempt (after a crash before the
    /// commit) makes no second external task. A failed try is tried again under the
    /// same key — up to [`HAND_OFF_TRIES`] tries within the attempt's timeout — since
    /// the backend may have taken the task and only its answer was lost: a retried
    /// attempt would hand off under a new key and leave that task orphaned there. Then
    /// the attempt fails retryably.
    async fn hand_off(
        &self,
        message: &TaskMessage,
        backend: &dyn Backend,
    ) -> Result<String, TaskError> {
        let mut key = format!("{}:{}", message.task_id, message.attempt);
        if message.run > 1 {
            key.push_str(&format!(":r{}", message.run));
        }
        let timeout = self.timeout_of(message);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut wait = HAND_OFF_RETRY_WAIT;
        let mut tries = 0;
        loop {
            tries += 1;
            let handed =
                tokio::time::timeout_at(deadline, backend.hand_off(&key, &message.payload));
            let err = match handed.await {
                Ok(Ok(external_id)) => return Ok(external_id),
                Ok(Err(err)) => err,
                Err(_) => {
                    return Err(TaskError::retryable(format!(
                        "hand-off timed out after {timeout:?} ({tries} tries under key {key})"
                    )))
                }
            };
            if tries >= HAND_OFF_TRIES || tokio::time::Instant::now() + wait >= deadline {
                return Err(TaskError::retryable(format!(
                    "hand-off failed: {err} ({tries} tries under key {key})"
                )));
            }
            tracing::debug!(task_id = message.task_id, %key, error = %err, "hand-off failed; trying the same key again");
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }

    /// Commits a hand-off; the message is acked after it. A task that moved meanwhile
    /// is settled as any stale message.
    async fn record_hand_off(
        &self,
        delivery: &Delivery,
        message: &TaskMessage,
        external_id: &str,
    ) -> Result<(), Error> {
        let store = &self.shared.store;
        if store
            .record_hand_off(
                message.task_id,
                (message.attempt, message.run),
                &message.task_type,
                external_id,
            )
            .await?
        {
            tracing::debug!(task_id = message.task_id, attempt = message.attempt, %external_id, "task handed off");
            return Ok(());
        }
        self.settle_stale(delivery, message).await
    }

    /// How long this attempt may run: the job's limit, else the handler's, else the
    /// pod's default.
    pub(super) fn timeout_of(&self, message: &TaskMessage) -> Duration {
        message
            .task_timeout_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis)
            .or_else(|| self.shared.registry.timeout(&message.task_type))
            .unwrap_or(self.shared.config.task_timeout)
    }

    /// Runs the handler in its own task (so a panic is an error, not a dead worker),
    /// claiming the attempt after [`CLAIM_AFTER`] if it is not `claimed` yet, and
    /// renewing the lease while it runs. When its timeout passes, its stop token
    /// fires; if it has not returned [`STOP_GRACE`] later it is dropped, and the
    /// attempt fails (retryably) as timed out, freeing its slot.
    pub(super) async fn run_handler(
        &self,
        message: &TaskMessage,
        token: &str,
        claimed: bool,
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
        // The handler's own log lines carry the attempt's span: its job and task ids.
        let mut handle = tokio::spawn(future.instrument(tracing::Span::current()));
        let lease = self.shared.config.lease;
        let first = match claimed {
            true => lease / 3,
            false => CLAIM_AFTER.min(lease / 3),
        };
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + first, lease / 3);
        // Whether the attempt is ours in the store: claimed, or still to claim (Some(false)).
        let mut ours = Some(claimed);
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
                    ours = self.keep_claim(message, token, ours).await;
                }
            }
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
