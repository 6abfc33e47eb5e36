//! The bench report: JSON, or a table with the ratios that compare across runs.

use crate::Config;
use serde::Serialize;

use super::baseline::{BrokerBaseline, DatabaseBaseline};
use super::open_loop::OpenLoopResult;
use super::scenario::ScenarioResult;
use super::soak::SoakResult;
use super::waiting::WaitingResult;

/// What a run without autovacuum means for its figures.
pub const AUTOVACUUM_OFF: &str = "dead task rows pile up and large jobs slow down; \
    these figures are not what a production server gives (docs/operations.md)";

#[derive(Debug, Serialize)]
pub struct Report {
    pub cores: usize,
    pub backend: String,
    pub worker_concurrency: usize,
    pub worker_prefetch: usize,
    /// Whether the workers ran with `taskmill worker`'s default settings.
    pub defaults: bool,
    /// Whether PostgreSQL's autovacuum was on; `None` on SQLite.
    pub autovacuum: Option<bool>,
    pub broker: BrokerBaseline,
    pub database: DatabaseBaseline,
    pub scenarios: Vec<ScenarioResult>,
    pub open_loop: Vec<OpenLoopResult>,
    pub soak: Option<SoakResult>,
    pub waiting: Option<WaitingResult>,
}

impl Report {
    pub fn new(
        config: &Config,
        broker: BrokerBaseline,
        database: DatabaseBaseline,
        autovacuum: Option<bool>,
    ) -> Self {
        Self {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            backend: if config.database_url.starts_with("postgres") {
                "PostgreSQL"
            } else {
                "SQLite"
            }
            .to_owned(),
            worker_concurrency: config.concurrency,
            worker_prefetch: config.prefetch,
            defaults: {
                let default = Config::default();
                (config.concurrency, config.prefetch) == (default.concurrency, default.prefetch)
            },
            autovacuum,
            broker,
            database,
            scenarios: Vec::new(),
            open_loop: Vec::new(),
            soak: None,
            waiting: None,
        }
    }

    pub fn scenario(&self, name: &str) -> Option<&ScenarioResult> {
        self.scenarios.iter().find(|s| s.name == name)
    }

    pub fn print(&self) {
        println!(
            "taskmill bench: {} cores shared by broker, database and workers; {}; per worker process {} handlers, prefetch {} ({})",
            self.cores,
            self.backend,
            self.worker_concurrency,
            self.worker_prefetch,
            if self.defaults { "the defaults" } else { "tuned" }
        );
        match self.autovacuum {
            Some(true) => println!("PostgreSQL autovacuum: on"),
            Some(false) => println!("PostgreSQL autovacuum: OFF — {AUTOVACUUM_OFF}"),
            None => {}
        }
        println!();
        println!("baselines");
        println!(
            "  broker    persistent, confirms 1,000 deep, acks every 100  {:>9.0} msg/s",
            self.broker.messages_per_s
        );
        println!(
            "  database  single-row UPDATE by key, 8 connections          {:>9.0} rows/s",
            self.database.single_row_updates_per_s
        );
        println!(
            "  database  100-row UPDATE, 8 connections                     {:>9.0} rows/s",
            self.database.batched_rows_per_s
        );
        if !self.scenarios.is_empty() {
            self.print_scenarios();
        }
        if let Some(s1) = self.scenario("S1") {
            println!();
            println!(
                "goal S1 ≥ 50% of broker:                 {:.0}%",
                100.0 * s1.tasks_per_s / self.broker.messages_per_s
            );
            if let Some(s3) = self.scenario("S3") {
                println!(
                    "goal S3 ≥ 45% of broker:                 {:.0}% (tasks/s)",
                    100.0 * s3.tasks_per_s / self.broker.messages_per_s
                );
            }
            if let Some(s4) = self.scenario("S4") {
                println!(
                    "goal S4 ≥ 85% of S1:                     {:.0}%",
                    100.0 * s4.tasks_per_s / s1.tasks_per_s
                );
            }
            if let Some(s8) = self.scenario("S8") {
                println!(
                    "goal S8 map → reduce rate ≥ 80% of S1:   {:.0}% (tasks/s, reduce and finalize tasks counted)",
                    100.0 * s8.tasks_per_s / s1.tasks_per_s
                );
            }
            if let Some(s2) = self.scenario("S2") {
                println!(
                    "goal S2 time ≤ 11 × S1 time:             {:.1} ×",
                    s2.seconds / s1.seconds
                );
                println!(
                    "goal S2 worker peak RSS < 64 MiB:        {}",
                    opt(s2.worker_peak_rss_mib, 1)
                );
            }
        }
        if let Some(s7) = self.scenario("S7") {
            println!();
            if let Some(s2) = self.scenario("S2") {
                println!(
                    "goal S7 time ≤ 11 × S2 time:             {:.1} ×",
                    s7.seconds / s2.seconds
                );
            }
            println!(
                "goal S7 submit peak RSS ≤ 64 MiB:        {}",
                opt(s7.submit_peak_rss_mib, 1)
            );
            println!(
                "goal S7 worker peak RSS ≤ 48 MiB:        {}",
                opt(s7.worker_peak_rss_mib, 1)
            );
            println!(
                "goal S7 submit → first task done ≤ 1 s:  {} ms",
                opt(s7.first_task_ms, 0)
            );
            println!(
                "S7 PostgreSQL per task: {} bytes of WAL, {} bytes of tasks table and indexes",
                opt(s7.db_wal_bytes_per_task, 0),
                opt(s7.db_table_bytes_per_task, 0)
            );
        }
        if !self.open_loop.is_empty() {
            println!();
            println!(
                "{:<8} {:<40} {:>9} {:>7} {:>22} {:>22}",
                "",
                "open loop: single-task jobs",
                "published",
                "ended",
                "publish → event p50/p99/max ms",
                "CPU ms/job pg/mq/worker"
            );
            for s in &self.open_loop {
                let cpu = &s.cpu_ms_per_job;
                println!(
                    "{:<8} {:<40} {:>9} {:>7} {:>22} {:>22}{}",
                    s.name,
                    format!("{:.0} jobs/s for {:.0} s", s.jobs_per_s, s.seconds),
                    s.published,
                    s.arrived,
                    format!(
                        "{:.0}/{:.0}/{:.0}",
                        s.latency_p50_ms, s.latency_p99_ms, s.latency_max_ms
                    ),
                    format!("{:.2}/{:.2}/{:.2}", cpu.postgres, cpu.rabbitmq, cpu.workers),
                    if s.arrived == s.published {
                        ""
                    } else {
                        "  (events missing!)"
                    },
                );
            }
            let saturation = self
                .open_loop
                .iter()
                .filter(|s| s.kept_up())
                .map(|s| s.jobs_per_s)
                .fold(None, |top: Option<f64>, rate| {
                    Some(top.map_or(rate, |t| t.max(rate)))
                });
            println!(
                "goal S6 saturation ≥ 8% of broker:       {} jobs/s = {} (highest rate with every event and p99 < {:.0} ms)",
                opt(saturation, 0),
                opt(saturation.map(|rate| 100.0 * rate / self.broker.messages_per_s), 1) + "%",
                super::open_loop::KEPT_UP_P99_MS
            );
            if let Some(s6) = self
                .open_loop
                .iter()
                .find(|s| s.jobs_per_s == super::open_loop::OPEN_LOOP_RATE)
            {
                println!(
                    "goal S6 at 200 jobs/s p99 < 25 ms:       {:.0} ms{}",
                    s6.latency_p99_ms,
                    if s6.arrived == s6.published {
                        ""
                    } else {
                        " (events missing)"
                    }
                );
            }
        }
        if let Some(soak) = &self.soak {
            print_soak(soak);
        }
        if let Some(waiting) = &self.waiting {
            print_waiting(waiting);
        }
    }
}

impl Report {
    /// The closed-loop scenarios' table and their CPU per task.
    fn print_scenarios(&self) {
        println!();
        println!(
            "{:<6} {:<30} {:>7} {:>7} {:>8} {:>8} {:>16} {:>16} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8}",
            "", "scenario", "tasks", "wall s", "tasks/s", "jobs/s", "task p50/p99 ms", "job p50/p99 ms",
            "db tx", "db rows", "msgs", "RSS MiB", "÷broker", "÷db 1-row"
        );
        for s in &self.scenarios {
            println!(
                "{:<6} {:<30} {:>7} {:>7.2} {:>8.0} {:>8.1} {:>16} {:>16} {:>7} {:>7} {:>7} {:>7} {:>7.0}% {:>8.0}%{}",
                s.name,
                s.title,
                s.tasks,
                s.seconds,
                s.tasks_per_s,
                s.jobs_per_s,
                format!("{:.0}/{:.0}", s.task_latency_p50_ms, s.task_latency_p99_ms),
                format!("{:.0}/{:.0}", s.job_latency_p50_ms, s.job_latency_p99_ms),
                opt(s.db_transactions_per_task, 2),
                opt(s.db_rows_written_per_task, 2),
                opt(s.broker_messages_per_task, 2),
                opt(s.worker_peak_rss_mib, 1),
                100.0 * s.tasks_per_s / self.broker.messages_per_s,
                100.0 * s.tasks_per_s / self.database.single_row_updates_per_s,
                if s.all_done { "" } else { "  (not every job done!)" },
            );
        }
        println!();
        println!("CPU seconds per 100,000 tasks (from /proc):  PostgreSQL  RabbitMQ  workers");
        for s in &self.scenarios {
            let cpu = &s.cpu_s_per_100k_tasks;
            println!(
                "  {:<42} {:>10.1} {:>9.1} {:>8.1}",
                s.name, cpu.postgres, cpu.rabbitmq, cpu.workers
            );
        }
        println!();
        println!("columns: db tx and db rows are PostgreSQL transactions and rows written per task; msgs are broker publishes per task;");
        println!("         ÷broker and ÷db 1-row are tasks/s as a share of the baselines above");
        let ready = self.scenarios.iter().map(|s| s.workers_ready_ms);
        if let (Some(min), Some(max)) = (ready.clone().reduce(f64::min), ready.reduce(f64::max)) {
            println!("         each clock starts once its fresh worker processes consume: {min:.0}–{max:.0} ms after they were spawned");
        }
    }
}

/// `value` with `decimals` decimals, or `n/a`.
fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

fn print_soak(soak: &SoakResult) {
    let mib = |bytes: Option<i64>| {
        bytes.map_or("n/a".to_owned(), |b| {
            format!("{:.1}", b as f64 / (1024.0 * 1024.0))
        })
    };
    println!();
    println!(
        "S9 soak: jobs × {} back to back, retention {}, partitions of {}",
        soak.tasks_per_job, soak.retention, soak.partition_span
    );
    println!(
        "  {:>4} {:>7} {:>8} {:>12} {:>10} {:>9} {:>6} {:>9}",
        "job", "at s", "tasks/s", "database MiB", "tasks MiB", "jobs MiB", "parts", "free MiB"
    );
    for (n, job) in soak.jobs.iter().enumerate() {
        let sizes = &job.sizes;
        println!(
            "  {:>4} {:>7.0} {:>8.0} {:>12} {:>10} {:>9} {:>6} {:>9}",
            n + 1,
            job.at_s,
            job.tasks_per_s,
            mib(Some(sizes.database_bytes)),
            mib(sizes.tasks_bytes),
            mib(sizes.jobs_bytes),
            sizes.partitions.map_or("n/a".to_owned(), |p| p.to_string()),
            mib(sizes.free_bytes),
        );
    }
    println!(
        "goal S9 last job's rate ÷ first's ≥ 0.90:  {}",
        opt(soak.last_to_first(), 2)
    );
    println!(
        "goal S9 database size, largest of the second half ÷ first half ≤ 1.10:  {}",
        opt(soak.second_half_growth(), 2)
    );
}

fn print_waiting(waiting: &WaitingResult) {
    let cpu = &waiting.idle_cpu_percent;
    println!();
    println!(
        "S11 scheduled jobs: {} single-task jobs an hour ahead, stored in {:.1} s",
        waiting.waiting_jobs, waiting.stored_s
    );
    println!(
        "  while they wait ({:.0} s): CPU % of a core  PostgreSQL {:.2}  RabbitMQ {:.2}  worker {:.2}",
        waiting.idle_s, cpu.postgres, cpu.rabbitmq, cpu.workers
    );
    println!(
        "  rows: their tasks {}, job_requests {}; broker messages {}; database {:.1} MiB",
        waiting.task_rows,
        waiting.request_rows,
        waiting.broker_messages,
        waiting.sizes.database_bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  {} jobs due among them: running p50/p99/max {:.0}/{:.0}/{:.0} ms after run_at; ended p50/p99 {:.0}/{:.0} ms{}",
        waiting.due_jobs,
        waiting.start_late_ms_p50,
        waiting.start_late_ms_p99,
        waiting.start_late_ms_max,
        waiting.event_late_ms_p50,
        waiting.event_late_ms_p99,
        if waiting.all_done { "" } else { "  (not every job done!)" }
    );
}
