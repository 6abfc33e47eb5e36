//! `taskmill dead list|replay|purge`: the parking lot, for operators. Nothing leaves
//! the parking lot except through these commands.

use clap::{Args, Subcommand};
use taskmill::amqp::topology::Topology;
use taskmill::amqp::{broker, parking};
use taskmill::Config;

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
    /// Delete every parked message.
    Purge,
}

pub async fn run(config: &Config, args: DeadArgs) -> anyhow::Result<()> {
    let connection = broker::connect(&config.amqp_url).await?;
    let topology = Topology::new(config.prefix.clone(), config.queue_type);
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
                println!("{} parked", parked.len());
            }
        }
        DeadAction::Replay { ids, all } => {
            let only = if all { None } else { Some(ids.as_slice()) };
            let replayed = parking::replay(&connection, &topology, only).await?;
            println!("replayed {replayed}");
        }
        DeadAction::Purge => {
            let purged = parking::purge(&connection, &topology).await?;
            println!("purged {purged}");
        }
    }
    connection.close(200, "bye".into()).await?;
    Ok(())
}
