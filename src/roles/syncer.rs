//! The syncer: keeps external tasks in step with their backends ([`crate::external`]).
//!
//! Every [`TICK`], the one pod holding the `syncer` lease scans the external tasks due
//! for a sync in [`SHARDS`] shards (task id modulo) in parallel, each shard's due tasks
//! (up to 1,000, soonest first) fetched from their backend in one call. The answer is
//! checked as a whole — one state per id asked, or the call is an error for the whole
//! batch, whose tasks stay due — then per task: a per-item error is logged and the task
//! asked again later; a lower update id than stored is stale (logged, ignored); an
//! equal one is no news; a higher one is applied. A terminal state ends the attempt as a
//! worker would (done with its result, or failed — retried through the delay ladder if
//! the job allows, which hands the task over again). A task whose update id has not
//! risen for its backend's no-progress timeout fails its attempt retryably: the last
//! poll and the last progress are kept apart. Writes go in transactions of at most
//! [`WRITE_BATCH`] tasks; a batch that fails to write is an error for that batch only
//! (its tasks stay due), and the others go on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use super::shared::Shared;
use crate::amqp::broker::{all_confirmed, Publisher};
use crate::amqp::dispatch;
use crate::clock;
use crate::error::Error;
use crate::external::{Backend, BackendError, ExternalStatus, Report, FETCH_BATCH};
use crate::protocol::{FinishedTask, TaskMessage};
use crate::store::{job, task, SyncWrite, TaskOutcome, Transition};

const LEASE_NAME: &str = "syncer";
/// How often the syncer looks for due tasks.
const TICK: Duration = Duration::from_secs(1);
/// Shards scanned in parallel.
const SHARDS: u32 = 4;
/// Tasks written per transaction at most.
const WRITE_BATCH: usize = 25;
/// How long one fetch from a backend may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// When a due task's backend is not registered in the syncing pod: ask again later.
const UNKNOWN_BACKEND_WAIT: Duration = Duration::from_secs(30);

pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let syncer = Syncer {
        publisher: Publisher::open(&connection).await?,
        shared,
        holder: uuid::Uuid::new_v4().to_string(),
    };
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match syncer
            .shared
            .store
            .acquire_lease(LEASE_NAME, &syncer.holder, TICK * 10)
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                tracing::warn!(%err, "syncer lease unavailable; skipping this sync");
                continue;
            }
        }
        // Every write names the attempt it expects: a sync dropped half-way leaves
        // nothing inconsistent.
        let synced = tokio::select! {
            _ = shutdown.cancelled() => break,
            synced = syncer.sync() => synced,
        };
        match synced {
            Ok(0) => {}
            Ok(tasks) => tracing::debug!(tasks, "external tasks synced"),
            Err(err) if err.is_broker_connection() => return Err(err),
            Err(err) => tracing::warn!(%err, "sync failed; the next one will retry"),
        }
    }
    syncer.publisher.close().await;
    Ok(())
}

struct Syncer {
    shared: Arc<Shared>,
    publisher: Publisher,
    holder: String,
}

/// A due task and its job.
type Due = (task::Model, job::Model);

impl Syncer {
    /// One sync of every shard; returns how many tasks it polled.
    async fn sync(&self) -> Result<usize, Error> {
        let now = Utc::now();
        let polled =
            futures::future::try_join_all((0..SHARDS).map(|shard| self.sync_shard(shard, now)))
                .await?;
        Ok(polled.into_iter().sum())
    }

    async fn sync_shard(&self, shard: u32, now: DateTime<Utc>) -> Result<usize, Error> {
        let due = self
            .shared
            .store
            .due_external_tasks(shard, SHARDS, now, FETCH_BATCH as u64)
            .await?;
        let polled = due.len();
        let mut by_backend: BTreeMap<String, Vec<Due>> = BTreeMap::new();
        for (task, job) in due {
            let backend = task.external_backend.clone().unwrap_or_default();
            by_backend.entry(backend).or_default().push((task, job));
        }
        for (name, due) in by_backend {
            let writes = match self.shared.registry.backend(&name) {
                Some(backend) => match poll(backend.as_ref(), &due, now).await {
                    Ok(writes) => writes,
                    Err(err) => {
                        tracing::error!(backend = %name, tasks = due.len(), %err, "sync batch failed; its tasks stay due");
                        continue;
                    }
                },
                None => {
                    tracing::warn!(backend = %name, tasks = due.len(), "no backend of this name in this pod; asking again later");
                    let next_sync_at = clock::after(now, UNKNOWN_BACKEND_WAIT);
                    due.iter()
                        .map(|(task, _)| SyncWrite::Polled {
                            task_id: task.id,
                            next_sync_at,
                        })
                        .collect()
                }
            };
            self.write(&due, writes).await?;
        }
        Ok(polled)
    }

    /// Writes decisions [`WRITE_BATCH`] at a time, then sends what the ended attempts
    /// cause: their retries and one finished event per batch. A batch that fails to
    /// write is logged and left due; only a lost broker connection stops the rest.
    async fn write(&self, due: &[Due], writes: Vec<SyncWrite>) -> Result<(), Error> {
        let jobs: HashMap<i64, &Due> = due.iter().map(|due| (due.0.id, due)).collect();
        for batch in writes.chunks(WRITE_BATCH) {
            let ended = match self.shared.store.apply_sync(batch).await {
                Ok(ended) => ended,
                Err(err) => {
                    tracing::error!(tasks = batch.len(), %err, "sync write failed; these tasks stay due");
                    continue;
                }
            };
            if let Err(err) = self.send_consequences(batch, &ended, &jobs).await {
                if err.is_broker_connection() {
                    return Err(err);
                }
                // Committed but not sent: the sweeper re-sends lost retries and checks
                // quiet jobs.
                tracing::warn!(%err, "retries or finished events of synced tasks not sent");
            }
        }
        Ok(())
    }

    async fn send_consequences(
        &self,
        batch: &[SyncWrite],
        ended: &HashSet<i64>,
        due: &HashMap<i64, &Due>,
    ) -> Result<(), Error> {
        let topology = &self.shared.topology;
        let mut pending = Vec::new();
        let mut finished = Vec::new();
        for write in batch {
            let SyncWrite::Ended(transition, _) = write else {
                continue;
            };
            let Some((task, job)) = due.get(&transition.task_id).copied() else {
                continue;
            };
            if !ended.contains(&task.id) {
                continue;
            }
            match &transition.outcome {
                TaskOutcome::Retrying(_) => {
                    let settings = dispatch::settings_of(job);
                    let message = TaskMessage::new(
                        settings,
                        task.id,
                        &task.task_type,
                        &task.payload,
                        task.attempts,
                    );
                    pending.push(
                        dispatch::send_retry(&self.publisher, topology, &job.queue, &message)
                            .await?,
                    );
                }
                outcome => finished.push(FinishedTask {
                    job_id: job.id.clone(),
                    task_id: task.id,
                    status: outcome.status().as_str().to_owned(),
                    attempt: task.attempts,
                }),
            }
        }
        if !finished.is_empty() {
            pending.push(dispatch::send_finished(&self.publisher, topology, finished).await?);
        }
        Ok(all_confirmed(pending).await?)
    }
}

/// Fetches the states of `due` (one backend's) and decides each task's write. `Err`:
/// the call failed, or its answer does not match what was asked.
async fn poll(
    backend: &dyn Backend,
    due: &[Due],
    now: DateTime<Utc>,
) -> Result<Vec<SyncWrite>, BackendError> {
    let ids: Vec<String> = due
        .iter()
        .map(|(task, _)| task.external_id.clone().unwrap_or_default())
        .collect();
    let states = tokio::time::timeout(FETCH_TIMEOUT, backend.fetch(&ids))
        .await
        .map_err(|_| BackendError(format!("no answer within {FETCH_TIMEOUT:?}")))??;
    if states.len() != ids.len() {
        return Err(BackendError(format!(
            "asked for {} states, got {}",
            ids.len(),
            states.len()
        )));
    }
    let reports: HashMap<String, Report> = states
        .into_iter()
        .map(|state| (state.id, state.report))
        .collect();
    let rules = Rules {
        now,
        poll_interval: backend.poll_interval(),
        no_progress_timeout: backend.no_progress_timeout(),
    };
    due.iter()
        .map(|(task, job)| {
            let id = task.external_id.as_deref().unwrap_or_default();
            let report = reports
                .get(id)
                .ok_or_else(|| BackendError(format!("no state for id {id:?} in the answer")))?;
            Ok(rules.decide(task, job, report))
        })
        .collect()
}

/// How one task's report becomes a write.
struct Rules {
    now: DateTime<Utc>,
    poll_interval: Duration,
    no_progress_timeout: Duration,
}

impl Rules {
    fn decide(&self, task: &task::Model, job: &job::Model, report: &Report) -> SyncWrite {
        let next_sync_at = clock::after(self.now, self.poll_interval);
        let ended = |outcome, update_id| {
            let transition = Transition {
                job_id: job.id.clone(),
                task_id: task.id,
                attempt: task.attempts,
                run: task.run,
                outcome,
            };
            SyncWrite::Ended(transition, update_id)
        };
        let failed = |message: String, update_id| {
            let outcome = if task.attempts <= job.max_retries {
                TaskOutcome::Retrying(message)
            } else {
                TaskOutcome::Failed(message)
            };
            ended(outcome, update_id)
        };
        match report {
            Report::State { update_id, status } if task.external_update_id < Some(*update_id) => {
                return match status {
                    ExternalStatus::Running => SyncWrite::Progressed {
                        task_id: task.id,
                        update_id: *update_id,
                        next_sync_at,
                    },
                    ExternalStatus::Done { result } => {
                        ended(TaskOutcome::Done(result.clone()), Some(*update_id))
                    }
                    ExternalStatus::Failed { message } => failed(message.clone(), Some(*update_id)),
                };
            }
            Report::State { update_id, .. } if task.external_update_id > Some(*update_id) => {
                tracing::warn!(
                    task_id = task.id,
                    update_id,
                    stored = task.external_update_id,
                    "stale external state ignored"
                );
            }
            Report::State { .. } => {}
            Report::Error { error } => {
                tracing::warn!(task_id = task.id, external_id = task.external_id.as_deref().unwrap_or_default(), %error, "the backend could not report on the task; asking again later");
            }
        }
        let since = task.last_progress_at.unwrap_or(self.now);
        if clock::after(since, self.no_progress_timeout) <= self.now {
            let message = format!(
                "external task made no progress for {:?}",
                self.no_progress_timeout
            );
            return failed(message, None);
        }
        SyncWrite::Polled {
            task_id: task.id,
            next_sync_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> Rules {
        Rules {
            now: Utc::now(),
            poll_interval: Duration::from_secs(2),
            no_progress_timeout: Duration::from_secs(60),
        }
    }

    fn rows(stored: Option<i64>, idle: Duration, attempts: i32) -> (task::Model, job::Model) {
        let now = Utc::now();
        let task = task::Model {
            id: 7,
            job_id: "j".into(),
            ordinal: 0,
            task_type: "build".into(),
            payload: json!(null),
            status: "running".into(),
            attempts,
            deliveries: 1,
            info: None,
            result: None,
            version: 1,
            claimed_by: None,
            lease_until: None,
            created_at: now,
            updated_at: now,
            finished_at: None,
            external_backend: Some("build".into()),
            external_id: Some("x".into()),
            external_attempt: Some(attempts),
            external_update_id: stored,
            next_sync_at: Some(now),
            last_poll_at: None,
            last_progress_at: Some(clock::ago(idle)),
            run: 1,
        };
        let job = job::Model {
            job_type: "build".into(),
            max_retries: 1,
            ..crate::store::running_job_for_tests()
        };
        (task, job)
    }

    fn state(update_id: i64, status: ExternalStatus) -> Report {
        Report::State { update_id, status }
    }

    fn kind(write: &SyncWrite) -> String {
        match write {
            SyncWrite::Polled { .. } => "polled".into(),
            SyncWrite::Progressed { update_id, .. } => format!("progressed to {update_id}"),
            SyncWrite::Ended(transition, update_id) => {
                format!("{:?} at {update_id:?}", transition.outcome)
            }
        }
    }

    #[test]
    fn update_ids_order_the_reports() {
        let rules = rules();
        let fresh = Duration::from_secs(1);
        let (task, job) = rows(Some(5), fresh, 1);
        let running = |n| state(n, ExternalStatus::Running);
        assert_eq!(
            kind(&rules.decide(&task, &job, &running(4))),
            "polled",
            "stale"
        );
        assert_eq!(
            kind(&rules.decide(&task, &job, &running(5))),
            "polled",
            "unchanged"
        );
        assert_eq!(
            kind(&rules.decide(&task, &job, &running(6))),
            "progressed to 6"
        );
        let (first, _) = rows(None, fresh, 1);
        assert_eq!(
            kind(&rules.decide(&first, &job, &running(0))),
            "progressed to 0"
        );
        let error = Report::Error {
            error: "busy".into(),
        };
        assert_eq!(kind(&rules.decide(&task, &job, &error)), "polled");
        let done = state(6, ExternalStatus::Done { result: json!(1) });
        assert_eq!(
            kind(&rules.decide(&task, &job, &done)),
            "Done(Number(1)) at Some(6)"
        );
        // A stale terminal state is as stale as any.
        let old_done = state(3, ExternalStatus::Done { result: json!(1) });
        assert_eq!(kind(&rules.decide(&task, &job, &old_done)), "polled");
    }

    #[test]
    fn failures_and_standing_still_end_the_attempt() {
        let rules = rules();
        let fresh = Duration::from_secs(1);
        let failed = state(
            6,
            ExternalStatus::Failed {
                message: "broke".into(),
            },
        );
        let (first_attempt, job) = rows(Some(5), fresh, 1);
        assert_eq!(
            kind(&rules.decide(&first_attempt, &job, &failed)),
            "Retrying(\"broke\") at Some(6)"
        );
        let (last_attempt, _) = rows(Some(5), fresh, 2);
        assert_eq!(
            kind(&rules.decide(&last_attempt, &job, &failed)),
            "Failed(\"broke\") at Some(6)"
        );
        // Answers that do not move it are polls, not progress.
        let (idle, _) = rows(Some(5), Duration::from_secs(61), 1);
        for report in [
            state(5, ExternalStatus::Running),
            Report::Error {
                error: "busy".into(),
            },
        ] {
            assert_eq!(
                kind(&rules.decide(&idle, &job, &report)),
                "Retrying(\"external task made no progress for 60s\") at None"
            );
        }
        assert_eq!(
            kind(&rules.decide(&idle, &job, &state(6, ExternalStatus::Running))),
            "progressed to 6"
        );
    }
}
