//! The `taskmill` binary: parses the command line, sets up logging and the shutdown
//! token, and hands over to the subcommand. An error ends it with one line on stderr
//! (the error and its causes), never a backtrace: it is a message for an operator.

mod cli;

use std::io::IsTerminal;

use clap::Parser;
use taskmill::CancellationToken;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() {
    match run(Cli::parse()).await {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("taskmill: {err:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the command; its exit code.
async fn run(cli: Cli) -> anyhow::Result<i32> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,taskmill=info")),
        )
        .with_writer(std::io::stderr);
    match LogFormat::chosen(cli.global.log_format, std::io::stderr().is_terminal()) {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let config = cli.global.config()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match cli.command {
        Command::Migrate => cli::migrate::run(&config).await.map(|()| 0),
        Command::Worker(args) => cli::pod::run(config, args, shutdown).await.map(|()| 0),
        Command::Submit(args) => cli::submit::run(&config, args, shutdown).await,
        Command::Status(args) => cli::status::run(&config, args).await,
        Command::Jobs(args) => cli::jobs::run(&config, args).await.map(|()| 0),
        Command::Results(args) => cli::results::run(&config, args).await,
        Command::Cancel(args) => cli::cancel::run(&config, args).await,
        Command::Retry(args) => cli::retry::run(&config, args).await,
        Command::Demo(args) => cli::demo::run(config, args, shutdown).await,
        Command::Dead(args) => cli::dead::run(&config, args).await.map(|()| 0),
        Command::Bench(args) => cli::bench::run(&config, args).await.map(|()| 0),
    }
}

/// The first SIGINT/SIGTERM starts a graceful shutdown; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    for round in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if round == 0 {
            tracing::info!("shutting down gracefully; signal again to exit at once");
            shutdown.cancel();
        } else {
            std::process::exit(130);
        }
    }
}
