//! CPU time by process, from `/proc`: where a scenario's work went (PostgreSQL,
//! RabbitMQ, the worker processes), for the machine's own services only when they run
//! here.

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// CPU seconds used so far.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuSeconds {
    /// Every `postgres` process, with the backends that exited (the postmaster's
    /// children's time).
    pub postgres: f64,
    /// RabbitMQ's Erlang VM (`beam.smp`).
    pub rabbitmq: f64,
    /// The scenario's worker processes.
    pub workers: f64,
}

impl CpuSeconds {
    /// The machine's services now, and the given worker processes.
    pub fn now(workers: &[u32]) -> Self {
        let mut seconds = Self::default();
        for (pid, name, ticks) in processes() {
            match name.as_str() {
                "postgres" => seconds.postgres += ticks,
                "beam.smp" => seconds.rabbitmq += ticks,
                _ if workers.contains(&pid) => seconds.workers += ticks,
                _ => {}
            }
        }
        seconds
    }

    /// What was used between `before` and `self`, per 100,000 tasks.
    pub fn per_100k_tasks(self, before: Self, tasks: usize) -> Self {
        self.scaled_since(before, 100_000.0 / tasks.max(1) as f64)
    }

    /// What was used between `before` and `self`, in milliseconds per job.
    pub fn ms_per_job(self, before: Self, jobs: usize) -> Self {
        self.scaled_since(before, 1_000.0 / jobs.max(1) as f64)
    }

    /// What was used between `before` and `self`, over `seconds`, in percent of one
    /// core.
    pub fn percent_since(self, before: Self, seconds: f64) -> Self {
        self.scaled_since(before, 100.0 / seconds.max(f64::EPSILON))
    }

    fn scaled_since(self, before: Self, scale: f64) -> Self {
        Self {
            postgres: (self.postgres - before.postgres) * scale,
            rabbitmq: (self.rabbitmq - before.rabbitmq) * scale,
            workers: (self.workers - before.workers) * scale,
        }
    }
}

/// Every process's pid, name and CPU seconds (its own and its reaped children's).
fn processes() -> Vec<(u32, String, f64)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (name) state ppid ...`: the name may hold spaces, so split at the
            // last parenthesis.
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime, stime, cutime, cstime are fields 14-17 of the line, 12-15 here.
            let ticks: f64 = fields
                .get(11..15)?
                .iter()
                .filter_map(|field| field.parse::<f64>().ok())
                .sum();
            Some((pid, name, ticks / TICKS_PER_S))
        })
        .collect()
}
