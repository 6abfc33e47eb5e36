//! `cargo run -p migration`: applies pending migrations to `DATABASE_URL` (the same
//! default as taskmill: `sqlite://taskmill.db?mode=rwc`). `taskmill migrate` does the
//! same with a lock that is safe when many pods start at once.

use migration::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::Database;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://taskmill.db?mode=rwc".into());
    let db = Database::connect(&url).await?;
    Migrator::up(&db, None).await?;
    println!("migrations applied to {url}");
    Ok(())
}
