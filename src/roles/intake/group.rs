//! Group formation: small new jobs of many requests made in one transaction.
//!
//! A request whose job fits in one insert hands it to the group former instead of
//! forming it alone. The former takes every job waiting when the last group's
//! transaction has committed (up to [`GROUP_TASKS`] tasks), creates them whole in one
//! transaction — `running` at once, with all their task rows — publishes their task
//! messages (confirms pipelined), and answers each request. One group's transaction
//! runs while the groups before it wait for their confirms; jobs that arrive meanwhile
//! join the next group, so a burst costs few transactions. That their messages went
//! out is recorded every [`MARK_AFTER`], for every job published meanwhile in one
//! statement: a single-task job has usually ended by then, so the mark rarely waits on
//! the row lock of the worker ending the job. Until
//! then a job looks unpublished, which costs nothing but on a crash: the orphan scan
//! (which waits five times longer for a job) then publishes its messages again, and
//! the copies find their rows moved on.
//!
//! One request's failure never fails its neighbours: a group whose transaction fails
//! for good is formed again one job at a time, so only the job the database refuses
//! gets the error (and its request is parked with it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::broker::{all_confirmed, Publisher};
use crate::amqp::topology::Topology;
use crate::error::Error;
use crate::messages;
use crate::protocol::{JobSettings, TaskMessage, FIRST_ATTEMPT};
use crate::store::{Store, WholeJob};

/// Jobs of at most this many tasks are formed in groups; larger ones alone, streamed
/// in batches.
pub(super) const WHOLE_JOB_TASKS: usize = 256;
/// Tasks in one group at most (a group holds at least one job).
const GROUP_TASKS: usize = 1_024;
/// How long after its messages are confirmed a job is recorded as published, at most.
const MARK_AFTER: Duration = Duration::from_secs(1);

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
        let former = Arc::new(Former {
            publisher,
            topology,
            store,
            unmarked: Mutex::default(),
        });
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
    /// Jobs whose messages are confirmed but not yet recorded as published.
    unmarked: Mutex<Vec<String>>,
}

impl Former {
    /// Takes the jobs waiting, a group at a time, until every handle is dropped.
    async fn run(self: Arc<Self>, mut waiting: mpsc::UnboundedReceiver<Member>) {
        let marking = CancellationToken::new();
        tokio::spawn(self.clone().mark_every(marking.clone()));
        // One group in its transaction at a time.
        let transaction = Arc::new(Semaphore::new(1));
        let forming = TaskTracker::new();
        while let Some(first) = waiting.recv().await {
            // Jobs that arrive while every group is busy join the next one.
            let Ok(turn) = transaction.clone().acquire_owned().await else {
                break;
            };
            let mut tasks = first.whole.tasks.len();
            let mut group = vec![first];
            while tasks < GROUP_TASKS {
                let Ok(next) = waiting.try_recv() else { break };
                tasks += next.whole.tasks.len();
                group.push(next);
            }
            let former = self.clone();
            forming.spawn(async move { former.form_group(group, turn).await });
        }
        forming.close();
        forming.wait().await;
        marking.cancel();
        self.mark().await;
    }

    /// Records the jobs published meanwhile, every [`MARK_AFTER`], until `stop`.
    async fn mark_every(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(MARK_AFTER) => self.mark().await,
            }
        }
    }

    /// Records the jobs published so far; a failure leaves them to the next try (the
    /// orphan scan publishes them meanwhile if it must).
    async fn mark(&self) {
        let unmarked = std::mem::take(&mut *self.unmarked.lock().unwrap());
        if unmarked.is_empty() {
            return;
        }
        // A job the former made is in its first run; a retry since is another's.
        if let Err(err) = self.store.mark_tasks_published(&unmarked, 0, 1).await {
            tracing::warn!(jobs = unmarked.len(), %err, "could not record published jobs; will retry");
            self.unmarked.lock().unwrap().extend(unmarked);
        }
    }

    /// Forms a group, letting the next one have `turn` once its transaction is over.
    async fn form_group(&self, group: Vec<Member>, turn: OwnedSemaphorePermit) {
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
        match self.form(&jobs, Some(turn)).await {
            Ok(results) => {
                for (answer, grouped) in answers.into_iter().zip(results) {
                    let _ = answer.send(Ok(grouped));
                }
            }
            Err(err) if jobs.len() > 1 && !err.is_transient() && !err.is_broker_connection() => {
                tracing::warn!(jobs = jobs.len(), %err, "a group of jobs failed; forming them one at a time");
                for (whole, answer) in jobs.iter().zip(answers) {
                    let alone = self
                        .form(std::slice::from_ref(whole), None)
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

    /// Creates the jobs whole, gives up `turn`, and publishes the tasks of those it
    /// created, to be recorded as published once confirmed.
    async fn form(
        &self,
        jobs: &[WholeJob],
        turn: Option<OwnedSemaphorePermit>,
    ) -> Result<Vec<Grouped>, Error> {
        let created = self.store.create_whole_jobs(jobs).await;
        drop(turn);
        let created = created?;
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
                let message = TaskMessage::new(
                    settings,
                    task_id,
                    &task.task_type,
                    &task.payload,
                    FIRST_ATTEMPT,
                );
                pending.push(
                    messages::send_task(&self.publisher, &self.topology, &job.queue, &message)
                        .await?,
                );
            }
            published.push(job.id.clone());
        }
        all_confirmed(pending).await?;
        self.unmarked.lock().unwrap().extend(published);
        Ok(created
            .into_iter()
            .map(|rows| match rows {
                Some(_) => Grouped::Formed,
                None => Grouped::Exists,
            })
            .collect())
    }
}
