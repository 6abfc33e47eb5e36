//! `taskmill migrate`: apply pending migrations.

use taskmill::store::Store;
use taskmill::Config;

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.database_url, 1).await?;
    store.migrate().await?;
    println!("migrations applied");
    Ok(())
}
