//! What an operator does to a job that exists: cancel it, run it again. One home for
//! both, so that `Client::cancel`/`Client::retry`, the CLI (through the client) and the
//! dashboard's buttons take exactly the same path.

use crate::amqp::broker::Publisher;
use crate::amqp::topology::Topology;
use crate::error::Error;
use crate::messages::events::EventPublisher;
use crate::protocol::JobEvent;
use crate::store::{Rerun, Store};

/// Cancels a running or forming job and publishes its `job.cancelled` event on
/// `publisher`; `None` if it had ended (or never was).
pub(crate) async fn cancel_job(
    store: &Store,
    publisher: &Publisher,
    topology: &Topology,
    job_id: &str,
) -> Result<Option<JobEvent>, Error> {
    let Some(event) = store.cancel_job(job_id).await? else {
        return Ok(None);
    };
    let events = EventPublisher::new(publisher.clone(), topology.clone(), store.clone());
    events.publish_or_defer(std::slice::from_ref(&event)).await;
    events.close().await;
    serde_json::from_value(event.body)
        .map(Some)
        .map_err(|err| Error::unreadable_event(job_id, &err))
}

/// Runs a failed job's failed and cancelled tasks again; how many. It sends nothing itself: the rerun's
/// tasks are a feeder's, as a new job's are (the intakes' orphan scan finds the job
/// within seconds), so that a retry interrupted after its commit still runs whole and
/// the pool's feed depth holds.
pub(crate) async fn retry_job(store: &Store, job_id: &str) -> Result<u64, Error> {
    let (job, tasks) = match store.rerun_job(job_id).await? {
        Rerun::Started { job, tasks } => (job, tasks),
        Rerun::UnknownJob => return Err(Error::UnknownJob(job_id.to_owned())),
        Rerun::Refused(reason) => {
            return Err(Error::NotRetried {
                job_id: job_id.to_owned(),
                reason,
            })
        }
    };
    tracing::info!(job_id, run = job.run, tasks, "job retried");
    Ok(tasks)
}
