//! `taskmill bench`: measures this machine's limits and taskmill against them, in one run.
//!
//! 1. Baselines: the broker (persistent messages through a durable queue, confirms
//!    pipelined 1,000 deep, a consumer acking with `multiple` every 100) and the
//!    database (single-row UPDATEs by key from 8 connections; the same rows 100 per
//!    statement).
//! 2. Scenarios, each from submit to the job event, run by fresh `taskmill worker`
//!    processes: S1 one job of N tasks, S2 one job of 10 × N, S7 (only when named:
//!    `--only S7`) one job of 100 × N sent by `taskmill submit --tasks-file`, whose
//!    memory is measured, S3 1,000 jobs of 10, S4 S1
//!    with 10% of tasks failing once, S8 a map → reduce job (the built-in word count)
//!    of N map tasks and 100 reduce shards, S5 S1 with 1, 2 and 4 worker processes; S6
//!    single-task jobs published at a fixed rate (200/s, and half S3's rate), each
//!    timed from its publish to its event; S9 (only when named) the soak, S2-sized
//!    jobs one after another for `--soak-secs` with a short retention ([`soak`]);
//!    S10 single-task jobs submitted by the client (`S10/pub`) and the same written
//!    with `submit_in`, each in a transaction of its own (`S10/tx`); S11 (only when
//!    named) 100,000 jobs scheduled an hour ahead, their cost while they wait, and the
//!    lateness of jobs due among them ([`waiting`]).
//! 3. A table (or `--json`) with rates, latencies, costs per task, worker memory, and
//!    the ratios to the baselines: the machine is shared and noisy, so ratios measured
//!    in the same run are what compare across runs.
//!
//! Everything runs under a fresh prefix on the configured broker and in a scratch
//! database (a new PostgreSQL database, or a temporary SQLite file), removed afterwards.

mod baseline;
mod cpu;
mod database;
mod fleet;
mod open_loop;
mod report;
mod scenario;
mod scratch;
mod soak;
mod waiting;

use crate::store::Store;
use crate::Config;
use clap::Args;

use report::Report;

/// S8's reduce tasks.
const MAP_REDUCE_SHARDS: u32 = 100;
use scenario::Spec;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Tasks of the S1, S4 and S5 job (S2 runs ten times as many).
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    /// Jobs of S3 (10 tasks each) and of S10 (one task each).
    #[arg(long, default_value_t = 1_000)]
    pub jobs: usize,
    /// Pods (`taskmill worker` processes) for S1–S4.
    #[arg(long, alias = "workers", default_value_t = 1)]
    pub pods: usize,
    /// Handlers at once per worker process (default: what `taskmill worker` uses,
    /// TASKMILL_CONCURRENCY or 32).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Task messages held per worker process (default: what `taskmill worker` uses,
    /// TASKMILL_PREFETCH or 256).
    #[arg(long)]
    pub prefetch: Option<usize>,
    /// Seconds each S6 rate publishes for.
    #[arg(long, default_value_t = 15.0)]
    pub open_loop_secs: f64,
    /// Messages for the broker baseline.
    #[arg(long, default_value_t = 50_000)]
    pub baseline_messages: usize,
    /// Seconds S9 submits jobs for.
    #[arg(long, default_value_t = 300.0)]
    pub soak_secs: f64,
    /// Jobs S11 schedules an hour ahead.
    #[arg(long, default_value_t = 100_000)]
    pub waiting_jobs: usize,
    /// Seconds S11 measures its waiting jobs' cost over.
    #[arg(long, default_value_t = 60.0)]
    pub idle_secs: f64,
    /// Scenarios to run (default: all but S7, S9 and S11, which run only when named).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let scratch = scratch::Scratch::create(&config.database_url, &run_id).await?;
    let result = measure(config, &args, &run_id, &scratch).await;
    scratch.remove().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(())
}

async fn measure(
    config: &Config,
    args: &BenchArgs,
    run_id: &str,
    scratch: &scratch::Scratch,
) -> anyhow::Result<Report> {
    let mut config = config.clone();
    config.database_url = scratch.url.clone();
    config.prefix = format!("bench-{run_id}");
    if let Some(concurrency) = args.concurrency {
        config.concurrency = concurrency;
    }
    if let Some(prefetch) = args.prefetch {
        config.prefetch = prefetch;
    }
    let config = config.normalized();
    let store = Store::connect(&config.database_url, 1).await?;
    store.migrate().await?;
    store.close().await?;

    eprintln!("baseline: broker…");
    let broker = baseline::broker(&config, args.baseline_messages).await?;
    eprintln!("baseline: database…");
    // Its own pool, closed afterwards: PostgreSQL counts a backend's statistics when it
    // exits, so the baseline's writes cannot leak into the first scenario's costs.
    let scratch_db = database::BenchDb::connect(&config.database_url, 16).await?;
    let database = baseline::database(&scratch_db).await?;
    let autovacuum = scratch_db.autovacuum().await?;
    if autovacuum == Some(false) {
        eprintln!(
            "warning: PostgreSQL's autovacuum is off: {}",
            report::AUTOVACUUM_OFF
        );
    }
    scratch_db.drop_table().await?;
    scratch_db.close().await?;
    let mut report = Report::new(&config, broker, database, autovacuum);

    let n = args.tasks;
    let mut specs = vec![
        Spec::new("S1", format!("1 job × {n}"), 1, n, args.pods),
        Spec::new("S2", format!("1 job × {}", 10 * n), 1, 10 * n, args.pods),
        Spec::new(
            "S7",
            format!("1 job × {}, submit --tasks-file", 100 * n),
            1,
            100 * n,
            args.pods,
        )
        .through_cli(),
        Spec::new(
            "S3",
            format!("{} jobs × 10", args.jobs),
            args.jobs,
            10,
            args.pods,
        ),
        Spec::new("S4", format!("1 job × {n}, 10% fail once"), 1, n, args.pods).failing_every(10),
    ];
    // The same single-task jobs published by the client, then written in the
    // producers' transactions and published by the relay: what the outbox costs.
    specs.push(Spec::new(
        "S10/pub",
        format!("{} jobs × 1, Client::submit", args.jobs),
        args.jobs,
        1,
        args.pods,
    ));
    specs.push(
        Spec::new(
            "S10/tx",
            format!("{} jobs × 1, submit_in", args.jobs),
            args.jobs,
            1,
            args.pods,
        )
        .in_transactions(),
    );
    specs.push(
        Spec::new(
            "S8",
            format!("1 map → reduce job × {n}, {MAP_REDUCE_SHARDS} shards"),
            1,
            n,
            args.pods,
        )
        .map_reduce(MAP_REDUCE_SHARDS),
    );
    for workers in [1, 2, 4] {
        specs.push(Spec::new(
            &format!("S5/{workers}"),
            format!("S1 on {workers} worker process(es)"),
            1,
            n,
            workers,
        ));
    }
    let named = |name: &str| {
        args.only.iter().any(|s| {
            // `S5` names S5/1, S5/2 and S5/4; `S1` names S1 alone, not S10.
            let family = name.split('/').next().unwrap_or(name);
            name.eq_ignore_ascii_case(s) || family.eq_ignore_ascii_case(s)
        })
    };
    // S7 (100 × N tasks), S9 (the soak) and S11 (100,000 scheduled jobs) run only when
    // named: they take minutes.
    let selected =
        |name: &str| (args.only.is_empty() && !["S7", "S9", "S11"].contains(&name)) || named(name);
    specs.retain(|spec| selected(&spec.name));

    let counters = database::BenchDb::connect(&config.database_url, 1).await?;
    let bench = scenario::Bench::start(&config, counters).await?;
    // Let the baselines' traffic reach the broker's sampled statistics first.
    tokio::time::sleep(scenario::STATS_SETTLE).await;
    for spec in specs {
        eprintln!("scenario {}: {}…", spec.name, spec.title);
        let result = bench.run(&spec).await?;
        report.scenarios.push(result);
    }
    if selected("S6") {
        // 200 jobs/s, and half the rate S3 ended jobs at when it ran.
        let mut rates = vec![open_loop::OPEN_LOOP_RATE];
        rates.extend(
            report
                .scenario("S3")
                .map(|s3| (s3.jobs_per_s / 2.0).round()),
        );
        for rate in rates {
            let result = open_loop(&bench, rate, args.open_loop_secs).await?;
            report.open_loop.push(result);
        }
        // Saturation: from 200/s up by half at a time, while every event arrives with
        // p99 under 250 ms.
        let mut rate = open_loop::OPEN_LOOP_RATE;
        let mut kept_up = report.open_loop.first().is_some_and(|s6| s6.kept_up());
        while kept_up && rate < open_loop::MAX_OPEN_LOOP_RATE {
            rate = (rate * 1.5).round();
            let result = open_loop(&bench, rate, args.open_loop_secs).await?;
            kept_up = result.kept_up();
            report.open_loop.push(result);
        }
    }
    if selected("S9") {
        eprintln!("scenario S9: jobs × {} back to back…", 10 * n);
        let sizes = database::BenchDb::connect(&config.database_url, 1).await?;
        report.soak = Some(bench.soak(&sizes, 10 * n, args.soak_secs).await?);
        sizes.close().await?;
    }
    if selected("S11") {
        eprintln!(
            "scenario S11: {} jobs scheduled an hour ahead…",
            args.waiting_jobs
        );
        let sizes = database::BenchDb::connect(&config.database_url, 1).await?;
        let waiting = bench
            .waiting(&sizes, args.waiting_jobs, args.jobs, args.idle_secs)
            .await?;
        report.waiting = Some(waiting);
        sizes.close().await?;
    }
    bench.stop().await;
    Ok(report)
}

/// One S6 rate.
async fn open_loop(
    bench: &scenario::Bench,
    rate: f64,
    secs: f64,
) -> anyhow::Result<open_loop::OpenLoopResult> {
    let name = format!("S6/{rate:.0}");
    eprintln!("scenario {name}: single-task jobs at {rate:.0}/s…");
    bench.open_loop(&name, rate, secs).await
}
