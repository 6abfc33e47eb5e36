//! `taskmill retry JOB_ID`: run a failed job's failed and cancelled tasks again.

use crate::store::Store;
use crate::{Client, Config, Error};
use clap::Args;

#[derive(Args, Debug)]
pub struct RetryArgs {
    pub job_id: String,
}

/// Returns the process exit code: 0 if the job runs again, 2 if there is no such job
/// or it cannot be retried (the reason goes to stderr).
pub async fn run(config: &Config, args: RetryArgs) -> anyhow::Result<i32> {
    let store = Store::connect(&config.database_url, 2).await?;
    let client = Client::connect(config).await?.with_store(store.into());
    let retried = client.retry(&args.job_id).await;
    client.close().await?;
    match retried {
        Ok(tasks) => {
            println!("job {} runs again: {tasks} tasks", args.job_id);
            Ok(0)
        }
        Err(err @ (Error::UnknownJob(_) | Error::NotRetried { .. })) => {
            eprintln!("{err}");
            Ok(2)
        }
        Err(err) => Err(err.into()),
    }
}
