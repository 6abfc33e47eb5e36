//! `taskmill dead list|replay|purge`: the parking lot, for operators. Nothing leaves
//! the parking lot except through these commands.

use crate::amqp::topology::Topology;
use crate::amqp::{broker, parking};
use crate::Config;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct DeadArgs {
    #[command(subcommand)]
    pub action: DeadAction,
}

#[derive(Subcommand, Debug)]
pub enum DeadAction {
    /// Show parked messages with their reasons (nothing is removed).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Send parked messages back to where they were first published.
    Replay {
        /// Parked message ids (see `list`).
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete parked messages: all, or those parked longer ago than --older-than.
    Purge {
        /// Only the messages parked longer ago than this (e.g. 7d), taken from the
        /// head of the lot, where the oldest wait.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
    },
}

pub async fn run(config: &Config, args: DeadArgs) -> anyhow::Result<()> {
    let connection = broker::connect(&config.amqp_url).await?;
    let topology = Topology::new(config.prefix.clone(), config.queue_type)
        .with_parking_max(config.parking_max);
    match args.action {
        DeadAction::List { json } => {
            let parked = parking::list(&connection, &topology, usize::MAX).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&parked)?);
            } else if parked.is_empty() {
                println!("the parking lot is empty");
            } else {
                for message in &parked {
                    println!(
                        "{}  {}  from {} ({} bytes)",
                        message.id, message.parked_at, message.source_queue, message.bytes
                    );
                    println!("    reason: {}", message.reason);
                    let preview: String = message.body_preview.chars().take(120).collect();
                    println!("    body:   {preview}");
                }
                println!(
                    "{} parked (bound: {}, TASKMILL_PARKING_MAX)",
                    parked.len(),
                    topology.parking_max()
                );
            }
        }
        DeadAction::Replay { ids, all } => {
            let only = if all { None } else { Some(ids.as_slice()) };
            let replayed = parking::replay(&connection, &topology, only).await?;
            println!("replayed {replayed}");
        }
        DeadAction::Purge { older_than } => {
            let purged = match older_than {
                Some(age) => {
                    let cut_off = chrono::Utc::now() - chrono::Duration::from_std(age)?;
                    parking::purge_parked_before(&connection, &topology, cut_off).await?
                }
                None => parking::purge(&connection, &topology).await?,
            };
            println!("purged {purged}");
        }
    }
    connection.close(200, "bye".into()).await?;
    Ok(())
}
