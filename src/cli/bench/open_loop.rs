//! S6, open-loop latency: single-task jobs published at a fixed rate, whatever the
//! pipeline's pace, by a producer on its own connection, each timed from its publish
//! to its job event. A closed loop (submit, wait, submit) would slow down with the
//! system and hide its queueing; a fixed rate shows it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{builtin, Client, JobRequest};
use serde::Serialize;
use tokio::sync::Mutex;

use super::cpu::CpuSeconds;
use super::fleet::Fleet;
use super::scenario::{percentile, Bench};

/// S6's first rate, in jobs per second.
pub(super) const OPEN_LOOP_RATE: f64 = 200.0;
/// Where S6's search for the saturation rate stops.
pub(super) const MAX_OPEN_LOOP_RATE: f64 = 5_000.0;

/// How long events may still arrive after the last publish before they count missing.
const DRAIN: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, Serialize)]
pub struct OpenLoopResult {
    pub name: String,
    pub jobs_per_s: f64,
    pub seconds: f64,
    pub published: usize,
    /// Job events that arrived within the drain time after the last publish.
    pub arrived: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// CPU each process used per job, in milliseconds, from the first publish until
    /// the last event arrived (or the drain time ran out).
    pub cpu_ms_per_job: CpuSeconds,
}

/// The p99 a rate must stay under to count as kept up with.
pub const KEPT_UP_P99_MS: f64 = 250.0;

impl OpenLoopResult {
    /// Every event arrived, and 99% of them within [`KEPT_UP_P99_MS`] of the publish.
    pub fn kept_up(&self) -> bool {
        self.arrived == self.published && self.latency_p99_ms < KEPT_UP_P99_MS
    }
}

impl Bench {
    /// Publishes one single-task job every 1/`jobs_per_s` s for `seconds`, to one
    /// fresh worker process at the configured settings.
    pub async fn open_loop(
        &self,
        name: &str,
        jobs_per_s: f64,
        seconds: f64,
    ) -> anyhow::Result<OpenLoopResult> {
        let fleet = Fleet::spawn(&self.config, 1)?;
        // Latency from a worker that is still starting would measure its start.
        self.until_consumed(1).await?;
        let producer = Arc::new(Client::connect(&self.config).await?);
        let cpu_before = CpuSeconds::now(&fleet.pids());
        let published: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / jobs_per_s));
        let total = (jobs_per_s * seconds).round() as usize;
        let mut sends = tokio::task::JoinSet::new();
        for _ in 0..total {
            tick.tick().await;
            let mut request = JobRequest::new(builtin::ECHO, vec![serde_json::json!({})]);
            let id = uuid::Uuid::new_v4().to_string();
            request.job_id = Some(id.clone());
            let (producer, published) = (producer.clone(), published.clone());
            // Each publish on its own: a slow confirm must not hold back the next one.
            sends.spawn(async move {
                let at = Instant::now();
                producer.submit(request).await?;
                published.lock().await.push((id, at));
                Ok::<_, crate::Error>(())
            });
        }
        while let Some(sent) = sends.join_next().await {
            sent??;
        }
        let published = std::mem::take(&mut *published.lock().await);
        let deadline = Instant::now() + DRAIN;
        let mut latencies = loop {
            let latencies: Vec<f64> = {
                let events = self.events.lock().expect("events lock");
                published
                    .iter()
                    .filter_map(|(id, at)| {
                        let (arrived, _) = events.get(id)?;
                        Some((*arrived - *at).as_secs_f64() * 1000.0)
                    })
                    .collect()
            };
            if latencies.len() == published.len() || Instant::now() > deadline {
                break latencies;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let cpu_ms_per_job = CpuSeconds::now(&fleet.pids()).ms_per_job(cpu_before, published.len());
        fleet.stop().await;
        if let Some(producer) = Arc::into_inner(producer) {
            let _ = producer.close().await;
        }
        let max = latencies.iter().copied().fold(0.0, f64::max);
        Ok(OpenLoopResult {
            name: name.to_owned(),
            jobs_per_s,
            seconds,
            published: published.len(),
            arrived: latencies.len(),
            latency_p50_ms: percentile(&mut latencies, 0.50),
            latency_p99_ms: percentile(&mut latencies, 0.99),
            latency_max_ms: max,
            cpu_ms_per_job,
        })
    }
}
