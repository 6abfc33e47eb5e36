//! `taskmill prune`: remove ended jobs past their retention now, by hand.

use std::time::Duration;

use crate::state::JobStage;
use crate::store::Store;
use crate::{CancellationToken, Config};
use clap::Args;

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Remove jobs that ended longer ago than this (such as 90m, 24h, 7d), whatever
    /// stage they ended in; by default each stage's retention
    /// (TASKMILL_RETENTION, TASKMILL_RETENTION_FAILED).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// Only jobs that ended in this stage: done, failed or cancelled.
    #[arg(long)]
    pub stage: Option<JobStage>,
    /// Count what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(
    config: &Config,
    args: PruneArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<i32> {
    if let Some(stage) = args.stage.filter(|stage| !stage.is_terminal()) {
        anyhow::bail!(
            "a {} job has not ended: only done, failed and cancelled jobs are removed",
            stage.as_str()
        );
    }
    let stages: Vec<JobStage> = args.stage.into_iter().collect();
    let now = chrono::Utc::now();
    let rule = match args.older_than {
        Some(age) => crate::retention::older_than(age, &stages, now),
        None => {
            let rule = crate::retention::rule(&config.retention, config.partition_span, now);
            match args.stage {
                Some(stage) => rule.only(stage),
                None => rule,
            }
        }
    };
    let store = Store::connect(&config.database_url, 1).await?;
    if args.dry_run {
        let due = store.removable_now(&rule).await?;
        println!("would remove {} jobs ({} tasks)", due.jobs, due.tasks);
        return Ok(0);
    }
    let removed = crate::retention::remove(&store, &rule, Duration::MAX, &shutdown).await?;
    println!("removed {} jobs ({} tasks)", removed.jobs, removed.tasks);
    Ok(if shutdown.is_cancelled() { 130 } else { 0 })
}
