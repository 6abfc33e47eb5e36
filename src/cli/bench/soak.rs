//! S9, the soak: S2-sized jobs submitted one after another for `--soak-secs`, to one
//! worker process whose cleaner keeps jobs only [`RETENTION`] (in partitions of
//! [`PARTITION_SPAN`] on PostgreSQL), so that rows leave as fast as they come. Steady
//! state means the database's size stays flat once the first jobs have aged out, and
//! the last job runs about as fast as the first.

use std::time::{Duration, Instant};

use crate::{builtin, JobRequest};
use serde::Serialize;

use super::database::{BenchDb, Sizes};
use super::fleet::Fleet;
use super::scenario::Bench;

/// How long the soak keeps an ended job, and how often its cleaner runs: short, so
/// that a few minutes reach the steady state a day's retention reaches in a day.
const RETENTION: &str = "20s";
const CLEAN_SECS: &str = "5";
const PARTITION_SPAN: &str = "30s";
/// The longest one soak job may take before the soak fails.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// One job of the soak, and the database's size once it ended.
#[derive(Clone, Debug, Serialize)]
pub struct SoakJob {
    /// Seconds from the soak's start to this job's event.
    pub at_s: f64,
    pub seconds: f64,
    pub tasks_per_s: f64,
    pub sizes: Sizes,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakResult {
    pub tasks_per_job: usize,
    pub retention: String,
    pub partition_span: String,
    pub jobs: Vec<SoakJob>,
}

impl SoakResult {
    /// The last job's rate over the first's.
    pub fn last_to_first(&self) -> Option<f64> {
        let (first, last) = (self.jobs.first()?, self.jobs.last()?);
        Some(last.tasks_per_s / first.tasks_per_s)
    }

    /// The largest database size after the soak's first half, over the largest in
    /// it: near 1 when nothing grows once retention has caught up.
    pub fn second_half_growth(&self) -> Option<f64> {
        let half = self.jobs.len() / 2;
        let largest = |jobs: &[SoakJob]| {
            jobs.iter()
                .map(|job| job.sizes.database_bytes)
                .max()
                .filter(|bytes| *bytes > 0)
        };
        let (early, late) = self.jobs.split_at(half);
        Some(largest(late)? as f64 / largest(early)? as f64)
    }
}

impl Bench {
    /// Runs jobs of `tasks_per_job` echo tasks back to back for `seconds`.
    pub async fn soak(
        &self,
        sizes: &BenchDb,
        tasks_per_job: usize,
        seconds: f64,
    ) -> anyhow::Result<SoakResult> {
        let fleet = Fleet::spawn_with(
            &self.config,
            1,
            &[
                ("TASKMILL_RETENTION", RETENTION),
                ("TASKMILL_RETENTION_FAILED", RETENTION),
                ("TASKMILL_CLEAN_SECS", CLEAN_SECS),
                ("TASKMILL_PARTITION_SPAN", PARTITION_SPAN),
            ],
        )?;
        self.until_consumed(1).await?;
        let started = Instant::now();
        let mut jobs = Vec::new();
        while started.elapsed().as_secs_f64() < seconds {
            let tasks = (0..tasks_per_job).map(|n| serde_json::json!({ "n": n }));
            let mut request = JobRequest::new(builtin::ECHO, tasks.collect());
            request.job_id = Some(uuid::Uuid::new_v4().to_string());
            let submitted = Instant::now();
            let id = self.client.submit(request).await?;
            let ended = self.wait_for_event(&id, JOB_TIMEOUT).await?;
            let took = (ended - submitted).as_secs_f64();
            let job = SoakJob {
                at_s: (ended - started).as_secs_f64(),
                seconds: took,
                tasks_per_s: tasks_per_job as f64 / took,
                sizes: sizes.sizes().await?,
            };
            eprintln!(
                "  job {} at {:.0} s: {:.0} tasks/s, database {:.1} MiB",
                jobs.len() + 1,
                job.at_s,
                job.tasks_per_s,
                job.sizes.database_bytes as f64 / (1024.0 * 1024.0)
            );
            jobs.push(job);
        }
        fleet.stop().await;
        Ok(SoakResult {
            tasks_per_job,
            retention: RETENTION.to_owned(),
            partition_span: PARTITION_SPAN.to_owned(),
            jobs,
        })
    }

    /// When job `id`'s event arrived.
    pub(super) async fn wait_for_event(
        &self,
        id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, event)) = self.events.lock().expect("events lock").get(id) {
                anyhow::ensure!(event.is_done(), "soak job {id} ended {}", event.event);
                return Ok(*at);
            }
            anyhow::ensure!(Instant::now() < deadline, "soak job {id} did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
