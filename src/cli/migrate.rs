//! `taskmill migrate`: apply pending migrations.

use crate::store::Store;
use crate::Config;

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.database_url, 1).await?;
    store.migrate().await?;
    println!("migrations applied");
    Ok(())
}
