//! Group formation: small new jobs of many requests made in one transaction.
//!
//! A request whose job fits in one insert hands it to the group former instead of
//! forming it alone. The former takes every job waiting when it is free (up to
//! [`GROUP_TASKS`] tasks), creates them whole in one transaction — `running` at once,
//! with all their task rows — publishes their task messages (confirms pipelined), and
//! answers each request. That their messages went out is recorded in the next group's
//! transaction, or after [`MARK_AFTER`] with no next group: a stream of small jobs
//! costs one commit per group. Until then a job looks unpublished, which costs nothing
//! but on a crash: the orphan scan (which waits longer than that for a job) then
//! publishes its messages again, and a claim finds the copies stale.
//!
//! One request's failure never fails its neighbours: a group whose transaction fails
//! for good is formed again one job at a time, so only the job the database refuses
//! gets the error (and its request is parked with it).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::amqp::broker::{all_confirmed, Publisher};
use crate::amqp::dispatch;
use crate::amqp::topology::Topology;
use crate::error::Error;
use crate::protocol::{JobSettings, TaskMessage};
use crate::store::{Store, WholeJob};

/// Jobs of at most this many tasks are formed in groups; larger ones alone, streamed
/// in batches.
pub(super) const WHOLE_JOB_TASKS: usize = 256;
/// Tasks in one group at most (a group holds at least one job).
const GROUP_TASKS: usize = 1_024;
/// How long the former waits for a next group to record the jobs it published with,
/// before it records them alone.
const MARK_AFTER: Duration = Duration::from_millis(50);

/// What became of a job handed to the group former.
pub(super) enum Grouped {
    /// Created, its task messages published and confirmed.
    Formed,
    /// A job with its id exists: the request takes the path of a duplicate.
    Exists,
}

/// The handle requests give their jobs to; the former runs as long as one exists.
#[derive(Clone)]
pub(super) struct GroupFormer {
    jobs: mpsc::UnboundedSender<Member>,
}

struct Member {
    whole: WholeJob,
    answer: oneshot::Sender<Result<Grouped, Arc<Error>>>,
}

impl GroupFormer {
    /// Starts a former publishing on `publisher`.
    pub fn start(publisher: Publisher, topology: Topology, store: Store) -> Self {
        let (jobs, waiting) = mpsc::unbounded_channel();
        let former = Former {
            publisher,
            topology,
            store,
        };
        tokio::spawn(former.run(waiting));
        Self { jobs }
    }

    /// Forms `whole` with whatever other jobs are waiting.
    pub async fn form(&self, whole: WholeJob) -> Result<Grouped, Arc<Error>> {
        let (answer, answered) = oneshot::channel();
        let stopped = || Arc::new(Error::Other("the group former has stopped".into()));
        self.jobs
            .send(Member { whole, answer })
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

struct Former {
    publisher: Publisher,
    topology: Topology,
    store: Store,
}

impl Former {
    /// Takes the jobs waiting, a group at a time, until every handle is dropped.
    async fn run(self, mut waiting: mpsc::UnboundedReceiver<Member>) {
        // Jobs whose messages are confirmed but not yet recorded as published.
        let mut unmarked = Vec::new();
        loop {
            let first = match unmarked.is_empty() {
                true => waiting.recv().await,
                false => match tokio::time::timeout(MARK_AFTER, waiting.recv()).await {
                    Ok(first) => first,
                    Err(_) => {
                        self.mark(&mut unmarked).await;
                        continue;
                    }
                },
            };
            let Some(first) = first else { break };
            let mut tasks = first.whole.tasks.len();
            let mut group = vec![first];
            while tasks < GROUP_TASKS {
                let Ok(next) = waiting.try_recv() else { break };
                tasks += next.whole.tasks.len();
                group.push(next);
            }
            self.form_group(group, &mut unmarked).await;
        }
        self.mark(&mut unmarked).await;
    }

    /// Records `unmarked` as published on its own. A failure leaves them to the next
    /// group's transaction, or to the orphan scan.
    async fn mark(&self, unmarked: &mut Vec<String>) {
        if unmarked.is_empty() {
            return;
        }
        match self.store.mark_tasks_published(unmarked, 0).await {
            Ok(()) => unmarked.clear(),
            Err(err) => {
                tracing::warn!(jobs = unmarked.len(), %err, "could not record published jobs; the next group will")
            }
        }
    }

    async fn form_group(&self, group: Vec<Member>, unmarked: &mut Vec<String>) {
        // Two requests with one job id: only the first can create it here; the other
        // finds it made and goes the way of a duplicate.
        let mut ids = std::collections::HashSet::new();
        let (group, repeated): (Vec<Member>, Vec<Member>) = group
            .into_iter()
            .partition(|member| ids.insert(member.whole.job.id.clone()));
        for member in repeated {
            let _ = member.answer.send(Ok(Grouped::Exists));
        }
        let (jobs, answers): (Vec<WholeJob>, Vec<_>) =
            group.into_iter().map(|m| (m.whole, m.answer)).unzip();
        match self.form(&jobs, unmarked).await {
            Ok(results) => {
                for (answer, grouped) in answers.into_iter().zip(results) {
                    let _ = answer.send(Ok(grouped));
                }
            }
            Err(err) if jobs.len() > 1 && !err.is_transient() && !err.is_broker_connection() => {
                tracing::warn!(jobs = jobs.len(), %err, "a group of jobs failed; forming them one at a time");
                for (whole, answer) in jobs.iter().zip(answers) {
                    let alone = self
                        .form(std::slice::from_ref(whole), unmarked)
                        .await
                        .map(|mut results| results.remove(0))
                        .map_err(Arc::new);
                    let _ = answer.send(alone);
                }
            }
            Err(err) => {
                // A failure to retry (or a lost connection) is the group's, not any
                // one job's: every request hears it, as it would have alone.
                let err = Arc::new(err);
                for answer in answers {
                    let _ = answer.send(Err(err.clone()));
                }
            }
        }
    }

    /// Creates the jobs whole (recording `unmarked` as published in that transaction)
    /// and publishes the tasks of those it created, adding them to `unmarked` once
    /// confirmed.
    async fn form(
        &self,
        jobs: &[WholeJob],
        unmarked: &mut Vec<String>,
    ) -> Result<Vec<Grouped>, Error> {
        let created = self.store.create_whole_jobs(jobs, unmarked).await?;
        unmarked.clear();
        let mut pending = Vec::new();
        let mut published = Vec::new();
        for (whole, rows) in jobs.iter().zip(&created) {
            let Some(rows) = rows else { continue };
            let job = &whole.job;
            tracing::info!(job_id = %job.id, job_type = %job.job_type, tasks = rows.len(), "job created");
            let settings = JobSettings {
                job_id: &job.id,
                max_retries: job.max_retries,
                retry_delay_ms: job.retry_delay_ms,
                task_timeout_ms: job.task_timeout_ms,
                run: 1,
            };
            for &(task_id, ordinal) in rows {
                let task = &whole.tasks[ordinal as usize];
                let message =
                    TaskMessage::new(settings, task_id, &task.task_type, &task.payload, 1);
                pending.push(
                    dispatch::send_task(&self.publisher, &self.topology, &job.queue, &message)
                        .await?,
                );
            }
            published.push(job.id.clone());
        }
        all_confirmed(pending).await?;
        unmarked.extend(published);
        Ok(created
            .into_iter()
            .map(|rows| match rows {
                Some(_) => Grouped::Formed,
                None => Grouped::Exists,
            })
            .collect())
    }
}
