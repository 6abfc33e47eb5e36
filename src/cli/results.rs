//! `taskmill results JOB_ID`: a job's task results and errors, streamed in task order.

use std::io::{BufWriter, ErrorKind, Write};

use crate::store::Store;
use crate::{Config, TaskResult, TaskStatus};
use clap::Args;
use futures::TryStreamExt;

#[derive(Args, Debug)]
pub struct ResultsArgs {
    pub job_id: String,
    /// Only tasks in this status (`done`, `failed`, `pending`, ...).
    #[arg(long)]
    pub status: Option<TaskStatus>,
    /// One JSON object per line (ordinal, task_id, status, attempts, result, error)
    /// instead of `ORDINAL STATUS RESULT-OR-ERROR` text.
    #[arg(long)]
    pub json: bool,
}

/// Returns the process exit code: 0 if the job exists, 2 if not.
pub async fn run(config: &Config, args: ResultsArgs) -> anyhow::Result<i32> {
    let store = Store::connect(&config.database_url, 1).await?;
    let Some(mut results) = store.results(&args.job_id, args.status).await? else {
        eprintln!("no job {:?}", args.job_id);
        return Ok(2);
    };
    let mut out = BufWriter::new(std::io::stdout());
    while let Some(result) = results.try_next().await? {
        match write_line(&mut out, &result, args.json) {
            Ok(()) => {}
            // A reader that stopped early (`| head`) is not a failure.
            Err(err) if err.kind() == ErrorKind::BrokenPipe => return Ok(0),
            Err(err) => return Err(err.into()),
        }
    }
    match out.flush() {
        Err(err) if err.kind() != ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(0),
    }
}

fn write_line(out: &mut impl Write, result: &TaskResult, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, result)?;
        return writeln!(out);
    }
    let outcome = match (&result.result, &result.error) {
        (Some(value), _) => value.to_string(),
        (None, Some(error)) => error.clone(),
        (None, None) => String::new(),
    };
    writeln!(out, "{}\t{}\t{outcome}", result.ordinal, result.status)
}
