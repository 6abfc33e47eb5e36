//! Completion: counts finished tasks into their jobs and ends each job exactly once.
//!
//! Finished events are taken in batches (whatever the consumer has buffered, up to
//! the prefetch), grouped by job, and each job is checked once per batch in its own
//! transaction ([`crate::store::Store::record_finished`]), jobs in parallel. The
//! transaction that ends a job writes its event to the outbox; the event is published
//! after the commit, and the batch is acked only after that.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::broker::Publisher;
use crate::error::Error;
use crate::events::EventPublisher;
use crate::parking::park;
use crate::pod::Shared;
use crate::protocol::{self, TaskFinished};
use crate::store::Progress;

/// Finished events taken per batch (and the consumer's prefetch).
const BATCH: usize = 500;
/// Jobs of one batch checked at once.
const PARALLEL_JOBS: usize = 8;
/// How often the outbox relay looks for events whose publisher died.
const RELAY_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(BATCH as u16, BasicQosOptions::default())
        .await?;
    let publisher = Publisher::open(&connection).await?;
    let events = EventPublisher::new(
        publisher.clone(),
        shared.topology.clone(),
        shared.store.clone(),
    );
    // The relay lives as long as this run: a restarted run starts its own.
    let relay_token = shutdown.child_token();
    let _stop_relay = relay_token.clone().drop_guard();
    let relay = tokio::spawn(events.clone().run_relay(RELAY_INTERVAL, relay_token));
    let queue = shared.topology.completion_queue();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "taskmill-completion".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue, "completion consuming");
    let completion = Completion {
        shared,
        publisher,
        events,
        queue,
    };
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => return Err(Error::Other("completion consumer ended".into())),
            },
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                _ => break,
            }
        }
        completion.handle_batch(batch).await;
    }
    let _ = relay.await;
    let _ = channel.close(200, "shutdown".into()).await;
    completion.publisher.close().await;
    Ok(())
}

struct Completion {
    shared: Arc<Shared>,
    publisher: Publisher,
    events: EventPublisher,
    queue: String,
}

impl Completion {
    async fn handle_batch(&self, batch: Vec<Delivery>) {
        let mut by_job: BTreeMap<String, (Vec<i64>, Vec<Delivery>)> = BTreeMap::new();
        for delivery in batch {
            let content_type = delivery
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.as_str());
            let decoded = protocol::decode::<TaskFinished>(
                &delivery.data,
                content_type,
                self.shared.config.max_request_bytes,
            )
            .and_then(|event| protocol::check_message_version(event.version).map(|()| event));
            match decoded {
                Ok(event) => {
                    let entry = by_job.entry(event.job_id).or_default();
                    entry.0.push(event.task_id);
                    entry.1.push(delivery);
                }
                Err(err) => {
                    let parked = park(
                        &self.publisher,
                        &self.shared.topology,
                        &delivery,
                        &self.queue,
                        &err.to_string(),
                    )
                    .await;
                    settle(&[delivery], parked.is_ok()).await;
                }
            }
        }
        futures::stream::iter(by_job)
            .for_each_concurrent(
                PARALLEL_JOBS,
                |(job_id, (task_ids, deliveries))| async move {
                    let ok = self.check_job(&job_id, &task_ids).await;
                    settle(&deliveries, ok).await;
                },
            )
            .await;
    }

    /// Counts the job's finished tasks and publishes its event if this ended it.
    /// `false`: the check failed and the events go back to the queue.
    async fn check_job(&self, job_id: &str, task_ids: &[i64]) -> bool {
        match self.shared.store.record_finished(job_id, task_ids).await {
            Ok(Progress::Ended(event)) => {
                tracing::info!(job_id, kind = %event.kind, "job ended");
                self.events.publish_or_defer(&event).await;
                true
            }
            Ok(Progress::Counted { .. } | Progress::NotRunning) => true,
            Err(err) => {
                tracing::error!(job_id, %err, "completion check failed; events return to the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
        }
    }
}

async fn settle(deliveries: &[Delivery], ok: bool) {
    for delivery in deliveries {
        let result = if ok {
            delivery.acker.ack(BasicAckOptions::default()).await
        } else {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        };
        if let Err(err) = result {
            tracing::warn!(%err, "could not settle finished event; the broker will redeliver");
        }
    }
}
