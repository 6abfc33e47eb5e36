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

use super::shared::Shared;
use crate::error::Error;

const LEASE_NAME: &str = "cleaner";

pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) -> Result<(), Error> {
    let config = &shared.config;
    let interval = config.clean_interval;
    let holder = uuid::Uuid::new_v4().to_string();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(?interval, retention = ?config.retention, "cleaner running");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = chrono::Utc::now();
        let span = config.partition_span;
        let rule = crate::retention::rule(&config.retention, span, now);
        match shared
            .store
            .acquire_lease(LEASE_NAME, &holder, interval * 3)
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                tracing::warn!(%err, "cleaner lease unavailable; skipping this run");
                continue;
            }
        }
        // The partitions jobs created until two spans from now will need.
        match shared.store.make_partitions(span, now + span * 2).await {
            Ok(0) => {}
            Ok(made) => tracing::info!(made, "task partitions made ahead"),
            Err(err) => tracing::warn!(%err, "task partitions not made; the next run retries"),
        }
        if rule.is_empty() {
            continue;
        }
        match crate::retention::remove(&shared.store, &rule, interval, &shutdown).await {
            Ok(removed) if removed.is_empty() => tracing::debug!("nothing past its retention"),
            Ok(removed) => tracing::info!(
                jobs = removed.jobs,
                tasks = removed.tasks,
                "removed ended jobs past their retention"
            ),
            Err(err) => tracing::warn!(%err, "retention removal failed; the next run retries"),
        }
    }
    super::shared::hand_lease_on(&shared.store, LEASE_NAME, &holder).await;
    Ok(())
}
