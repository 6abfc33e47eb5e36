//! Numbered schema migrations for taskmill's tables. Run by `taskmill migrate`, at
//! worker start, or standalone with `cargo run -p migration`.

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_create_jobs_and_tasks;
mod m20261125_000002_create_leases;
mod m20261125_000003_lean_task_indexes;
mod m20261126_000004_untrusted_producers;
mod m20261126_000005_pools;
mod m20261127_000006_unfinished_by_finished_at;
mod m20261127_000007_results_in_event;
mod m20261127_000008_stages;
mod m20261127_000009_external_tasks;
mod m20261128_000010_lean_task_writes;
mod m20261128_000011_job_parts;
mod m20261128_000012_jobs_by_creation;
mod m20261202_000013_job_runs;
mod m20261204_000014_feed_progress;
mod m20261204_000015_task_runs;
mod m20261206_000016_retention;
mod m20261206_000017_task_partitions;
mod m20261206_000018_task_ids_per_partition;
mod m20261206_000019_job_requests;
mod m20261206_000020_scheduled_jobs;
mod m20261206_000021_schedules;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_create_jobs_and_tasks::Migration),
            Box::new(m20261125_000002_create_leases::Migration),
            Box::new(m20261125_000003_lean_task_indexes::Migration),
            Box::new(m20261126_000004_untrusted_producers::Migration),
            Box::new(m20261126_000005_pools::Migration),
            Box::new(m20261127_000006_unfinished_by_finished_at::Migration),
            Box::new(m20261127_000007_results_in_event::Migration),
            Box::new(m20261127_000008_stages::Migration),
            Box::new(m20261127_000009_external_tasks::Migration),
            Box::new(m20261128_000010_lean_task_writes::Migration),
            Box::new(m20261128_000011_job_parts::Migration),
            Box::new(m20261128_000012_jobs_by_creation::Migration),
            Box::new(m20261202_000013_job_runs::Migration),
            Box::new(m20261204_000014_feed_progress::Migration),
            Box::new(m20261204_000015_task_runs::Migration),
            Box::new(m20261206_000016_retention::Migration),
            Box::new(m20261206_000017_task_partitions::Migration),
            Box::new(m20261206_000018_task_ids_per_partition::Migration),
            Box::new(m20261206_000019_job_requests::Migration),
            Box::new(m20261206_000020_scheduled_jobs::Migration),
            Box::new(m20261206_000021_schedules::Migration),
        ]
    }
}
