//! Completion: ends each job exactly once, when its tasks are over, where the
//! transaction that finished them could not.
//!
//! Workers count finished tasks into their jobs in the transaction that finishes them,
//! and a job those counters show over ends right there. A job that transaction cannot
//! settle — a multi-stage job whose phase is over, an ending the database refused —
//! gets a finished event (one message per batch of tasks), as do the tasks of
//! external backends, which the syncer records. This role takes
//! those events in batches (whatever the consumer has buffered, up to the prefetch)
//! and checks each job they touch once per batch: the jobs whose counters say they
//! are over end together in one transaction ([`crate::store::Store::check_jobs`]),
//! which writes their events to the outbox; the events are published after the
//! commit, and the batch is acked only after that. A multi-stage job whose phase is
//! over moves to its next phase in that transaction instead ([`crate::phases`]); after
//! the commit this role's feeder publishes the new phase's task messages and its
//! `job.stage` event goes out.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::Connection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::feed::Feeder;
use super::settle::Settler;
use super::shared::{take_slot, Shared};
use crate::amqp::broker::{Publisher, CLOSE_TIMEOUT};
use crate::amqp::consumer::Consumer;
use crate::error::Error;
use crate::messages::events::EventPublisher;
use crate::protocol::TasksFinished;

/// Finished events taken per batch (and the consumer's prefetch).
const BATCH: usize = 500;
/// How often the outbox relay looks for events whose publisher died. The relay runs
/// here only: every deployment runs the completion role, the one that ends jobs.
const RELAY_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let publisher = Publisher::open(&connection).await?;
    let events = EventPublisher::new(
        publisher.clone(),
        shared.topology.clone(),
        shared.store.clone(),
    );
    // The relay lives as long as this run: a restarted run starts its own.
    let relay_token = shutdown.child_token();
    let _stop_relay = relay_token.clone().drop_guard();
    let mut relay = tokio::spawn(events.clone().run_relay(RELAY_INTERVAL, relay_token));
    let mut consumer = Consumer::start(
        &connection,
        shared.topology.completion_queue(),
        BATCH,
        shared.config.max_request_bytes,
    )
    .await?;
    let feeding = shutdown.child_token();
    let _stop_feeding = feeding.clone().drop_guard();
    let completion = Completion {
        feeder: Feeder::new(shared.clone(), publisher.clone(), feeding),
        settler: Settler::new(
            publisher.clone(),
            shared.topology.clone(),
            consumer.queue().to_owned(),
        ),
        shared,
        publisher,
        events,
    };
    // One slot per delivery until it is settled, as in every consuming role.
    let slots = Arc::new(Semaphore::new(BATCH));
    'consuming: while let Some(batch) = consumer.next_batch(BATCH, &shutdown).await? {
        let mut held = Vec::with_capacity(batch.len());
        for delivery in batch {
            completion.settler.received(&delivery);
            let Some(slot) = take_slot(&slots, &shutdown).await else {
                break 'consuming;
            };
            held.push((delivery, slot));
        }
        completion.handle_batch(&consumer, held).await;
    }
    // The acks of the last batch go out before the channel closes.
    consumer.drain(&slots, BATCH, CLOSE_TIMEOUT).await;
    completion.feeder.stop().await;
    // The relay may be waiting on the database or a confirm: give it a moment, then
    // drop it (an unpublished event stays in the outbox for the next relay).
    if tokio::time::timeout(CLOSE_TIMEOUT, &mut relay)
        .await
        .is_err()
    {
        relay.abort();
    }
    consumer.close().await;
    completion.events.close().await;
    completion.publisher.close().await;
    Ok(())
}

struct Completion {
    shared: Arc<Shared>,
    publisher: Publisher,
    settler: Settler,
    events: EventPublisher,
    feeder: Feeder,
}

impl Completion {
    async fn handle_batch(
        &self,
        consumer: &Consumer,
        batch: Vec<(Delivery, OwnedSemaphorePermit)>,
    ) {
        // A message may report tasks of several jobs, and a job's tasks may come in
        // several messages: each job is checked once per batch.
        let mut jobs_touched: BTreeSet<String> = BTreeSet::new();
        let mut decoded = Vec::with_capacity(batch.len());
        for (delivery, slot) in batch {
            match consumer.decode::<TasksFinished>(&delivery) {
                Ok(finished) => {
                    jobs_touched.extend(finished.tasks.into_iter().map(|t| t.job_id));
                    decoded.push((delivery, slot));
                }
                Err(err) => {
                    self.settler
                        .park_and_settle(delivery, slot, &err.to_string())
                        .await
                }
            }
        }
        let jobs: Vec<String> = jobs_touched.into_iter().collect();
        let checked = self.check_jobs(&jobs).await;
        for (delivery, slot) in decoded {
            // A failed check was logged once for the batch; on a lost connection the
            // nacks fail quietly and the broker returns the batch all the same.
            match checked {
                true => self.settler.settle(delivery, slot, Ok(())),
                false => self.settler.requeue(delivery, slot),
            }
        }
    }

    /// Checks every job the batch touched, ending those that are over in one
    /// transaction, and publishes their events. `false`: the check failed and the
    /// batch goes back to the queue.
    async fn check_jobs(&self, job_ids: &[String]) -> bool {
        match self.shared.store.check_jobs(job_ids).await {
            Ok(checked) => {
                for event in &checked.ended {
                    tracing::info!(job_id = %event.job_id, kind = %event.kind, "job ended");
                }
                self.events.publish_or_defer(&checked.ended).await;
                for change in &checked.advanced {
                    tracing::info!(job_id = %change.job.id, phase = change.phase.as_str(), tasks = change.job.task_count - change.job.phase_first_ordinal, "job entered its next phase");
                    self.feeder.feed(&change.job.id);
                }
                self.events.publish_progress(&checked.advanced).await;
                true
            }
            Err(err) => {
                tracing::error!(jobs = job_ids.len(), %err, "completion check failed; events return to the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
        }
    }
}
