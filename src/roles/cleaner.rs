//! The cleaner: every `clean_interval`, the one pod holding the `cleaner` lease makes
//! the task partitions the next two spans need (on PostgreSQL) and removes the ended
//! jobs past their retention ([`crate::retention`]). It runs in the sweeper's pods
//! and touches only the database.
//!
//! A run spends at most one interval removing, so that it stays well inside its
//! lease (three intervals) however much is due; what is left waits for the next run.
//! Stopped half-way (shutdown, kill -9), it leaves whole jobs, or one job marked for
//! removal that the next run finishes.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::periodic::{self, Cadence, Pace, Periodic};
use super::shared::Shared;
use crate::error::Error;

pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) -> Result<(), Error> {
    let config = &shared.config;
    let interval = config.clean_interval;
    let cadence = Cadence {
        lease: "cleaner",
        lease_for: interval * 3,
        renew_every: interval,
        period: interval,
        failure_wait_max: interval,
    };
    tracing::info!(?interval, retention = ?config.retention, "cleaner running");
    let store = shared.store.clone();
    periodic::run(&store, cadence, &mut Cleaner { shared }, &shutdown).await
}

struct Cleaner {
    shared: Arc<Shared>,
}

impl Periodic for Cleaner {
    fn name(&self) -> &'static str {
        "cleaner"
    }

    /// Makes the partitions ahead and removes what is past its retention. Each step
    /// logs its own failure and leaves it to the next pass, so a failure here never
    /// counts as the pass's.
    async fn pass(&mut self, holding: &CancellationToken) -> Result<Pace, Error> {
        let (config, store) = (&self.shared.config, &self.shared.store);
        let now = chrono::Utc::now();
        let span = config.partition_span;
        // The partitions jobs created until two spans from now will need.
        match store.make_partitions(span, now + span * 2).await {
            Ok(0) => {}
            Ok(made) => tracing::info!(made, "task partitions made ahead"),
            Err(err) => tracing::warn!(%err, "task partitions not made; the next run retries"),
        }
        let rule = crate::retention::rule(&config.retention, span, now);
        if rule.is_empty() {
            return Ok(Pace::Idle);
        }
        match crate::retention::remove(store, &rule, config.clean_interval, holding).await {
            Ok(removed) if removed.is_empty() => tracing::debug!("nothing past its retention"),
            Ok(removed) => tracing::info!(
                jobs = removed.jobs,
                tasks = removed.tasks,
                "removed ended jobs past their retention"
            ),
            Err(err) => tracing::warn!(%err, "retention removal failed; the next run retries"),
        }
        Ok(Pace::Idle)
    }
}
