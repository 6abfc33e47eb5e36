//! `taskmill cancel JOB_ID`: cancel a running job and publish its `job.cancelled` event.

use crate::store::Store;
use crate::{Client, Config};
use clap::Args;

#[derive(Args, Debug)]
pub struct CancelArgs {
    pub job_id: String,
}

/// Returns the process exit code: 0 if the job was cancelled, 2 if it was neither
/// running nor forming.
pub async fn run(config: &Config, args: CancelArgs) -> anyhow::Result<i32> {
    let store = Store::connect(&config.database_url, 2).await?;
    let client = Client::connect(config).await?.with_store(store.into());
    let cancelled = client.cancel(&args.job_id).await?;
    client.close().await?;
    match cancelled {
        Some(event) => {
            println!("{}", serde_json::to_string_pretty(&event)?);
            Ok(0)
        }
        None => {
            eprintln!("job {:?} is neither running nor forming", args.job_id);
            Ok(2)
        }
    }
}
