//! The `taskmill` binary: parses the command line, sets up logging and the shutdown
//! token, and hands over to the subcommand. An error ends it with one line on stderr
//! (the error and its causes), never a backtrace: it is a message for an operator.

mod cli;

use std::io::IsTerminal;

use clap::Parser;
use taskmill::CancellationToken;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, LogFormat};

fn main() {
    // Before the runtime starts its threads: arenas are made as threads first allocate.
    malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(Cli::parse())) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("taskmill: {err:#}");
            std::process::exit(1);
        }
    }
}

/// Caps glibc's malloc at one arena per core, unless `MALLOC_ARENA_MAX` says otherwise.
/// glibc's own cap is eight per core, and a pod's threads (the runtime's, and on SQLite
/// one per connection) each end up with an arena that keeps what it once held: a
/// 100,000-task job on SQLite peaked at 91–94 MiB with glibc's cap and at 66–76 MiB
/// with this one on 2 cores, in the same time. One arena for all kept it at 62 MiB but
/// made that job 30–60% slower, its threads waiting on the one arena's lock.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // SAFETY: mallopt only sets a tunable, and no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc_arenas() {}

/// Runs the command; its exit code.
async fn run(cli: Cli) -> anyhow::Result<i32> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("RUST_LOG")
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
        Command::Prune(args) => cli::prune::run(&config, args, shutdown).await,
        Command::Dead(args) => cli::dead::run(&config, args).await.map(|()| 0),
        Command::Schedule(args) => cli::schedule::run(&config, args).await,
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
