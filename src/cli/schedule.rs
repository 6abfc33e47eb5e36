//! `taskmill schedule add|list|remove`: periodic jobs from the command line, written to
//! the `schedules` table that every deployment's request relay fires from.

use crate::schedule::{CatchUp, Schedule};
use crate::store::Store;
use crate::Config;
use clap::{Args, Subcommand};

use super::submit::SubmitArgs;

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    #[command(subcommand)]
    pub action: ScheduleAction,
}

#[derive(Subcommand, Debug)]
pub enum ScheduleAction {
    /// Add a schedule, or replace the one of that name (an unchanged one keeps its
    /// ticks).
    Add {
        /// The schedule's name; its jobs are `<name>:<tick>`.
        name: String,
        /// Five fields from the minute (`0 9 * * MON-FRI`), or six from the second.
        #[arg(long)]
        cron: String,
        /// The IANA time zone the pattern is read in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// What happens to ticks missed while no pod ran: skip (only the latest fires)
        /// or all (each fires, the latest 1,000 at most).
        #[arg(long, default_value = "skip")]
        catch_up: String,
        /// The job each tick submits, as `taskmill submit` takes it (its --job-id,
        /// --run-at, --delay and --wait do not apply).
        #[command(flatten)]
        job: Box<SubmitArgs>,
    },
    /// Show the schedules with their last and next tick.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule: no tick of it fires any more.
    Remove { name: String },
}

pub async fn run(config: &Config, args: ScheduleArgs) -> anyhow::Result<i32> {
    let store = Store::connect(&config.database_url, 2).await?;
    let code = match args.action {
        ScheduleAction::Add {
            name,
            cron,
            tz,
            catch_up,
            job,
        } => {
            anyhow::ensure!(
                job.tasks_file.is_none(),
                "a schedule's tasks go in --task or come from --params"
            );
            let schedule = Schedule::new(&name, &cron, super::submit::request(&job)?)?
                .timezone(&tz)?
                .catch_up(catch_up.parse::<CatchUp>()?);
            let now = chrono::Utc::now();
            let changed = store
                .put_schedule(&crate::schedule::row_of(&schedule, now)?)
                .await?;
            let next = store
                .schedules()
                .await?
                .into_iter()
                .find(|row| row.name == name)
                .map(|row| row.next_tick.to_rfc3339());
            match changed {
                true => println!(
                    "schedule {name} set; next tick {}",
                    next.unwrap_or_default()
                ),
                false => println!(
                    "schedule {name} unchanged; next tick {}",
                    next.unwrap_or_default()
                ),
            }
            0
        }
        ScheduleAction::List { json } => {
            let rows = store.schedules().await?;
            if json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|row| {
                        serde_json::json!({
                            "name": row.name,
                            "cron": row.cron,
                            "timezone": row.timezone,
                            "catch_up": row.catch_up,
                            "next_tick": row.next_tick,
                            "last_tick": row.last_tick,
                            "last_job_id": row.last_job_id,
                            "request": serde_json::from_str::<serde_json::Value>(&row.request)
                                .unwrap_or_default(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no schedules");
            } else {
                println!(
                    "{:<24} {:<20} {:<16} {:<6} {:<26} {:<26} last job",
                    "name", "cron", "time zone", "missed", "next tick", "last tick"
                );
                for row in &rows {
                    println!(
                        "{:<24} {:<20} {:<16} {:<6} {:<26} {:<26} {}",
                        row.name,
                        row.cron,
                        row.timezone,
                        row.catch_up,
                        row.next_tick.to_rfc3339(),
                        row.last_tick
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_else(|| "-".into()),
                        row.last_job_id.as_deref().unwrap_or("-"),
                    );
                }
            }
            0
        }
        ScheduleAction::Remove { name } => {
            if store.remove_schedule(&name).await? {
                println!("schedule {name} removed");
                0
            } else {
                eprintln!("no schedule {name}");
                1
            }
        }
    };
    store.close().await?;
    Ok(code)
}
