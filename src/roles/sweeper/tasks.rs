//! The tasks sweep: each shard of the tasks table scanned for pending, retrying and
//! running tasks that should be moving but are not, each re-sent after a
//! compare-and-set on its version.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::amqp::broker::all_confirmed;
use crate::clock;
use crate::error::Error;
use crate::messages;
use crate::protocol::{attempt_after, TaskMessage};
use crate::state::{JobStage, TaskStatus};
use crate::store::{job, task};

use super::{SweepReport, Sweeper};

/// Task rows read per page of a shard.
const SCAN_BATCH: u64 = 1_000;

impl Sweeper {
    /// Pools whose work queue holds no ready message: there a pending task with no
    /// progress cannot be waiting in a backlog, so its message is lost.
    pub(super) async fn idle_pools(&self) -> Result<HashMap<String, bool>, Error> {
        let pools = self.shared.store.running_pools().await?;
        let mut idle = HashMap::new();
        for pool in pools {
            // A passive declare of a missing queue closes the channel: one per check.
            let channel = self.connection.create_channel().await?;
            let depth = self.shared.topology.ready_messages(&channel, &pool).await;
            crate::amqp::broker::close_channel(&channel).await;
            idle.insert(pool, matches!(depth, Ok(0) | Err(_)));
        }
        Ok(idle)
    }

    pub(super) async fn sweep_shard(
        &self,
        shard: u32,
        shards: u32,
        idle_pools: &HashMap<String, bool>,
    ) -> Result<SweepReport, Error> {
        let store = &self.shared.store;
        let stuck_after = self.shared.config.stuck_after;
        let quiet_since = clock::ago(stuck_after);
        let mut report = SweepReport::default();
        let mut after = None;
        loop {
            let page = store
                .stuck_tasks(shard, shards, after, SCAN_BATCH, quiet_since)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some((last.updated_at, last.id));
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

    pub(super) fn needs_sweep(
        &self,
        task: &task::Model,
        job: &job::Model,
        idle_pools: &HashMap<String, bool>,
    ) -> bool {
        let quiet = Quiet {
            job_stage: &job.stage,
            task_status: &task.status,
            attempts: task.attempts,
            retry_delay_ms: job.retry_delay_ms,
            unchanged_since: task.updated_at,
            pool_idle: idle_pools.get(&job.queue).copied().unwrap_or(true),
            tasks_published: job.tasks_published,
        };
        quiet.needs_sweep(self.shared.config.stuck_after, Utc::now())
    }

    /// Sends what a stuck task is missing; returns the pending confirm.
    pub(super) async fn resend(
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
            attempt_after(task.attempts)
        };
        let message = TaskMessage::new(
            messages::settings_of(job),
            task.id,
            &task.task_type,
            &task.payload,
            attempt,
        );
        messages::send_task(&self.publisher, &self.shared.topology, &job.queue, &message).await
    }
}

/// What decides whether a task that stayed unchanged for `stuck_after` is stuck.
struct Quiet<'a> {
    job_stage: &'a str,
    task_status: &'a str,
    attempts: i32,
    retry_delay_ms: i64,
    unchanged_since: DateTime<Utc>,
    /// The pool's work queue holds no ready message.
    pool_idle: bool,
    /// Every task message of the job was published once.
    tasks_published: bool,
}

impl Quiet<'_> {
    fn needs_sweep(&self, stuck_after: Duration, now: DateTime<Utc>) -> bool {
        if self.job_stage.parse::<JobStage>().ok() != Some(JobStage::Running) {
            return false;
        }
        match self.task_status.parse::<TaskStatus>() {
            // A pending task in a backlog is waiting, not lost; one its feeder has not
            // published yet is the feeder's (re-sending it would undo the pacing).
            Ok(TaskStatus::Pending) => self.pool_idle && self.tasks_published,
            Ok(TaskStatus::Retrying) => {
                // Its retry is due n × delay after it failed; only `stuck_after` later
                // is it late. Then it is re-sent even into a backlog: a retry can be
                // lost in the delay ladder (a deleted queue, at-most-once
                // dead-lettering), where no backlog check can see it, and a copy that
                // does arrive twice claims nothing the second time.
                let wait_ms = crate::protocol::retry_wait_ms(self.attempts, self.retry_delay_ms);
                let due = clock::after(self.unchanged_since, Duration::from_millis(wait_ms));
                clock::after(due, stuck_after) < now
            }
            Ok(TaskStatus::Running) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet(
        task_status: &str,
        pool_idle: bool,
        unchanged_for_s: i64,
    ) -> (Quiet<'_>, DateTime<Utc>) {
        let now = Utc::now();
        let quiet = Quiet {
            job_stage: "running",
            task_status,
            attempts: 2,
            retry_delay_ms: 10_000,
            unchanged_since: now - chrono::TimeDelta::seconds(unchanged_for_s),
            pool_idle,
            tasks_published: true,
        };
        (quiet, now)
    }

    const STUCK_AFTER: Duration = Duration::from_secs(300);

    #[test]
    fn a_pending_task_is_lost_only_when_its_pool_is_idle() {
        let (idle, now) = quiet("pending", true, 301);
        assert!(idle.needs_sweep(STUCK_AFTER, now));
        let (backlog, now) = quiet("pending", false, 301);
        assert!(!backlog.needs_sweep(STUCK_AFTER, now));
    }

    #[test]
    fn a_pending_task_not_yet_fed_is_left_to_its_feeder() {
        let (mut unfed, now) = quiet("pending", true, 301);
        unfed.tasks_published = false;
        assert!(!unfed.needs_sweep(STUCK_AFTER, now));
    }

    #[test]
    fn a_retry_is_late_only_after_its_wait_and_stuck_after() {
        // Attempt 2 waits 20 s: late after 320 s, backlog or not.
        let (waiting, now) = quiet("retrying", false, 310);
        assert!(!waiting.needs_sweep(STUCK_AFTER, now));
        let (late, now) = quiet("retrying", false, 330);
        assert!(late.needs_sweep(STUCK_AFTER, now));
    }

    #[test]
    fn running_tasks_are_swept_and_ended_jobs_are_not() {
        let (running, now) = quiet("running", false, 301);
        assert!(running.needs_sweep(STUCK_AFTER, now));
        let (mut done_job, now) = quiet("running", true, 301);
        done_job.job_stage = "done";
        assert!(!done_job.needs_sweep(STUCK_AFTER, now));
        let (finished, now) = quiet("done", true, 301);
        assert!(!finished.needs_sweep(STUCK_AFTER, now));
    }
}
