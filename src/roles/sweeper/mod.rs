//! The sweeper: the safety net for work that should be moving but is not.
//!
//! Every `sweep_interval`, the one pod holding the
//! `sweeper` lease scans the tasks table in `sweeper_shards` shards (task id modulo)
//! in parallel, 1,000 keys at a time, for tasks that have not changed for
//! `stuck_after`:
//!
//! - pending: the task message was lost (a crash between commit and publish, an
//!   operator's purge): publish it again — but only for pools whose work queue is
//!   empty, since a task in a backlog is waiting, not lost, and re-publishing a backlog
//!   would double it; and only for jobs whose messages were all published once (the
//!   rest are their feeder's, see the intake);
//! - retrying, with its wait long over: its retry was lost on the way through the
//!   delay ladder: publish it again, backlog or not;
//! - running past its lease: the worker died and the message did not come back:
//!   publish the same attempt again (the claim takes over an expired lease);
//!
//! and for running jobs whose counters say they are over but that stayed quiet for
//! `stuck_after` (their finished event was lost), it runs the completion check itself.
//!
//! Each re-publish first bumps the task's version with a compare-and-set (transactions
//! of at most 25 rows), so a task that moved since it was read is left alone, and a
//! swept task is not swept again for `stuck_after`. Duplicates the sweeper causes are
//! harmless: every transition is conditional. It also fails jobs stuck in formation and
//! warns of running jobs whose pool no pod has consumed for
//! [`crate::known_pools::SILENT_AFTER`]. (Events whose publisher died are the completion
//! role's: its outbox relay publishes them.)

mod silent_pools;
mod tasks;

use std::collections::HashMap;
use std::sync::Arc;

use lapin::Connection;
use tokio_util::sync::CancellationToken;

use super::periodic::{self, Cadence, Pace, Periodic};
use super::shared::Shared;
use crate::amqp::broker::Publisher;
use crate::clock;
use crate::error::Error;
use crate::messages::events::EventPublisher;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub republished: usize,
    pub taken_over: usize,
    pub jobs_checked: usize,
    pub formations_failed: usize,
}

impl SweepReport {
    fn add(&mut self, other: SweepReport) {
        self.republished += other.republished;
        self.taken_over += other.taken_over;
        self.jobs_checked += other.jobs_checked;
        self.formations_failed += other.formations_failed;
    }

    fn count(&self) {
        crate::metrics::sweeper_did("republished", self.republished);
        crate::metrics::sweeper_did("taken_over", self.taken_over);
        crate::metrics::sweeper_did("formations_failed", self.formations_failed);
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let publisher = Publisher::open(&connection).await?;
    let interval = shared.config.sweep_interval;
    // The lease outlives a few missed sweeps, so one slow sweep does not let a second
    // sweeper start beside it.
    let cadence = Cadence {
        lease: "sweeper",
        lease_for: interval * 3,
        renew_every: interval,
        period: interval,
        failure_wait_max: interval,
    };
    let mut sweeper = Sweeper {
        events: EventPublisher::new(
            publisher.clone(),
            shared.topology.clone(),
            shared.store.clone(),
        ),
        shared,
        connection,
        publisher,
        warned_pools: Default::default(),
    };
    tracing::info!(?interval, "sweeper running");
    let store = sweeper.shared.store.clone();
    let stopped = periodic::run(&store, cadence, &mut sweeper, &shutdown).await;
    sweeper.events.close().await;
    sweeper.publisher.close().await;
    stopped
}

impl Periodic for Sweeper {
    fn name(&self) -> &'static str {
        "sweeper"
    }

    /// One sweep, counted. A sweep only re-sends what its compare-and-sets claimed:
    /// dropped half-way at shutdown, it leaves nothing inconsistent, and the next
    /// sweeper carries on.
    async fn pass(&mut self, _holding: &CancellationToken) -> Result<Pace, Error> {
        let report = self.sweep().await?;
        if report.is_empty() {
            tracing::debug!("sweep found nothing stuck");
        } else {
            report.count();
            tracing::info!(?report, "sweep moved stuck work");
        }
        Ok(Pace::Idle)
    }
}

struct Sweeper {
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    publisher: Publisher,
    events: EventPublisher,
    warned_pools: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

impl Sweeper {
    /// One full sweep: every shard in parallel, then quiet jobs, formations and pools.
    async fn sweep(&self) -> Result<SweepReport, Error> {
        let config = &self.shared.config;
        let shards = config.sweeper_shards;
        let idle_pools = self.idle_pools().await?;
        let reports = futures::future::try_join_all(
            (0..shards).map(|shard| self.sweep_shard(shard, shards, &idle_pools)),
        )
        .await?;
        let mut total = SweepReport::default();
        for report in reports {
            total.add(report);
        }
        // A failed check of quiet jobs (the database down, say) must not keep the
        // formation timeouts and pool warnings below from running.
        match self.check_quiet_jobs().await {
            Ok(checked) => total.jobs_checked += checked,
            Err(err) if err.is_broker_connection() => return Err(err),
            Err(err) => tracing::warn!(%err, "check of quiet jobs failed; the next sweep retries"),
        }
        let formation_deadline = clock::ago(config.formation_timeout);
        for job in self
            .shared
            .store
            .stale_formations(formation_deadline)
            .await?
        {
            // One job's lasting error holds back none of the others.
            match self.fail_formation(&job).await {
                Ok(true) => total.formations_failed += 1,
                Ok(false) => {}
                Err(err) if err.is_broker_connection() => return Err(err),
                Err(err) => {
                    tracing::error!(job_id = %job.id, %err, "could not fail a stale formation")
                }
            }
        }
        self.warn_of_silent_pools().await?;
        Ok(total)
    }

    /// Runs the completion check of running jobs that look over but stayed quiet for
    /// `stuck_after` (their finished event was lost); how many it ended or moved on.
    async fn check_quiet_jobs(&self) -> Result<usize, Error> {
        let quiet_since = clock::ago(self.shared.config.stuck_after);
        let due = self.shared.store.jobs_due_for_check(quiet_since).await?;
        // A job moved to its next phase here is fed by an intake's orphan scan.
        let checked = self.shared.store.check_jobs(&due).await?;
        self.events.publish_or_defer(&checked.ended).await;
        self.events.publish_progress(&checked.advanced).await;
        Ok(checked.ended.len() + checked.advanced.len())
    }

    /// Fails a job stuck in formation with why; `false`: it left formation meanwhile.
    async fn fail_formation(&self, job: &crate::store::job::Model) -> Result<bool, Error> {
        let store = &self.shared.store;
        let why = match store.missing_parts(job).await? {
            Some(missing) => missing,
            None => "its request was lost".to_owned(),
        };
        let reason = format!(
            "the job did not finish forming within {:?}: {why}",
            self.shared.config.formation_timeout
        );
        let Some(event) = store.fail_formation(&job.id, &reason).await? else {
            return Ok(false);
        };
        self.events
            .publish_or_defer(std::slice::from_ref(&event))
            .await;
        Ok(true)
    }
}
