//! Submitting a job in the producer's own database transaction.
//!
//! [`submit_in`] writes the request into the `job_requests` outbox through the
//! caller's transaction, on the database that holds taskmill's tables; nothing is
//! published then. After the commit, the relay of an intake pod publishes the row to
//! the jobs exchange and deletes it once confirmed, and from there the request is like
//! any other: every check, the job id rule, the `job.rejected` answer. So the job
//! exists if and only if the transaction commits, and a crash anywhere after the
//! commit delays it without losing it: a row published twice (the relay died between
//! the confirm and the delete) names the same job both times and makes it once.

use sea_orm::ConnectionTrait;
use serde::Serialize;

use crate::error::Error;
use crate::parting::{Parting, PART_TASKS};
use crate::protocol::JobRequest;
use crate::store::{write_requests, NewRequest};

/// Writes `request` through `transaction` (a SeaORM `DatabaseTransaction`, or any
/// connection to the database of taskmill's tables) and returns its job id, generated
/// when the request has none. The request is checked here as
/// `Client::submit` checks it, and a job of more than [`PART_TASKS`] tasks is
/// written as parts and a seal, each a row. The job starts within a poll of the relay
/// (a fraction of a second) after the commit, as long as some pod runs the intake.
pub async fn submit_in<C: ConnectionTrait>(
    transaction: &C,
    request: JobRequest,
) -> Result<String, Error> {
    let (job_id, rows) = requests_of(request)?;
    write_requests(transaction, rows).await?;
    Ok(job_id)
}

/// The outbox rows of `request`, checked, and its job id (generated when it has none):
/// one row, or the parts and the seal of a job of more than [`PART_TASKS`] tasks.
pub(crate) fn requests_of(mut request: JobRequest) -> Result<(String, Vec<NewRequest>), Error> {
    let job_id = request
        .job_id
        .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
        .clone();
    let rows = match request.tasks.take() {
        Some(tasks) if tasks.len() > PART_TASKS => {
            let mut parting = Parting::new(request)?;
            let mut rows = Vec::new();
            for task in &tasks {
                let raw = serde_json::value::to_raw_value(task).expect("a JSON value serializes");
                if let Some(part) = parting.push(raw) {
                    rows.push(row(&job_id, &part));
                }
            }
            rows.extend(parting.finish().iter().map(|last| row(&job_id, last)));
            rows
        }
        tasks => {
            request.tasks = tasks;
            request.validate()?;
            vec![row(&job_id, &request)]
        }
    };
    Ok((job_id, rows))
}

fn row<T: Serialize>(job_id: &str, request: &JobRequest<T>) -> NewRequest {
    NewRequest {
        job_id: job_id.to_owned(),
        job_type: request.job_type.clone(),
        body: serde_json::to_string(request).expect("a request serializes"),
        // A request with a `run_at` of its own is scheduled by the intake.
        run_at: None,
    }
}
