//! The sweeper: the safety net for work that should be moving but is not.
//!
//! After the build system's sync cron: every `sweep_interval`, the one pod holding the
//! `sweeper` lease scans the tasks table in `sweeper_shards` shards (task id modulo)
//! in parallel, 1,000 keys at a time, for tasks that have not changed for
//! `stuck_after`:
//!
//! - pending: the task message was lost (a crash between commit and publish, an
//!   operator's purge): publish it again — but only for pools whose work queue is
//!   empty, since a task in a backlog is waiting, not lost, and re-publishing a backlog
//!   would double it;
//! - retrying, with its wait long over: its retry was lost on the way through the
//!   delay ladder: publish it again, backlog or not;
//! - running past its lease: the worker died and the message did not come back:
//!   publish the same attempt again (the claim takes over an expired lease);
//!
//! and for running jobs whose counters say they are over but that stayed quiet for
//! `stuck_after` (their finished event was lost), it runs the completion check itself.
//!
//! Each re-publish first bumps the task's version with a compare-and-set (transactions
//! of at most 25 rows), so a task that moved since it was read is left alone, and a
//! swept task is not swept again for `stuck_after`. Duplicates the sweeper causes are
//! harmless: every transition is conditional. It also fails jobs stuck in formation and
//! warns of running jobs whose pool no pod has consumed for
//! [`crate::pools::SILENT_AFTER`]. (Events whose publisher died are the completion
//! role's: its outbox relay publishes them.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::amqp::broker::{all_confirmed, Publisher};
use crate::amqp::dispatch;
use crate::amqp::events::EventPublisher;
use crate::clock;
use crate::error::Error;
use crate::protocol::TaskMessage;
use crate::state::{JobStage, TaskStatus};
use crate::store::{job, task, Progress};

const LEASE_NAME: &str = "sweeper";
const SCAN_BATCH: u64 = 1_000;
/// How often a pool with waiting jobs and no consumer is warned about again.
const SILENT_POOL_WARNING_EVERY: Duration = Duration::from_secs(300);

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub republished: usize,
    pub taken_over: usize,
    pub jobs_checked: usize,
    pub formations_failed: usize,
}

impl SweepReport {
    fn add(&mut self, other: SweepReport) {
        self.republished += other.republished;
        self.taken_over += other.taken_over;
        self.jobs_checked += other.jobs_checked;
        self.formations_failed += other.formations_failed;
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let publisher = Publisher::open(&connection).await?;
    let sweeper = Sweeper {
        events: EventPublisher::new(
            publisher.clone(),
            shared.topology.clone(),
            shared.store.clone(),
        ),
        shared,
        connection,
        publisher,
        holder: uuid::Uuid::new_v4().to_string(),
        warned_pools: Default::default(),
    };
    let interval = sweeper.shared.config.sweep_interval;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(?interval, "sweeper running");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let store = &sweeper.shared.store;
        // The lease outlives a few missed sweeps, so one slow sweep does not let a
        // second sweeper start beside it.
        match store
            .acquire_lease(LEASE_NAME, &sweeper.holder, interval * 3)
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                tracing::warn!(%err, "sweeper lease unavailable; skipping this sweep");
                continue;
            }
        }
        // A sweep only re-sends what its compare-and-sets claimed: dropping it half-way
        // at shutdown leaves nothing inconsistent, and the next sweeper carries on.
        let swept = tokio::select! {
            _ = shutdown.cancelled() => break,
            swept = sweeper.sweep() => swept,
        };
        match swept {
            Ok(report) if report.is_empty() => tracing::debug!("sweep found nothing stuck"),
            Ok(report) => tracing::info!(?report, "sweep moved stuck work"),
            Err(err) if err.is_broker_connection() => return Err(err),
            Err(err) => tracing::warn!(%err, "sweep failed; the next one will retry"),
        }
    }
    sweeper.publisher.close().await;
    Ok(())
}

struct Sweeper {
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    publisher: Publisher,
    events: EventPublisher,
    holder: String,
    warned_pools: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

impl Sweeper {
    /// One full sweep: every shard in parallel, then quiet jobs, formations and pools.
    async fn sweep(&self) -> Result<SweepReport, Error> {
        let config = &self.shared.config;
        let shards = config.sweeper_shards;
        let idle_pools = self.idle_pools().await?;
        let reports = futures::future::try_join_all(
            (0..shards).map(|shard| self.sweep_shard(shard, shards, &idle_pools)),
        )
        .await?;
        let mut total = SweepReport::default();
        for report in reports {
            total.add(report);
        }
        let quiet_since = clock::ago(config.stuck_after);
        for job_id in self.shared.store.jobs_due_for_check(quiet_since).await? {
            if let Progress::Ended(event) = self.shared.store.check_job(&job_id).await? {
                total.jobs_checked += 1;
                self.events.publish_or_defer(&event).await;
            }
        }
        let formation_deadline = clock::ago(config.formation_timeout);
        for job in self
            .shared
            .store
            .stale_formations(formation_deadline)
            .await?
        {
            let reason = format!(
                "the job did not finish forming within {:?}: its request was lost",
                config.formation_timeout
            );
            if let Some(event) = self.shared.store.fail_formation(&job.id, &reason).await? {
                total.formations_failed += 1;
                self.events.publish_or_defer(&event).await;
            }
        }
        self.warn_of_silent_pools().await?;
        Ok(total)
    }

    /// Running jobs whose pool nobody consumes would wait without a word: say so,
    /// once per pool every [`SILENT_POOL_WARNING_EVERY`].
    async fn warn_of_silent_pools(&self) -> Result<(), Error> {
        let now = Utc::now();
        let silent = self
            .shared
            .store
            .silent_pools(crate::pools::silent_since(now))
            .await?;
        let mut warned = self.warned_pools.lock().expect("warned pools lock");
        warned.retain(|pool, _| silent.iter().any(|s| &s.name == pool));
        for pool in silent {
            let due = warned
                .get(&pool.name)
                .is_none_or(|at| at.elapsed() >= SILENT_POOL_WARNING_EVERY);
            if due {
                tracing::warn!(
                    pool = %pool.name,
                    running_jobs = pool.running_jobs,
                    "jobs are waiting on a pool nobody serves: {}",
                    crate::pools::describe_silence(&pool.name, pool.last_seen_at, now)
                );
                warned.insert(pool.name, std::time::Instant::now());
            }
        }
        Ok(())
    }

    /// Pools whose work queue holds no ready message: there a pending task with no
    /// progress cannot be waiting in a backlog, so its message is lost.
    async fn idle_pools(&self) -> Result<HashMap<String, bool>, Error> {
        let pools = self.shared.store.running_pools().await?;
        let mut idle = HashMap::new();
        for pool in pools {
            // A passive declare of a missing queue closes the channel: one per check.
            let channel = self.connection.create_channel().await?;
            let depth = channel
                .queue_declare(
                    self.shared.topology.work_queue(&pool).as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|queue| queue.message_count());
            crate::amqp::broker::close_channel(&channel).await;
            idle.insert(pool, matches!(depth, Ok(0) | Err(_)));
        }
        Ok(idle)
    }

    async fn sweep_shard(
        &self,
        shard: u32,
        shards: u32,
        idle_pools: &HashMap<String, bool>,
    ) -> Result<SweepReport, Error> {
        let store = &self.shared.store;
        let stuck_after = self.shared.config.stuck_after;
        let quiet_since = clock::ago(stuck_after);
        let mut report = SweepReport::default();
        let mut after = 0;
        loop {
            let page = store
                .stuck_tasks(shard, shards, after, SCAN_BATCH, quiet_since)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            let mut job_ids: Vec<String> = page.iter().map(|t| t.job_id.clone()).collect();
            job_ids.sort();
            job_ids.dedup();
            let jobs = store.jobs_by_id(&job_ids).await?;
            let candidates: Vec<(&task::Model, &job::Model)> = page
                .iter()
                .filter_map(|task| jobs.get(&task.job_id).map(|job| (task, job)))
                .filter(|(task, job)| self.needs_sweep(task, job, idle_pools))
                .collect();
            for batch in candidates.chunks(crate::store::SWEEP_WRITE_BATCH) {
                let seen: Vec<(i64, i64)> = batch
                    .iter()
                    .map(|(task, _)| (task.id, task.version))
                    .collect();
                let touched = store.touch_tasks(&seen).await?;
                let mut pending = Vec::with_capacity(touched.len());
                for (task, job) in batch.iter().filter(|(task, _)| touched.contains(&task.id)) {
                    pending.push(self.resend(task, job, &mut report).await?);
                }
                all_confirmed(pending).await?;
            }
        }
        Ok(report)
    }

    fn needs_sweep(
        &self,
        task: &task::Model,
        job: &job::Model,
        idle_pools: &HashMap<String, bool>,
    ) -> bool {
        if job.stage.parse::<JobStage>().ok() != Some(JobStage::Running) {
            return false;
        }
        match task.status.parse::<TaskStatus>() {
            Ok(TaskStatus::Pending) => idle_pools.get(&job.queue).copied().unwrap_or(true),
            Ok(TaskStatus::Retrying) => {
                // Its retry is due n × delay after it failed; only `stuck_after` later
                // is it late. Then it is re-sent even into a backlog: a retry can be
                // lost in the delay ladder (a deleted queue, at-most-once
                // dead-lettering), where no backlog check can see it, and a copy that
                // does arrive twice claims nothing the second time.
                let wait_ms = crate::protocol::retry_wait_ms(task.attempts, job.retry_delay_ms);
                let due = clock::after(task.updated_at, Duration::from_millis(wait_ms));
                clock::after(due, self.shared.config.stuck_after) < Utc::now()
            }
            Ok(TaskStatus::Running) => true,
            _ => false,
        }
    }

    /// Sends what a stuck task is missing; returns the pending confirm.
    async fn resend(
        &self,
        task: &task::Model,
        job: &job::Model,
        report: &mut SweepReport,
    ) -> Result<crate::amqp::broker::Pending, Error> {
        let status = task.status.parse::<TaskStatus>().ok();
        // A running task's attempt is taken over as the same attempt; a pending or
        // retrying one gets its next attempt.
        let attempt = if status == Some(TaskStatus::Running) {
            report.taken_over += 1;
            task.attempts
        } else {
            report.republished += 1;
            task.attempts + 1
        };
        let message = TaskMessage::new(
            dispatch::settings_of(job),
            task.id,
            &task.task_type,
            &task.payload,
            attempt,
        );
        dispatch::send_task(&self.publisher, &self.shared.topology, &job.queue, &message).await
    }
}
