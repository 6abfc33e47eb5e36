//! `taskmill jobs`: the newest jobs, with their progress, failures, age and rate.

use crate::state::JobStage;
use crate::store::{JobFilter, Store};
use crate::summary::{age, rate};
use crate::Config;
use chrono::Utc;
use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Only jobs at this stage: formation, running, done, failed or cancelled.
    #[arg(long)]
    pub stage: Option<JobStage>,
    /// Only jobs of this type.
    #[arg(long = "type")]
    pub job_type: Option<String>,
    /// Jobs shown at most, the newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u64,
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: JobsArgs) -> anyhow::Result<()> {
    let store = Store::connect(&config.database_url, 1).await?;
    let jobs = store
        .jobs(&JobFilter {
            stage: args.stage,
            job_type: args.job_type,
            limit: args.limit,
        })
        .await?;
    let now = Utc::now();
    if args.json {
        let rows: Vec<_> = jobs
            .iter()
            .map(|job| {
                json!({
                    "job_id": job.id,
                    "job_type": job.job_type,
                    "stage": job.stage,
                    "phase": job.phase,
                    "task_count": job.task_count,
                    "done": job.done_count,
                    "failed": job.failed_count,
                    "cancelled": job.cancelled_count,
                    "created_at": job.created_at,
                    "finished_at": job.finished_at,
                    "tasks_per_s": rate(job, now),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<20}  {:<16}  {:>17}  {:>7}  {:>8}  {:>9}",
        "job", "type", "stage", "done/tasks", "failed", "age", "tasks/s"
    );
    for job in &jobs {
        let stage = match &job.phase {
            Some(phase) if job.stage == JobStage::Running.as_str() => {
                format!("{} ({phase})", job.stage)
            }
            _ => job.stage.clone(),
        };
        println!(
            "{:<36}  {:<20}  {:<16}  {:>17}  {:>7}  {:>8}  {:>9}",
            job.id,
            job.job_type,
            stage,
            format!("{}/{}", job.done_count, job.task_count),
            job.failed_count,
            age(job.created_at, now),
            rate(job, now).map_or("-".to_owned(), |rate| format!("{rate:.0}")),
        );
    }
    let removed = store.removed_totals().await?;
    if !removed.is_empty() {
        let each: Vec<String> = removed
            .iter()
            .map(|stage| {
                format!(
                    "{} {} ({} tasks, the last {} ago)",
                    stage.jobs,
                    stage.stage,
                    stage.tasks,
                    age(stage.last_removed_at, now)
                )
            })
            .collect();
        println!("\nremoved past their retention: {}", each.join(", "));
    }
    Ok(())
}
