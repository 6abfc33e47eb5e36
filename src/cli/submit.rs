//! `taskmill submit`: publish a job request, optionally waiting for its event.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::config::DEFAULT_DATABASE_URL;
use crate::protocol::{DEFAULT_MAX_RETRIES, DEFAULT_RETRY_DELAY_MS};
use crate::{CancellationToken, Client, Config, FailurePolicy, JobRequest};
use anyhow::Context;
use clap::Args;
use serde_json::value::RawValue;
use serde_json::Value;

use super::progress::Progress;

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Job type (and task type, unless --task-type is given).
    #[arg(long = "type")]
    pub job_type: String,
    /// Handler of the tasks, when it differs from the job type.
    #[arg(long)]
    pub task_type: Option<String>,
    /// A file with one JSON task payload per line, streamed: a large one goes in parts.
    #[arg(long, conflicts_with = "task")]
    pub tasks_file: Option<PathBuf>,
    /// A task payload as JSON (repeatable).
    #[arg(long)]
    pub task: Vec<String>,
    /// Job parameters as JSON (for splitters).
    #[arg(long)]
    pub params: Option<String>,
    /// The pool whose workers run the tasks.
    #[arg(long, alias = "queue", default_value = "default")]
    pub pool: String,
    #[arg(long, default_value_t = DEFAULT_MAX_RETRIES)]
    pub max_retries: u32,
    #[arg(long, default_value_t = DEFAULT_RETRY_DELAY_MS)]
    pub retry_delay_ms: u64,
    /// Keep running the other tasks when one fails, instead of failing the job at once.
    #[arg(long)]
    pub continue_on_failure: bool,
    /// Idempotency key: a second submit with the same id creates no second job.
    #[arg(long)]
    pub job_id: Option<String>,
    /// For a job type with a reduce stage: reduce tasks at most.
    #[arg(long)]
    pub reduce_shards: Option<u32>,
    /// For a job type with a reduce stage: one reduce task per key.
    #[arg(long)]
    pub reduce_per_key: bool,
    /// Ask for the tasks' results in the job event (small jobs; see the protocol).
    #[arg(long)]
    pub results_in_event: bool,
    /// Run the job's tasks not before this time (RFC 3339, e.g.
    /// 2026-12-24T18:00:00+01:00); the job is `scheduled` until then.
    #[arg(long, conflicts_with = "delay")]
    pub run_at: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// Run the job's tasks this long from now (`10m`, `2h`): a `run_at` computed here.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delay: Option<std::time::Duration>,
    /// Wait for the job event; exit 0 when done, 1 when failed. Shows the job's
    /// progress meanwhile when DATABASE_URL names its database.
    #[arg(long)]
    pub wait: bool,
}

fn parse_json(text: &str, what: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON: {text}"))
}

/// The request's settings and `--task` payloads; a `--tasks-file` is streamed by
/// [`send`] instead.
pub fn request(args: &SubmitArgs) -> anyhow::Result<JobRequest> {
    let tasks = args
        .task
        .iter()
        .map(|task| parse_json(task, "--task"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut request = JobRequest::new(&args.job_type, tasks);
    if args.tasks_file.is_none() && args.task.is_empty() && args.params.is_some() {
        request.tasks = None;
    }
    request.task_type = args.task_type.clone();
    request.job_id = args.job_id.clone();
    request.pool = args.pool.clone();
    request.max_retries = args.max_retries;
    request.retry_delay_ms = args.retry_delay_ms;
    request.results_in_event = args.results_in_event;
    request.reduce_shards = args.reduce_shards;
    request.reduce_per_key = args.reduce_per_key.then_some(true);
    if args.continue_on_failure {
        request.on_failure = FailurePolicy::Continue;
    }
    if let Some(params) = &args.params {
        request.params = parse_json(params, "--params")?;
    }
    request.run_at = args.run_at.map(|at| at.with_timezone(&chrono::Utc));
    if let Some(delay) = args.delay {
        request = request.delayed(delay);
    }
    Ok(request)
}

/// Returns the process exit code; a signal while waiting stops the wait (exit 130),
/// not the job.
pub async fn run(
    config: &Config,
    args: SubmitArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<i32> {
    let mut request = request(&args)?;
    let client = Client::connect(config).await?;
    let job_id = request
        .job_id
        .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
        .clone();
    let watch = if args.wait {
        let watch = client.watch(&job_id).await?;
        // The job's event comes by the events exchange; an answer that goes to the
        // request's own target only (the stored event of a job that ended before,
        // the refusal of a job id reused with another request) comes here too.
        request
            .on_complete
            .get_or_insert_with(|| watch.reply_target());
        Some(watch)
    } else {
        None
    };
    send(&client, request, args.tasks_file.as_deref()).await?;
    println!("{job_id}");
    let Some(watch) = watch else {
        return Ok(0);
    };
    // Progress needs the database; the event alone needs only the broker.
    let progress = (config.database_url != DEFAULT_DATABASE_URL)
        .then(|| Progress::follow(config.database_url.clone(), job_id.clone()));
    let answer = tokio::select! {
        answer = watch.event() => Some(answer),
        _ = shutdown.cancelled() => None,
    };
    if let Some(progress) = progress {
        progress.finish();
    }
    let Some(answer) = answer else {
        eprintln!("stopped waiting; job {job_id} goes on (taskmill status {job_id})");
        client.close().await?;
        return Ok(130);
    };
    let event = match answer {
        Ok(event) => event,
        // An answer, not a failure of this command: say why, exit 1 as for a failed job.
        Err(rejected @ crate::Error::Rejected { .. }) => {
            eprintln!("{rejected}");
            client.close().await?;
            return Ok(1);
        }
        Err(err) => return Err(err.into()),
    };
    println!("{}", serde_json::to_string_pretty(&event)?);
    client.close().await?;
    Ok(if event.is_done() { 0 } else { 1 })
}

/// Submits the request; with a tasks file, streams it line by line into parts
/// ([`Client::open_job`]), so that a file of any size needs one part's memory.
async fn send(
    client: &Client,
    request: JobRequest,
    tasks_file: Option<&Path>,
) -> anyhow::Result<()> {
    let Some(path) = tasks_file else {
        client.submit(request).await?;
        return Ok(());
    };
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut job = client.open_job(request)?;
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let payload = RawValue::from_string(line.to_owned()).with_context(|| {
            format!("line {} of {} is not valid JSON", index + 1, path.display())
        })?;
        job.push_raw(payload).await?;
    }
    job.seal().await?;
    Ok(())
}
