//! `cargo run -p migration [-- N]`: applies the pending migrations (the first N of them
//! when given) to `DATABASE_URL` (the same default as taskmill:
//! `sqlite://taskmill.db?mode=rwc`). `taskmill migrate` applies them all with a lock
//! that is safe when many pods start at once.

use migration::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::Database;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://taskmill.db?mode=rwc".into());
    let steps = match std::env::args().nth(1) {
        Some(steps) => Some(steps.parse::<u32>().map_err(|_| {
            format!(
                "usage: migration [N], N the number of pending migrations to apply, not {steps:?}"
            )
        })?),
        None => None,
    };
    let db = Database::connect(&url).await?;
    Migrator::up(&db, steps).await?;
    println!("migrations applied to {url}");
    Ok(())
}
