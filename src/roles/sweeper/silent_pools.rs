//! The pools sweep: running jobs whose pool no pod has consumed for
//! [`crate::known_pools::SILENT_AFTER`] are warned of, once per pool every
//! [`SILENT_POOL_WARNING_EVERY`].

use std::time::Duration;

use chrono::Utc;

use crate::error::Error;

use super::Sweeper;

/// How often a pool with waiting jobs and no consumer is warned about again.
const SILENT_POOL_WARNING_EVERY: Duration = Duration::from_secs(300);

impl Sweeper {
    /// Running jobs whose pool nobody consumes would wait without a word: say so,
    /// once per pool every [`SILENT_POOL_WARNING_EVERY`].
    pub(super) async fn warn_of_silent_pools(&self) -> Result<(), Error> {
        let now = Utc::now();
        let silent = self
            .shared
            .store
            .silent_pools(crate::known_pools::silent_since(now))
            .await?;
        let mut warned = self.warned_pools.lock().expect("warned pools lock");
        warned.retain(|pool, _| silent.iter().any(|s| &s.name == pool));
        for pool in silent {
            let due = warned
                .get(&pool.name)
                .is_none_or(|at| at.elapsed() >= SILENT_POOL_WARNING_EVERY);
            if due {
                tracing::warn!(
                    pool = %pool.name,
                    running_jobs = pool.running_jobs,
                    "jobs are waiting on a pool nobody serves: {}",
                    crate::known_pools::describe_silence(&pool.name, pool.last_seen_at, now)
                );
                warned.insert(pool.name, std::time::Instant::now());
            }
        }
        Ok(())
    }
}
