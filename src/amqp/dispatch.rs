//! Dispatch: the one way a task message reaches its pool's work queue, for the intake
//! (first attempts), the sweeper (lost and stuck ones) and anyone else; the way a retry
//! enters the delay ladder; and the finished events the completion role consumes — for
//! the worker and the syncer alike.

use crate::amqp::broker::{Outgoing, Pending, Publisher};
use crate::amqp::topology::Topology;
use crate::error::Error;
use crate::protocol::{self, FinishedTask, JobSettings, TaskMessage, TasksFinished};
use crate::store::job;

/// The settings a job's task messages carry.
pub fn settings_of(job: &job::Model) -> JobSettings<'_> {
    JobSettings {
        job_id: &job.id,
        max_retries: job.max_retries,
        retry_delay_ms: job.retry_delay_ms,
        task_timeout_ms: job.task_timeout_ms,
    }
}

/// Publishes `message` to the work queue of `pool` (declared first, once per
/// connection); the caller awaits the confirm.
pub async fn send_task(
    publisher: &Publisher,
    topology: &Topology,
    pool: &str,
    message: &TaskMessage,
) -> Result<Pending, Error> {
    topology
        .declare_work_queue(&publisher.channel().await?, pool)
        .await?;
    let queue = topology.work_queue(pool);
    Ok(publisher
        .send(Outgoing::to_queue(&queue, &message.to_body()))
        .await?)
}

/// Sends attempt n+1 of `message` into the delay ladder to wait n × retry_delay_ms; the
/// broker moves it back to `pool`'s work queue when the wait is over. Nobody sleeps
/// meanwhile. Mandatory: a ladder queue that is gone is an error, not a lost retry.
pub async fn send_retry(
    publisher: &Publisher,
    topology: &Topology,
    pool: &str,
    message: &TaskMessage,
) -> Result<Pending, Error> {
    let delay_ms = protocol::retry_wait_ms(message.attempt, message.retry_delay_ms);
    topology
        .declare_delay_ladder(&publisher.channel().await?)
        .await?;
    let body = message.next_attempt().to_body();
    let entry = topology.delay_entry(delay_ms);
    let routing_key = Topology::delay_routing_key(delay_ms, pool);
    Ok(publisher
        .send(Outgoing {
            exchange: &entry,
            routing_key: &routing_key,
            body: &body,
            mandatory: true,
            headers: None,
        })
        .await?)
}

/// Sends one finished-event message reporting `tasks` to the completion queue.
pub async fn send_finished(
    publisher: &Publisher,
    topology: &Topology,
    tasks: Vec<FinishedTask>,
) -> Result<Pending, Error> {
    let body = serde_json::to_vec(&TasksFinished::new(tasks)).expect("a finished event serializes");
    let queue = topology.completion_queue();
    Ok(publisher.send(Outgoing::to_queue(&queue, &body)).await?)
}
