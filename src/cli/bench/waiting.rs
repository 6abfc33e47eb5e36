//! S11, scheduled jobs (only when named): `--waiting-jobs` single-task jobs scheduled
//! an hour ahead, and what they cost while they wait — rows and bytes in the
//! database, messages in the broker, the CPU of the worker process, PostgreSQL and
//! RabbitMQ over `--idle-secs` — then `--jobs` more scheduled over the next seconds
//! among them, and how late each starts after its `run_at`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::store::Store;
use crate::{builtin, JobRequest, JobStage};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::cpu::CpuSeconds;
use super::database::{BenchDb, Sizes};
use super::fleet::Fleet;
use super::scenario::{percentile, Bench, STATS_SETTLE};

/// How far ahead the waiting jobs are scheduled: past the end of any run.
const WAITING_AHEAD: chrono::TimeDelta = chrono::TimeDelta::hours(1);
/// The due jobs' times: from this far ahead of their submit, spread over
/// [`DUE_SPREAD`].
const DUE_FROM: chrono::TimeDelta = chrono::TimeDelta::seconds(3);
const DUE_SPREAD: chrono::TimeDelta = chrono::TimeDelta::seconds(5);
const TIMEOUT: Duration = Duration::from_secs(1_800);

#[derive(Clone, Debug, Serialize)]
pub struct WaitingResult {
    pub waiting_jobs: usize,
    /// Seconds until every waiting job was stored `scheduled`.
    pub stored_s: f64,
    pub idle_s: f64,
    /// CPU while they wait, in percent of one core.
    pub idle_cpu_percent: CpuSeconds,
    /// Ready messages in the deployment's queues while they wait, in all and by
    /// queue (the queues holding any).
    pub broker_messages: u32,
    pub broker_messages_by_queue: BTreeMap<String, u32>,
    pub sizes: Sizes,
    /// Task rows of the waiting jobs, and rows of `job_requests`, while they wait.
    pub task_rows: i64,
    pub request_rows: i64,
    pub due_jobs: usize,
    /// From a due job's `run_at` to its job running, and to its event.
    pub start_late_ms_p50: f64,
    pub start_late_ms_p99: f64,
    pub start_late_ms_max: f64,
    pub event_late_ms_p50: f64,
    pub event_late_ms_p99: f64,
    pub all_done: bool,
}

impl Bench {
    pub async fn waiting(
        &self,
        sizes: &BenchDb,
        waiting_jobs: usize,
        due_jobs: usize,
        idle_secs: f64,
    ) -> anyhow::Result<WaitingResult> {
        let fleet = Fleet::spawn(&self.config, 1)?;
        self.until_consumed(1).await?;
        let store = Store::connect(&self.config.database_url, 2).await?;

        let started = Instant::now();
        let later = chrono::Utc::now() + WAITING_AHEAD;
        self.submit_all((0..waiting_jobs).map(|_| later).collect())
            .await?;
        let deadline = Instant::now() + TIMEOUT;
        while scheduled(&store).await? < waiting_jobs as u64 {
            anyhow::ensure!(Instant::now() < deadline, "S11: jobs not all scheduled");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let stored_s = started.elapsed().as_secs_f64();
        eprintln!("  {waiting_jobs} jobs scheduled in {stored_s:.1} s; idle for {idle_secs} s…");

        tokio::time::sleep(STATS_SETTLE).await;
        let cpu_before = CpuSeconds::now(&fleet.pids());
        let idle_started = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
        let cpu_after = CpuSeconds::now(&fleet.pids());
        let idle_s = idle_started.elapsed().as_secs_f64();
        let idle_cpu_percent = cpu_after.percent_since(cpu_before, idle_s);
        let broker_messages_by_queue = self.queued_messages().await?;
        let broker_messages = broker_messages_by_queue.values().sum();
        let (sizes_db, sizes) = (sizes, sizes.sizes().await?);
        let task_rows = sizes_db
            .count(
                "SELECT COUNT(*) AS n FROM tasks \
                 WHERE job_id IN (SELECT id FROM jobs WHERE stage = 'scheduled')",
            )
            .await?;
        let request_rows = sizes_db
            .count("SELECT COUNT(*) AS n FROM job_requests")
            .await?;

        eprintln!("  {due_jobs} jobs due over the next seconds…");
        let now = chrono::Utc::now();
        let times: Vec<_> = (0..due_jobs)
            .map(|n| now + DUE_FROM + DUE_SPREAD * n as i32 / due_jobs.max(1) as i32)
            .collect();
        let due = self.submit_all(times).await?;
        let mut start_late = Vec::new();
        let mut event_late = Vec::new();
        let mut all_done = true;
        // Each job against its own stored `run_at`: the submits end in any order.
        for id in &due {
            let arrived = self.wait_for_event(id, TIMEOUT).await;
            let job = store
                .job(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("job {id} vanished"))?;
            all_done &= arrived.is_ok() && job.stage == JobStage::Done.as_str();
            let late = |at: chrono::DateTime<chrono::Utc>,
                        run_at: chrono::DateTime<chrono::Utc>| {
                (at - run_at).num_microseconds().unwrap_or(0) as f64 / 1e3
            };
            if let Some(run_at) = job.run_at {
                start_late.extend(job.started_at.map(|at| late(at, run_at)));
                event_late.extend(job.finished_at.map(|at| late(at, run_at)));
            }
        }
        fleet.stop().await;
        store.close().await?;
        Ok(WaitingResult {
            waiting_jobs,
            stored_s,
            idle_s,
            idle_cpu_percent,
            broker_messages,
            broker_messages_by_queue,
            sizes,
            task_rows,
            request_rows,
            due_jobs,
            start_late_ms_p50: percentile(&mut start_late, 0.50),
            start_late_ms_p99: percentile(&mut start_late, 0.99),
            start_late_ms_max: start_late.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            event_late_ms_p50: percentile(&mut event_late, 0.50),
            event_late_ms_p99: percentile(&mut event_late, 0.99),
            all_done,
        })
    }

    /// One single-task job per time, each scheduled then; their ids.
    async fn submit_all(
        &self,
        times: Vec<chrono::DateTime<chrono::Utc>>,
    ) -> anyhow::Result<Vec<String>> {
        futures::stream::iter(times)
            .map(|run_at| async move {
                let mut request = JobRequest::new(builtin::ECHO, vec![serde_json::json!(1)]);
                request.job_id = Some(uuid::Uuid::new_v4().to_string());
                request.run_at = Some(run_at);
                Ok::<_, anyhow::Error>(self.client.submit(request).await?)
            })
            .buffer_unordered(64)
            .try_collect()
            .await
    }
}

async fn scheduled(store: &Store) -> anyhow::Result<u64> {
    let stages = store.unfinished_jobs_by_stage().await?;
    Ok(stages
        .iter()
        .find(|(stage, _)| *stage == JobStage::Scheduled)
        .map_or(0, |(_, count)| *count))
}
