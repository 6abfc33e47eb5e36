//! Forming a job: the checks a request must pass to become a job; a small job handed
//! to the group former ([`super::group`]), a larger one's rows inserted in adaptive
//! batches while a feeder ([`crate::roles::feed`]) publishes its task messages; a job
//! sent in parts goes on in [`super::parts`].

use chrono::Utc;
use lapin::message::Delivery;
use serde_json::value::RawValue;

use super::group::{Grouped, WHOLE_JOB_TASKS};
use super::{Intake, Rejection};
use crate::phases::PhasePlan;
use crate::protocol::{self, JobRequest, Target, DUE_HEADER};
use crate::retry::Delays;
use crate::state::JobStage;
use crate::store::{job, NewJob, NewRequest, NewTask, StartOutcome, WholeJob};

/// The job a request with this id made before, if it is the same request; a
/// different request under that id is parked: the job of the first request stands.
fn same_request(existing: job::Model, new_job: &NewJob) -> Result<job::Model, Rejection> {
    let reused = existing
        .request_digest
        .as_ref()
        .is_some_and(|first| *first != new_job.request_digest);
    if reused {
        return Err(Rejection::Park(format!(
            "job_id {:?} reused with a different request: the job of the first request \
             stands",
            new_job.id
        )));
    }
    Ok(existing)
}

/// Whether the request relay sent this request because its `run_at` has come.
fn is_due(delivery: &Delivery) -> bool {
    delivery
        .properties
        .headers()
        .as_ref()
        .is_some_and(|headers| headers.inner().contains_key(DUE_HEADER))
}

/// Rows per INSERT at first; halved on each error while above 5 (64→32→16→8→4), as
/// in the original, and doubled after each success up to `MAX_BATCH`, so a large job
/// costs few statements while a struggling database still gets small ones.
const FIRST_BATCH: usize = 64;
const MIN_BATCH_TO_HALVE: usize = 5;
const MAX_BATCH: usize = 1_024;

impl Intake {
    /// Turns a decoded request into a job (or finds the job it already made), its task
    /// messages published or handed to a feeder.
    pub(super) async fn accept(
        &self,
        delivery: &Delivery,
        request: &JobRequest<Box<RawValue>>,
    ) -> Result<(), Rejection> {
        let job_id = match &request.job_id {
            Some(id) => id.clone(),
            // Without a producer id, the AMQP message id (if valid) keeps a redelivered
            // request from becoming a second job.
            None => delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .filter(|id| protocol::check_id("message_id", id).is_ok())
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        };
        if !self
            .shared
            .pools
            .contains(&self.shared.store, &request.pool)
            .await?
        {
            return Err(Rejection::Park(format!(
                "unknown pool {:?}: no pod serves it and it is not among the known pools \
                 (TASKMILL_KNOWN_POOLS)",
                request.pool
            )));
        }
        let task_type = request.task_type().to_owned();
        if !self.shared.registry.knows_task_type(&task_type) {
            return Err(Rejection::Park(format!("unknown task type {task_type:?}")));
        }
        let new_job = self.new_job(job_id.clone(), request)?;
        let cap = self.shared.config.max_payload_bytes;
        check_payloads(request.tasks.as_deref().unwrap_or_default(), cap)?;
        if is_due(delivery) {
            // Its time has come: the request forms the scheduled job, as any job.
            if self.shared.store.unschedule(&job_id).await? {
                tracing::info!(job_id, "scheduled job due");
            }
        } else if request.run_at.is_some_and(|run_at| run_at > Utc::now()) {
            return self.schedule(&new_job, delivery, request).await;
        }
        if request.in_parts() {
            return self.accept_part(&new_job, &task_type, request).await;
        }
        let split;
        let payloads: &[Box<RawValue>] = match &request.tasks {
            Some(tasks) => tasks,
            None => match self
                .shared
                .registry
                .split(&request.job_type, &request.params)
            {
                Some(Ok(tasks)) => {
                    split = tasks
                        .iter()
                        .map(serde_json::value::to_raw_value)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|err| {
                            Rejection::Park(format!("splitter output is not JSON: {err}"))
                        })?;
                    check_payloads(&split, cap)?;
                    &split
                }
                Some(Err(err)) => {
                    return Err(Rejection::Park(format!(
                        "splitter for {:?} failed: {err}",
                        request.job_type
                    )))
                }
                None => {
                    return Err(Rejection::Park(format!(
                        "unknown job type {:?}: no tasks given and no splitter registered",
                        request.job_type
                    )))
                }
            },
        };
        if (1..=WHOLE_JOB_TASKS).contains(&payloads.len()) {
            let whole = WholeJob {
                tasks: new_tasks(&task_type, payloads, 0)?,
                job: new_job.clone(),
            };
            if let Grouped::Formed = self.groups.form(whole).await? {
                return Ok(());
            }
        }
        let job = self.create_job(&new_job, payloads.len()).await?;
        let stage = job.as_ref().map(|j| j.stage.parse::<JobStage>());
        match (job, stage) {
            (None, _) => self.form(&new_job, &task_type, payloads).await?,
            (Some(_), Some(Ok(JobStage::Formation))) => {
                tracing::info!(job_id, "resuming the formation of an existing job");
                self.form(&new_job, &task_type, payloads).await?
            }
            (Some(job), Some(Ok(JobStage::Running))) if !job.tasks_published => {
                tracing::info!(job_id, "resuming the publishing of an existing job");
                self.feeder.feed(&job.id);
            }
            (Some(job), stage) => {
                tracing::info!(job_id, "duplicate job request; the job exists already");
                if matches!(stage, Some(Ok(stage)) if stage.is_terminal()) {
                    self.answer_duplicate(&job.id, request.on_complete.as_ref())
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// The job row a request asks for.
    fn new_job(
        &self,
        id: String,
        request: &JobRequest<Box<RawValue>>,
    ) -> Result<NewJob, Rejection> {
        Ok(NewJob {
            id,
            job_type: request.job_type.clone(),
            queue: request.pool.clone(),
            params: request.params.clone(),
            max_retries: request.max_retries as i32,
            retry_delay_ms: request.retry_delay_ms as i64,
            on_failure: request.on_failure,
            on_complete: request.on_complete.clone(),
            request_digest: request.digest(),
            task_timeout_ms: request.task_timeout_ms.map(|ms| ms as i64),
            results_in_event: request.results_in_event,
            stage_plan: self.stage_plan(request)?,
            run_at: request.run_at,
        })
    }

    /// Creates the job in `formation`; `None` when it was created, or the job a
    /// request with the same id and digest made before. A different request under
    /// that id is parked: the job of the first request stands.
    pub(super) async fn create_job(
        &self,
        new_job: &NewJob,
        tasks: usize,
    ) -> Result<Option<crate::store::job::Model>, Rejection> {
        match self.shared.store.create_job(new_job).await? {
            None => {
                let (job_id, job_type) = (&new_job.id, &new_job.job_type);
                tracing::info!(%job_id, %job_type, tasks, "job created");
                Ok(None)
            }
            Some(existing) => same_request(existing, new_job).map(Some),
        }
    }

    /// Stores a job to run at its request's `run_at` ([`crate::store::Store::schedule_job`]):
    /// the request waits in the outbox of requests until then, and the relay sends it
    /// back, due. A part or the seal of a scheduled job waits beside the first.
    async fn schedule(
        &self,
        new_job: &NewJob,
        delivery: &Delivery,
        request: &JobRequest<Box<RawValue>>,
    ) -> Result<(), Rejection> {
        let waiting = NewRequest {
            job_id: new_job.id.clone(),
            job_type: request.job_type.clone(),
            body: String::from_utf8_lossy(&delivery.data).into_owned(),
            run_at: request.run_at,
        };
        let store = &self.shared.store;
        let Some(existing) = store.schedule_job(new_job, waiting.clone()).await? else {
            let run_at = request.run_at.map(|at| at.to_rfc3339());
            tracing::info!(job_id = %new_job.id, run_at, "job scheduled");
            return Ok(());
        };
        let job = same_request(existing, new_job)?;
        let stage = job.stage.parse::<JobStage>();
        if matches!(stage, Ok(JobStage::Scheduled)) && request.in_parts() {
            // A part sent twice waits twice: the part's claim makes the copy nothing.
            store.add_request(waiting).await?;
        } else if matches!(stage, Ok(stage) if stage.is_terminal()) {
            self.answer_duplicate(&job.id, request.on_complete.as_ref())
                .await?;
        }
        Ok(())
    }

    /// A producer that resubmits an ended job (after a lost confirm, say) still gets an
    /// answer: the stored event goes to the resubmission's own `on_complete` target.
    /// Not to the events exchange, which carries exactly one event per job.
    async fn answer_duplicate(
        &self,
        job_id: &str,
        target: Option<&Target>,
    ) -> Result<(), Rejection> {
        let Some(target) = target else { return Ok(()) };
        let Some(event) = self.shared.store.job_event(job_id).await? else {
            return Ok(());
        };
        self.events.publish_to(target, &event).await?;
        Ok(())
    }

    /// Inserts the task rows while a feeder publishes their messages as they are
    /// committed — workers start while the rest of a large job is still being stored —
    /// then starts the job.
    async fn form(
        &self,
        job: &NewJob,
        task_type: &str,
        payloads: &[Box<RawValue>],
    ) -> Result<(), Rejection> {
        self.feeder.feed(&job.id);
        self.insert_adaptively(job, task_type, payloads, 0).await?;
        self.start(&job.id, payloads.len() as i64).await
    }

    /// Moves a formed job to `running` with its task count (or on, or to its end).
    pub(super) async fn start(&self, job_id: &str, tasks: i64) -> Result<(), Rejection> {
        match self.shared.store.start_job(job_id, tasks).await? {
            // Its feeder may have rested, a job in parts waiting for its seal.
            StartOutcome::Running(_) => self.feeder.feed(job_id),
            StartOutcome::Advanced(change) => {
                self.feeder.feed(&change.job.id);
                self.events.publish_progress(&[*change]).await;
            }
            StartOutcome::Ended(event) => self.events.publish_or_defer(&[event]).await,
        }
        Ok(())
    }

    /// The job type's stages after the map stage, with the request's overrides; a
    /// request that asks for a reduce stage its job type lacks is parked.
    fn stage_plan(
        &self,
        request: &JobRequest<Box<RawValue>>,
    ) -> Result<Option<PhasePlan>, Rejection> {
        let asks = request.reduce_shards.is_some() || request.reduce_per_key.is_some();
        let Some(mut plan) = self.shared.registry.plan(&request.job_type).cloned() else {
            if asks {
                return Err(Rejection::Park(format!(
                    "job type {:?} has no reduce stage: reduce_shards and reduce_per_key \
                     do not apply",
                    request.job_type
                )));
            }
            return Ok(None);
        };
        if let Some(shards) = request.reduce_shards {
            plan.reduce.shards = shards;
        }
        if let Some(per_key) = request.reduce_per_key {
            plan.reduce.per_key = per_key;
        }
        Ok(Some(plan))
    }

    /// Inserts rows in adaptive batches, numbered from `first_ordinal`; on an error,
    /// halves the batch (while it is above 5) and waits with exponential backoff before
    /// going on. Payloads are parsed one batch at a time, so only the raw request stays
    /// in memory.
    pub(super) async fn insert_adaptively(
        &self,
        job: &NewJob,
        task_type: &str,
        payloads: &[Box<RawValue>],
        first_ordinal: usize,
    ) -> Result<(), Rejection> {
        let mut batch = FIRST_BATCH;
        let mut delays = Delays::transient();
        let mut done = 0;
        while done < payloads.len() {
            let end = (done + batch).min(payloads.len());
            let tasks = new_tasks(task_type, &payloads[done..end], first_ordinal + done)?;
            match self.shared.store.insert_tasks(&job.id, &tasks).await {
                Ok(true) => {
                    done = end;
                    batch = grown(batch);
                }
                Ok(false) => {
                    return Err(Rejection::Park(format!(
                        "job {:?} left formation while its request was being stored",
                        job.id
                    )))
                }
                Err(err) if err.is_transient() => {
                    let Some(delay) = delays.next() else {
                        return Err(err.into());
                    };
                    batch = shrunk(batch);
                    tracing::warn!(job_id = %job.id, %err, batch, ?delay, "task insert failed; retrying smaller");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }
}

/// The rows of `payloads`, numbered from `first_ordinal`.
fn new_tasks(
    task_type: &str,
    payloads: &[Box<RawValue>],
    first_ordinal: usize,
) -> Result<Vec<NewTask>, Rejection> {
    payloads
        .iter()
        .enumerate()
        .map(|(offset, raw)| {
            Ok(NewTask {
                ordinal: (first_ordinal + offset) as i32,
                task_type: task_type.to_owned(),
                payload: serde_json::from_str(raw.get())?,
            })
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()
        .map_err(|err| Rejection::Park(format!("malformed task payload: {err}")))
}

/// The batch after one that landed: twice as large, up to [`MAX_BATCH`].
fn grown(batch: usize) -> usize {
    (batch * 2).min(MAX_BATCH)
}

/// The batch after one that failed: half as large while above [`MIN_BATCH_TO_HALVE`].
fn shrunk(batch: usize) -> usize {
    if batch > MIN_BATCH_TO_HALVE {
        batch / 2
    } else {
        batch
    }
}

/// Refuses a request with a task payload over the cap: a task message holding it would
/// be refused by the workers (and the broker) it goes to.
fn check_payloads(payloads: &[Box<RawValue>], cap: usize) -> Result<(), Rejection> {
    match payloads
        .iter()
        .position(|payload| payload.get().len() > cap)
    {
        Some(n) => Err(Rejection::Park(crate::caps::over_cap(
            &format!("the payload of task {n} of the request"),
            payloads[n].get().len() as u64,
            cap,
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{grown, shrunk, FIRST_BATCH, MAX_BATCH};

    #[test]
    fn batches_double_after_success_up_to_the_cap() {
        let sizes: Vec<usize> = std::iter::successors(Some(FIRST_BATCH), |&b| Some(grown(b)))
            .take(6)
            .collect();
        assert_eq!(sizes, [64, 128, 256, 512, 1024, MAX_BATCH]);
    }

    #[test]
    fn batches_halve_after_errors_down_to_four() {
        let sizes: Vec<usize> = std::iter::successors(Some(FIRST_BATCH), |&b| Some(shrunk(b)))
            .take(7)
            .collect();
        assert_eq!(sizes, [64, 32, 16, 8, 4, 4, 4]);
    }
}
