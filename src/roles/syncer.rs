//! The syncer: keeps external tasks in step with their backends ([`crate::external`]).
//!
//! One pod at a time syncs: the one holding the `syncer` lease ([`CADENCE`]). Its loop
//! renews the lease every second whatever the backends are doing, and losing it stops
//! the sync at once: the calls in flight are dropped before they write. Every second it
//! reads the due external tasks, soonest first (up to [`SCAN_LIMIT`]), leaving out the
//! backends whose last round is still running or that back off, and starts one round
//! per backend in a task of its own, so a slow or hung backend holds back its own tasks
//! only. A round asks the backend for its tasks' states, [`FETCH_BATCH`] ids per call
//! (its calls at once), and checks each answer as a whole — one state per id asked, none twice, or the call
//! fails — then decides per task: a per-item error is asked again later; a lower update
//! id than stored is stale (logged, ignored); an equal one is no news; a higher one is
//! applied. A terminal state ends the attempt as a worker would (done with its result,
//! or failed — retried through the delay ladder if the job allows, which hands the task
//! over again). A call that fails (an error, a timeout, a malformed answer) backs its
//! backend off — its poll interval, doubled with every failure in a row, at most
//! [`MAX_BACKOFF`] — and moves its tasks' next sync to then. Neither a failed call nor
//! an answer that does not move a task is progress: a task whose update id has not
//! risen for its backend's no-progress timeout fails its attempt retryably. Every
//! polled task's next sync moves on, so however many are due each gets its turn.
//!
//! Writes go in transactions of at most [`WRITE_BATCH`] tasks, each conditional on what
//! was read before the call ([`Seen`]): the attempt, its run, its external id and an
//! update id that only rises. A batch the database refuses is written again task by
//! task, and a task whose write it refuses for good fails with the database's reason:
//! one bad answer never holds back its neighbours.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::Connection;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::periodic::{self, Cadence, Pace, Periodic};
use super::shared::Shared;
use crate::amqp::broker::{all_confirmed, Publisher};
use crate::clock;
use crate::error::Error;
use crate::external::{Backend, BackendError, ExternalState, ExternalStatus, Report, FETCH_BATCH};
use crate::messages;
use crate::protocol::{FinishedTask, TaskMessage};
use crate::store::{job, task, Seen, StoreError, SyncChange, SyncWrite, TaskOutcome};

/// The syncer's lease lasts 10 s and is renewed every second, when the syncer also
/// looks for due tasks.
const CADENCE: Cadence = Cadence {
    lease: "syncer",
    lease_for: Duration::from_secs(10),
    renew_every: Duration::from_secs(1),
    period: Duration::from_secs(1),
    failure_wait_max: Duration::from_secs(1),
};
/// Due tasks read per tick at most.
const SCAN_LIMIT: u64 = 4 * FETCH_BATCH as u64;
/// Tasks written per transaction at most.
const WRITE_BATCH: usize = 25;
/// How long one fetch from a backend may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// When a due task's backend is not registered in the syncing pod: ask again later.
const UNKNOWN_BACKEND_WAIT: Duration = Duration::from_secs(30);
/// The longest a backend whose calls keep failing waits before it is asked again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let store = shared.store.clone();
    let mut sync = SyncLoop {
        syncer: Arc::new(Syncer {
            publisher: Publisher::open(&connection).await?,
            shared,
        }),
        turns: HashMap::new(),
        rounds: JoinSet::new(),
        round_backends: HashMap::new(),
    };
    let stopped = periodic::run(&store, CADENCE, &mut sync, &shutdown).await;
    // A round stopped in its call writes nothing; one writing finishes its
    // transaction and sends what it caused.
    let grace = sync.syncer.shared.config.grace_period;
    let rounds = &mut sync.rounds;
    let _ =
        tokio::time::timeout(grace, async { while rounds.join_next().await.is_some() {} }).await;
    sync.rounds.abort_all();
    sync.syncer.publisher.close().await;
    stopped
}

/// The syncer's state between passes: each backend's turn and the rounds running.
struct SyncLoop {
    syncer: Arc<Syncer>,
    turns: HashMap<String, Turn>,
    rounds: JoinSet<Result<Call, Error>>,
    round_backends: HashMap<tokio::task::Id, String>,
}

impl Periodic for SyncLoop {
    fn name(&self) -> &'static str {
        "syncer"
    }

    /// Settles the rounds that ended since the last pass, then starts one round per
    /// backend with due tasks that is neither busy nor backing off. The rounds run on
    /// in tasks of their own, their calls dropped when `holding` ends.
    async fn pass(&mut self, holding: &CancellationToken) -> Result<Pace, Error> {
        self.settle_rounds()?;
        let now = Instant::now();
        let busy: Vec<String> = self
            .turns
            .iter()
            .filter(|(_, turn)| turn.busy(now))
            .map(|(name, _)| name.clone())
            .collect();
        let due = self
            .syncer
            .shared
            .store
            .due_external_tasks(Utc::now(), &busy, SCAN_LIMIT)
            .await?;
        let mut by_backend: BTreeMap<String, Vec<Due>> = BTreeMap::new();
        for (task, job) in due {
            let backend = task.external_backend.clone().unwrap_or_default();
            by_backend.entry(backend).or_default().push((task, job));
        }
        for (name, due) in by_backend {
            let turn = self.turns.entry(name.clone()).or_default();
            turn.in_flight = true;
            let round =
                self.syncer
                    .clone()
                    .round(name.clone(), due, turn.failures, holding.clone());
            self.round_backends
                .insert(self.rounds.spawn(round).id(), name);
        }
        Ok(Pace::Idle)
    }
}

impl SyncLoop {
    /// Frees the turns of the rounds that ended, backing off the backends whose calls
    /// failed. `Err`: a round lost the broker connection.
    fn settle_rounds(&mut self) -> Result<(), Error> {
        while let Some(joined) = self.rounds.try_join_next_with_id() {
            let (id, call) = match joined {
                Ok((id, call)) => (id, call),
                Err(err) => {
                    tracing::error!(%err, "a sync round stopped before its end");
                    (err.id(), Ok(Call::Answered))
                }
            };
            let turn = self
                .turns
                .entry(self.round_backends.remove(&id).unwrap_or_default())
                .or_default();
            turn.in_flight = false;
            match call? {
                Call::Answered => *turn = Turn::default(),
                Call::Failed { wait } => {
                    turn.failures += 1;
                    turn.not_before = Some(Instant::now() + wait);
                }
            }
        }
        Ok(())
    }
}

/// A backend's turn: whether a round of it runs, and how it fared lately.
#[derive(Debug, Default)]
struct Turn {
    in_flight: bool,
    /// Failed calls in a row.
    failures: u32,
    /// Backing off until then.
    not_before: Option<Instant>,
}

impl Turn {
    fn busy(&self, now: Instant) -> bool {
        self.in_flight || self.not_before.is_some_and(|until| now < until)
    }
}

/// How a round's calls went.
#[derive(Debug)]
enum Call {
    /// Every call answered well (or none was made).
    Answered,
    /// A call failed: its backend waits this long.
    Failed { wait: Duration },
}

/// How long a backend waits after `failures` failed calls in a row: its poll interval,
/// doubled with each failure after the first, at most [`MAX_BACKOFF`].
fn backoff(poll_interval: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    poll_interval
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

struct Syncer {
    shared: Arc<Shared>,
    publisher: Publisher,
}

/// A due task and its job.
type Due = (task::Model, job::Model);

impl Syncer {
    /// Polls one backend's due tasks (its calls dropped if `term` ends first) and
    /// writes what they decided. `Err`: only a lost broker connection.
    async fn round(
        self: Arc<Self>,
        name: String,
        due: Vec<Due>,
        failures: u32,
        term: CancellationToken,
    ) -> Result<Call, Error> {
        let Some(backend) = self.shared.registry.backend(&name).cloned() else {
            tracing::warn!(backend = %name, tasks = due.len(), "no backend of this name in this pod; asking again later");
            let next_sync_at = clock::after(Utc::now(), UNKNOWN_BACKEND_WAIT);
            let writes = due
                .iter()
                .map(|(task, _)| SyncWrite {
                    seen: Seen::of(task),
                    change: SyncChange::Polled { next_sync_at },
                })
                .collect();
            self.write(&due, writes).await?;
            return Ok(Call::Answered);
        };
        let (backend_ref, term) = (backend.as_ref(), &term);
        let calls = due.chunks(FETCH_BATCH).map(|chunk| async move {
            tokio::select! {
                _ = term.cancelled() => None,
                answer = fetch(backend_ref, chunk) => Some((chunk, answer)),
            }
        });
        let Some(answers) = futures::future::join_all(calls)
            .await
            .into_iter()
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(Call::Answered);
        };
        let mut call = Call::Answered;
        let mut writes = Vec::with_capacity(due.len());
        for (chunk, answer) in answers {
            let mut rules = Rules {
                now: Utc::now(),
                next_poll: backend.poll_interval(),
                no_progress_timeout: backend.no_progress_timeout(),
                payload_cap: self.shared.config.max_payload_bytes,
            };
            let reports = match answer {
                Ok(reports) => Some(reports),
                Err(err) => {
                    let wait = backoff(backend.poll_interval(), failures + 1);
                    tracing::error!(backend = %name, tasks = chunk.len(), %err, ?wait, "sync call failed; its backend backs off");
                    rules.next_poll = wait;
                    call = Call::Failed { wait };
                    None
                }
            };
            writes.extend(chunk.iter().map(|(task, job)| {
                let id = task.external_id.as_deref().unwrap_or_default();
                rules.decide(task, job, reports.as_ref().and_then(|r| r.get(id)))
            }));
        }
        self.write(&due, writes).await?;
        Ok(call)
    }

    /// Writes decisions [`WRITE_BATCH`] at a time, then sends what the ended attempts
    /// cause: their retries and one finished event per batch. Only a lost broker
    /// connection stops the rest.
    async fn write(&self, due: &[Due], writes: Vec<SyncWrite>) -> Result<(), Error> {
        let due: HashMap<i64, &Due> = due.iter().map(|due| (due.0.id, due)).collect();
        for batch in writes.chunks(WRITE_BATCH) {
            self.write_batch(batch, &due).await?;
        }
        Ok(())
    }

    /// One transaction of writes. A batch the database refuses for good is written
    /// again one task at a time, and a task's write it refuses fails that task with
    /// the reason, so that nothing is refused on every tick with its neighbours.
    async fn write_batch(
        &self,
        batch: &[SyncWrite],
        due: &HashMap<i64, &Due>,
    ) -> Result<(), Error> {
        let ended = match self.shared.store.apply_sync(batch).await {
            Ok(ended) => ended,
            Err(err) if batch.len() > 1 && !err.is_transient() => {
                for write in batch {
                    Box::pin(self.write_batch(std::slice::from_ref(write), due)).await?;
                }
                return Ok(());
            }
            Err(err) if !err.is_transient() => {
                let write = &batch[0];
                let Some(failing) = failing(write, &err) else {
                    tracing::error!(task_id = write.seen.task_id, %err, "sync write failed; the task stays due");
                    return Ok(());
                };
                tracing::error!(task_id = write.seen.task_id, %err, "the database refused the sync of an external task; failing the task");
                return Box::pin(self.write_batch(&[failing], due)).await;
            }
            Err(err) => {
                tracing::error!(tasks = batch.len(), %err, "sync write failed; these tasks stay due");
                return Ok(());
            }
        };
        if let Err(err) = self.send_consequences(batch, &ended, due).await {
            if err.is_broker_connection() {
                return Err(err);
            }
            // Committed but not sent: the sweeper re-sends lost retries and checks
            // quiet jobs.
            tracing::warn!(%err, "retries or finished events of synced tasks not sent");
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
            let Some(transition) = write.transition() else {
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
                    let settings = messages::settings_of(job);
                    let message = TaskMessage::new(
                        settings,
                        task.id,
                        &task.task_type,
                        &task.payload,
                        task.attempts,
                    );
                    pending.push(
                        messages::send_retry(&self.publisher, topology, &job.queue, &message)
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
            pending.push(messages::send_finished(&self.publisher, topology, finished).await?);
        }
        Ok(all_confirmed(pending).await?)
    }
}

/// The write that fails `write`'s task because the database refused `write` for good
/// (a result it cannot store, say); `None` when `write` already fails it.
fn failing(write: &SyncWrite, err: &StoreError) -> Option<SyncWrite> {
    let update_id = match &write.change {
        SyncChange::Ended {
            outcome: TaskOutcome::Failed(_),
            ..
        } => return None,
        SyncChange::Ended { update_id, .. } => *update_id,
        SyncChange::Progressed { update_id, .. } => Some(*update_id),
        SyncChange::Polled { .. } => None,
    };
    Some(SyncWrite {
        seen: write.seen.clone(),
        change: SyncChange::Ended {
            outcome: TaskOutcome::Failed(format!("could not record the backend's answer: {err}")),
            update_id,
        },
    })
}

/// Fetches the states of `due` (one backend's, at most [`FETCH_BATCH`]). `Err`: the
/// call failed, or its answer does not match what was asked.
async fn fetch(
    backend: &dyn Backend,
    due: &[Due],
) -> Result<HashMap<String, Report>, BackendError> {
    let ids: Vec<String> = due
        .iter()
        .map(|(task, _)| task.external_id.clone().unwrap_or_default())
        .collect();
    let states = tokio::time::timeout(FETCH_TIMEOUT, backend.fetch(&ids))
        .await
        .map_err(|_| BackendError(format!("no answer within {FETCH_TIMEOUT:?}")))??;
    check_answer(&ids, states)
}

/// The answer's reports by id: exactly one per id asked, or the answer is malformed.
fn check_answer(
    ids: &[String],
    states: Vec<ExternalState>,
) -> Result<HashMap<String, Report>, BackendError> {
    if states.len() != ids.len() {
        return Err(BackendError(format!(
            "asked for {} states, got {}",
            ids.len(),
            states.len()
        )));
    }
    let mut reports = HashMap::with_capacity(states.len());
    for state in states {
        if reports.contains_key(&state.id) {
            return Err(BackendError(format!(
                "the answer holds id {:?} more than once",
                state.id
            )));
        }
        reports.insert(state.id, state.report);
    }
    if let Some(missing) = ids.iter().find(|id| !reports.contains_key(*id)) {
        return Err(BackendError(format!(
            "no state for id {missing:?} in the answer"
        )));
    }
    Ok(reports)
}

/// How one task's report becomes a write.
struct Rules {
    now: DateTime<Utc>,
    /// When to ask again, unless the attempt ends.
    next_poll: Duration,
    no_progress_timeout: Duration,
    /// A result over it ends the attempt failed ([`crate::caps`]).
    payload_cap: usize,
}

impl Rules {
    /// `report`: `None` when the call for it failed.
    fn decide(&self, task: &task::Model, job: &job::Model, report: Option<&Report>) -> SyncWrite {
        let seen = Seen::of(task);
        let write = |change| SyncWrite {
            seen: seen.clone(),
            change,
        };
        let failed = |message: String, update_id| {
            let outcome = TaskOutcome::of_failure(message, task.attempts, job.max_retries);
            write(SyncChange::Ended { outcome, update_id })
        };
        let next_sync_at = clock::after(self.now, self.next_poll);
        match report {
            Some(Report::State { update_id, status })
                if task.external_update_id < Some(*update_id) =>
            {
                return match status {
                    ExternalStatus::Running => write(SyncChange::Progressed {
                        update_id: *update_id,
                        next_sync_at,
                    }),
                    ExternalStatus::Done { result } => {
                        let bytes = crate::caps::json_bytes(result);
                        let outcome = if bytes > self.payload_cap as u64 {
                            let what = format!("the backend's result for task {}", task.id);
                            TaskOutcome::Failed(crate::caps::over_cap(
                                &what,
                                bytes,
                                self.payload_cap,
                            ))
                        } else {
                            TaskOutcome::Done(result.clone())
                        };
                        write(SyncChange::Ended {
                            outcome,
                            update_id: Some(*update_id),
                        })
                    }
                    ExternalStatus::Failed { message } => failed(message.clone(), Some(*update_id)),
                };
            }
            Some(Report::State { update_id, .. }) if task.external_update_id > Some(*update_id) => {
                tracing::warn!(
                    task_id = task.id,
                    update_id,
                    stored = task.external_update_id,
                    "stale external state ignored"
                );
            }
            Some(Report::State { .. }) | None => {}
            Some(Report::Error { error }) => {
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
        write(SyncChange::Polled { next_sync_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> Rules {
        Rules {
            now: Utc::now(),
            next_poll: Duration::from_secs(2),
            no_progress_timeout: Duration::from_secs(60),
            payload_cap: 100,
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
        match &write.change {
            SyncChange::Polled { .. } => "polled".into(),
            SyncChange::Progressed { update_id, .. } => format!("progressed to {update_id}"),
            SyncChange::Ended { outcome, update_id } => format!("{outcome:?} at {update_id:?}"),
        }
    }

    #[test]
    fn update_ids_order_the_reports() {
        let rules = rules();
        let fresh = Duration::from_secs(1);
        let (task, job) = rows(Some(5), fresh, 1);
        let running = |n| state(n, ExternalStatus::Running);
        assert_eq!(
            kind(&rules.decide(&task, &job, Some(&running(4)))),
            "polled",
            "stale"
        );
        assert_eq!(
            kind(&rules.decide(&task, &job, Some(&running(5)))),
            "polled",
            "unchanged"
        );
        assert_eq!(
            kind(&rules.decide(&task, &job, Some(&running(6)))),
            "progressed to 6"
        );
        let (first, _) = rows(None, fresh, 1);
        assert_eq!(
            kind(&rules.decide(&first, &job, Some(&running(0)))),
            "progressed to 0"
        );
        let error = Report::Error {
            error: "busy".into(),
        };
        assert_eq!(kind(&rules.decide(&task, &job, Some(&error))), "polled");
        let done = state(6, ExternalStatus::Done { result: json!(1) });
        assert_eq!(
            kind(&rules.decide(&task, &job, Some(&done))),
            "Done(Number(1)) at Some(6)"
        );
        // A stale terminal state is as stale as any.
        let old_done = state(3, ExternalStatus::Done { result: json!(1) });
        assert_eq!(kind(&rules.decide(&task, &job, Some(&old_done))), "polled");
        // A result over the cap (100 bytes here) fails the task, not its job's phase.
        let large = state(
            7,
            ExternalStatus::Done {
                result: json!("x".repeat(100)),
            },
        );
        let failed = kind(&rules.decide(&task, &job, Some(&large)));
        assert!(
            failed.starts_with(
                "Failed(\"the backend's result for task 7 is 102 bytes, over the cap of 100 bytes"
            ),
            "{failed}"
        );
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
            kind(&rules.decide(&first_attempt, &job, Some(&failed))),
            "Retrying(\"broke\") at Some(6)"
        );
        let (last_attempt, _) = rows(Some(5), fresh, 2);
        assert_eq!(
            kind(&rules.decide(&last_attempt, &job, Some(&failed))),
            "Failed(\"broke\") at Some(6)"
        );
        // Answers that do not move it are polls, not progress; nor is a failed call.
        let (idle, _) = rows(Some(5), Duration::from_secs(61), 1);
        for report in [
            Some(state(5, ExternalStatus::Running)),
            Some(Report::Error {
                error: "busy".into(),
            }),
            None,
        ] {
            assert_eq!(
                kind(&rules.decide(&idle, &job, report.as_ref())),
                "Retrying(\"external task made no progress for 60s\") at None"
            );
        }
        assert_eq!(
            kind(&rules.decide(&idle, &job, Some(&state(6, ExternalStatus::Running)))),
            "progressed to 6"
        );
        // A failed call moves a task that is not over its timeout to the backoff.
        let (fresh_task, _) = rows(Some(5), fresh, 1);
        let backing_off = Rules {
            next_poll: Duration::from_secs(8),
            ..rules
        };
        let write = backing_off.decide(&fresh_task, &job, None);
        let SyncChange::Polled { next_sync_at } = write.change else {
            panic!("{write:?}");
        };
        assert_eq!(
            next_sync_at,
            clock::after(backing_off.now, Duration::from_secs(8))
        );
        assert_eq!(
            write.seen,
            Seen::of(&fresh_task),
            "the write names what was read"
        );
    }

    #[test]
    fn an_answer_names_each_id_asked_once() {
        let ids: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let running = |id: &str, update_id| ExternalState {
            id: id.into(),
            report: state(update_id, ExternalStatus::Running),
        };
        let answer = |states: Vec<ExternalState>| {
            check_answer(&ids, states)
                .map_err(|err| err.0)
                .map(|reports| reports.len())
        };
        assert_eq!(answer(vec![running("b", 1), running("a", 2)]), Ok(2));
        assert_eq!(
            answer(vec![running("a", 1)]),
            Err("asked for 2 states, got 1".into())
        );
        assert_eq!(
            answer(vec![running("a", 1), running("a", 2)]),
            Err("the answer holds id \"a\" more than once".into())
        );
        assert_eq!(
            answer(vec![running("a", 1), running("c", 2)]),
            Err("no state for id \"b\" in the answer".into())
        );
    }

    #[test]
    fn a_failing_backend_backs_off_exponentially_up_to_a_cap() {
        let poll = Duration::from_secs(2);
        let waits: Vec<u64> = (1..=6).map(|n| backoff(poll, n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(poll, u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_refused_write_fails_its_task_once() {
        let (task, job) = rows(Some(5), Duration::from_secs(1), 1);
        let done = rules().decide(
            &task,
            &job,
            Some(&state(
                6,
                ExternalStatus::Done {
                    result: json!("\u{0}"),
                },
            )),
        );
        let err = StoreError::Transaction("unsupported Unicode escape sequence".into());
        let failed = failing(&done, &err).expect("a refused result fails the task");
        assert_eq!(
            kind(&failed),
            "Failed(\"could not record the backend's answer: database: unsupported Unicode escape sequence\") at Some(6)"
        );
        assert!(
            failing(&failed, &err).is_none(),
            "the failure is not failed again"
        );
    }
}
