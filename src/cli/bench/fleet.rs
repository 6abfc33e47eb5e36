//! Worker processes for a scenario: this very binary, `taskmill worker`.

use std::process::Stdio;
use std::time::Duration;

use crate::Config;
use tokio::process::{Child, Command};

pub struct Fleet {
    children: Vec<Child>,
}

impl Fleet {
    /// `workers` processes with the configuration's concurrency and prefetch.
    pub fn spawn(config: &Config, workers: usize) -> anyhow::Result<Self> {
        Self::spawn_with(config, workers, &[])
    }

    /// [`Self::spawn`] with more environment variables.
    pub fn spawn_with(
        config: &Config,
        workers: usize,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for _ in 0..workers {
            children.push(
                Command::new(&exe)
                    .args([
                        "worker",
                        "--no-migrate",
                        "--concurrency",
                        &config.concurrency.to_string(),
                        "--prefetch",
                        &config.prefetch.to_string(),
                    ])
                    .env("AMQP_URL", &config.amqp_url)
                    .env("DATABASE_URL", &config.database_url)
                    .env("TASKMILL_PREFIX", &config.prefix)
                    .env("RUST_LOG", "warn")
                    // Several pods on one host: each serves its endpoint on a free port.
                    .env("TASKMILL_HTTP_ADDR", "127.0.0.1:0")
                    .envs(vars.iter().copied())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()?,
            );
        }
        Ok(Self { children })
    }

    /// The worker processes' ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// The largest resident set any worker reached so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        self.children
            .iter()
            .filter_map(|child| child.id())
            .filter_map(peak_rss_mib_of)
            .reduce(f64::max)
    }

    pub async fn stop(mut self) {
        for child in &mut self.children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(40), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// The largest resident set process `pid` reached so far (VmHWM), in MiB.
pub fn peak_rss_mib_of(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()?;
    Some(kib / 1024.0)
}
