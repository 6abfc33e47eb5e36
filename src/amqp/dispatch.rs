//! Dispatch: the one way a task message reaches its pool's work queue, for the intake
//! (first attempts), the sweeper (lost and stuck ones) and anyone else. Retries take
//! the delay ladder instead (the worker's `send_retry`).

use crate::amqp::broker::{Outgoing, Pending, Publisher};
use crate::amqp::topology::Topology;
use crate::error::Error;
use crate::protocol::{JobSettings, TaskMessage};
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
