//! `taskmill status JOB_ID`: a job's stage (and phase), task counts, first error and
//! result; for a job sent in parts, its parts and seal.

use crate::state::JobStage;
use crate::store::Store;
use crate::{known_pools, Config};
use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct StatusArgs {
    pub job_id: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Returns the process exit code: 0 if the job exists, 2 if not.
pub async fn run(config: &Config, args: StatusArgs) -> anyhow::Result<i32> {
    let store = Store::connect(&config.database_url, 1).await?;
    let Some(status) = store.job_status(&args.job_id).await? else {
        eprintln!("no job {:?}", args.job_id);
        return Ok(2);
    };
    let job = &status.job;
    let target = target_report(&store.job_event(&job.id).await?);
    let waiting = pool_report(&store, job).await?;
    let parts = parts_report(&store, job).await?;
    if args.json {
        let doc = json!({
            "job_id": job.id,
            "job_type": job.job_type,
            "queue": job.queue,
            "stage": job.stage,
            "run": job.run,
            "task_count": job.task_count,
            "tasks_by_status": status.tasks_by_status,
            "phase": job.phase,
            "phase_tasks": status.phase_tasks_by_status,
            "result": job.result,
            "first_error": job.first_error,
            "created_at": job.created_at,
            "run_at": job.run_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "on_complete": job.on_complete,
            "on_complete_error": target,
            "waiting": waiting,
            "parts": parts,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    println!("job      {}", job.id);
    println!("type     {}", job.job_type);
    println!("queue    {}", job.queue);
    if job.run > 1 {
        println!("stage    {} (run {})", job.stage, job.run);
    } else {
        println!("stage    {}", job.stage);
    }
    if let Some(run_at) = job.run_at {
        println!("run at   {}", run_at.to_rfc3339());
    }
    println!("tasks    {}", job.task_count);
    for (status, count) in &status.tasks_by_status {
        println!("  {status:<10} {count}");
    }
    if let Some(phase) = &job.phase {
        let of_phase: i64 = status.phase_tasks_by_status.values().sum();
        let done = status
            .phase_tasks_by_status
            .get("done")
            .copied()
            .unwrap_or(0);
        println!(
            "phase    {phase}: {done}/{of_phase} done (tasks from ordinal {})",
            job.phase_first_ordinal
        );
    }
    if let Some(result) = &job.result {
        println!("result   {result}");
    }
    if let Some(error) = &job.first_error {
        println!("error    {error}");
    }
    if let Some(parts) = parts {
        println!("parts    {parts}");
    }
    if let Some(waiting) = waiting {
        println!("waiting  {waiting}");
    }
    if let Some(target) = target {
        println!("on_complete  {target}");
    }
    Ok(0)
}

/// Why a running job may not be moving: its pool has no consumer.
async fn pool_report(
    store: &Store,
    job: &crate::store::job::Model,
) -> anyhow::Result<Option<String>> {
    if job.stage != JobStage::Running.as_str() {
        return Ok(None);
    }
    let now = chrono::Utc::now();
    let last_seen_at = store.pool(&job.queue).await?.map(|pool| pool.last_seen_at);
    let silent = last_seen_at.is_none_or(|at| at < known_pools::silent_since(now));
    Ok(silent.then(|| known_pools::describe_silence(&job.queue, last_seen_at, now)))
}

/// A job sent in parts: how many are stored, and its seal.
async fn parts_report(
    store: &Store,
    job: &crate::store::job::Model,
) -> anyhow::Result<Option<String>> {
    let parts = store.parts(&job.id).await?;
    if parts.is_empty() && job.sealed_parts.is_none() {
        return Ok(None);
    }
    let stored = parts.iter().filter(|part| part.stored).count();
    let seal = match (job.sealed_parts, job.sealed_tasks) {
        (Some(parts), Some(tasks)) => format!("sealed: {parts} parts, {tasks} tasks"),
        _ => "not sealed yet".to_owned(),
    };
    Ok(Some(format!(
        "{stored} stored, {} arriving ({seal})",
        parts.len() - stored
    )))
}

/// What went wrong with the job event's `on_complete` target, if anything.
fn target_report(event: &Option<crate::store::job_event::Model>) -> Option<String> {
    let event = event.as_ref()?;
    let error = event.target_error.as_ref()?;
    let next = match event.target_retry_at {
        Some(at) => format!("retrying at {at}"),
        None => "given up".to_owned(),
    };
    Some(format!(
        "failed {} time(s), {next}: {error}",
        event.target_attempts
    ))
}
