//! Feeding: a large job's task messages published at the pace its pool takes them.
//!
//! The intake stores a large job's task rows, and the completion role a multi-stage
//! job's next phase, and leave their messages to a feeder,
//! which holds a lease on the job (`feed:<job id>` in the leases table) and keeps the
//! pool's work queue at most [`FEED_DEPTH`] ready messages deep: it tops the queue up
//! whenever [`FEED_CHUNK`] or more have been taken, reading the next tasks from the
//! store in ordinal order. Workers start on the first rows while the rest are still
//! being inserted; the broker never holds a 100,000-message backlog (a message that
//! waits in a deep queue costs it about half again what one passing through does);
//! and several jobs of one pool interleave instead of queueing behind each other.
//!
//! The request is acked once the rows are stored and the job runs: from then on the
//! lease is what makes the feeding survive a crash. Each confirmed top-up is recorded
//! on the job (`fed_through`), so a later feeder starts where the last one stopped.
//!
//! A job that waits costs next to nothing: a feeder looking at a full queue, or at a
//! forming job whose next rows have not come, backs off (to [`FULL_POLL_MAX`] and
//! [`FORMING_POLL_MAX`]); and the feeder of a job in parts that receives no new row
//! for [`REST_AFTER`] rests — it ends and gives up its lease — until the next part's
//! request (or the seal that starts the job) starts a feeder again. A request for a
//! job this pod already feeds wakes that feeder instead. Every pod running the intake looks
//! every [`ORPHAN_SCAN`] for running jobs whose messages are not all published and no
//! live feeder holds, and feeds them. A takeover publishes again the messages that
//! were waiting in the queue, at most a queue's depth: the claim's compare-and-set
//! makes such a copy a no-op.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::shared::Shared;
use crate::amqp::broker::{all_confirmed, close_channel, Publisher};
use crate::clock;
use crate::error::Error;
use crate::messages;
use crate::protocol::{TaskMessage, FIRST_ATTEMPT};
use crate::state::{JobStage, TaskStatus};
use crate::store::{job, task};

/// Ready messages a feeder keeps in its pool's work queue at most: enough for every
/// worker's prefetch to refill between two looks at the queue.
pub const FEED_DEPTH: u32 = 2_048;
/// A feeder publishes once at least this many messages have left the queue, so that
/// each top-up is one page read and one round of confirms.
const FEED_CHUNK: u32 = 512;
/// How soon a feeder looks again at a full queue, or at the store while the job's
/// rows are still being inserted; doubled while nothing moves, up to the limits below.
const POLL: Duration = Duration::from_millis(20);
/// The longest a feeder waits between looks at a full queue: the queue's depth lasts
/// its workers far longer than that.
const FULL_POLL_MAX: Duration = Duration::from_millis(200);
/// The longest a feeder waits between looks at a forming job whose next rows have not
/// come (a request of this pod that stores rows wakes it at once).
const FORMING_POLL_MAX: Duration = Duration::from_secs(1);
/// A feeder of a forming job that finds no new row for this long rests.
const REST_AFTER: Duration = Duration::from_secs(3);
/// A feeder's lease on its job; renewed at a third of it.
const FEED_LEASE: Duration = Duration::from_secs(10);
/// How often a pod looks for jobs whose feeder stopped.
const ORPHAN_SCAN: Duration = Duration::from_secs(5);
/// A job is looked at by the orphan scan only this long after it started, so that a
/// group of small jobs is not fed while its own former publishes it.
const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// The pod's feeders: one task per job being fed, and the scan for orphaned jobs. Both
/// stop when `stop` is cancelled, giving up their leases.
#[derive(Clone)]
pub(crate) struct Feeder {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    publisher: Publisher,
    holder: String,
    /// Jobs this pod feeds now, so that a job handed over twice is fed once, and the
    /// feeder is woken instead.
    feeding: Mutex<HashMap<String, Arc<Wake>>>,
    stop: CancellationToken,
    /// The feeds and the scan, so that a stop can wait for them.
    tasks: TaskTracker,
}

/// How a job's feeder in this pod hears that the job was handed over again (a part of
/// it stored, say): a notice that cuts its wait short, and a flag that stops it from
/// resting.
#[derive(Default)]
struct Wake {
    notify: Notify,
    again: AtomicBool,
}

/// Whether a feeder waits for another holder's lease to expire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// The intake hands over a job it is storing: its last feeder may have crashed.
    Wait,
    /// The orphan scan found the job: a live lease means a live feeder.
    TryOnce,
}

impl Feeder {
    /// A pod's feeders, publishing on `publisher` until `stop`.
    pub fn new(shared: Arc<Shared>, publisher: Publisher, stop: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                shared,
                publisher,
                holder: uuid::Uuid::new_v4().to_string(),
                feeding: Mutex::default(),
                stop,
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Starts looking for jobs nobody feeds, every [`ORPHAN_SCAN`]: the intake's
    /// feeders do (every deployment runs an intake).
    pub fn scan_for_orphans(&self) {
        self.inner.tasks.spawn(self.clone().scan());
    }

    /// Stops every feed and the scan, and waits until their leases are given up and
    /// their channels closed: before the connection closes under them.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Feeds `job_id` from this pod from now on (once its lease is free): a job whose
    /// rows the intake is storing, or a running one whose messages are not all out.
    pub fn feed(&self, job_id: &str) {
        self.spawn(job_id, Patience::Wait);
    }

    fn spawn(&self, job_id: &str, patience: Patience) {
        let wake = {
            let mut feeding = self.inner.feeding.lock().unwrap();
            if let Some(wake) = feeding.get(job_id) {
                wake.again.store(true, Ordering::SeqCst);
                wake.notify.notify_one();
                return;
            }
            let wake = Arc::new(Wake::default());
            feeding.insert(job_id.to_owned(), wake.clone());
            wake
        };
        let (inner, job_id) = (self.inner.clone(), job_id.to_owned());
        self.inner.tasks.spawn(async move {
            let lease = format!("feed:{job_id}");
            let mut patience = patience;
            loop {
                if let Err(err) = inner.feed(&job_id, &lease, patience, &wake).await {
                    tracing::warn!(%job_id, %err, "feeding stopped; a feeder will carry on");
                }
                if let Err(err) = inner
                    .shared
                    .store
                    .release_lease(&lease, &inner.holder)
                    .await
                {
                    tracing::debug!(%job_id, %err, "feed lease not released; it expires");
                }
                if inner.forget(&job_id, &wake) {
                    return;
                }
                patience = Patience::Wait;
            }
        });
    }

    async fn scan(self) {
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tokio::time::sleep(ORPHAN_SCAN) => {}
            }
            match self
                .inner
                .shared
                .store
                .unfed_jobs(clock::ago(ORPHAN_GRACE))
                .await
            {
                Ok(jobs) => {
                    for job_id in jobs {
                        self.spawn(&job_id, Patience::TryOnce);
                    }
                }
                Err(err) => tracing::warn!(%err, "could not look for unfed jobs"),
            }
        }
    }
}

impl Inner {
    /// Takes `job_id` off this pod's list if `wake` is still its entry (a feeder that
    /// rested took it off already, and a new one may be there), and says so; or, if the
    /// job was handed to this feeder again since it last looked, keeps it and says the
    /// feeder must feed again. That request found the entry and only woke the feeder —
    /// a multi-stage job's next phase, asked for while the feeder of the last one was
    /// finishing — and would otherwise wait for the orphan scan.
    fn forget(&self, job_id: &str, wake: &Arc<Wake>) -> bool {
        let mut feeding = self.feeding.lock().unwrap();
        if wake.again.swap(false, Ordering::SeqCst) {
            return false;
        }
        if feeding
            .get(job_id)
            .is_some_and(|entry| Arc::ptr_eq(entry, wake))
        {
            feeding.remove(job_id);
        }
        true
    }

    /// Whether the feeder of `job_id` may rest: not if it was handed the job again
    /// since it last looked. Decided under the list's lock, so a request that comes
    /// after it either wakes this feeder or, once it is off the list, starts a new one.
    fn may_rest(&self, job_id: &str, wake: &Arc<Wake>) -> bool {
        let mut feeding = self.feeding.lock().unwrap();
        if wake.again.swap(false, Ordering::SeqCst) {
            return false;
        }
        if feeding
            .get(job_id)
            .is_some_and(|entry| Arc::ptr_eq(entry, wake))
        {
            feeding.remove(job_id);
        }
        true
    }

    /// Holds the job's lease and publishes its tasks in ordinal order, each top-up
    /// confirmed before the next, until every task has been published once; then marks
    /// the job's tasks published. Returns early, leaving the rest to another feeder,
    /// when the job ends or stops forming, the lease is lost, or the pod stops.
    async fn feed(
        &self,
        job_id: &str,
        lease: &str,
        patience: Patience,
        wake: &Arc<Wake>,
    ) -> Result<(), Error> {
        let store = &self.shared.store;
        while !store.acquire_lease(lease, &self.holder, FEED_LEASE).await? {
            if patience == Patience::TryOnce {
                return Ok(());
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(FEED_LEASE / 4) => {}
            }
            if store
                .job(job_id)
                .await?
                .and_then(|job| forming(&job))
                .is_none()
            {
                return Ok(());
            }
        }
        // Passive declares get a channel of their own: on a deleted queue the broker
        // closes it, and the publisher's must stay up.
        let looks = self.publisher.connection().create_channel().await?;
        let fed = self.feed_leased(job_id, lease, &looks, wake).await;
        close_channel(&looks).await;
        fed
    }

    async fn feed_leased(
        &self,
        job_id: &str,
        lease: &str,
        looks: &lapin::Channel,
        wake: &Arc<Wake>,
    ) -> Result<(), Error> {
        let store = &self.shared.store;
        let mut renewed = Instant::now();
        let mut wait = POLL;
        let mut last_row = Instant::now();
        // The last ordinal fed; set from the job's first read: a later phase of a
        // multi-stage job starts past the earlier phases' tasks.
        let mut after: Option<i32> = None;
        let mut pool: Option<String> = None;
        loop {
            if renewed.elapsed() >= FEED_LEASE / 3 {
                if !store.acquire_lease(lease, &self.holder, FEED_LEASE).await? {
                    tracing::warn!(%job_id, "feed lease lost; leaving the job to its new feeder");
                    return Ok(());
                }
                renewed = Instant::now();
            }
            let room = match &pool {
                Some(pool) => FEED_DEPTH
                    .saturating_sub(self.shared.topology.ready_messages(looks, pool).await?),
                None => FEED_DEPTH,
            };
            // While the job forms: whether this look found no new row. None: the
            // queue was full.
            let mut waiting_for_rows = None;
            if room >= FEED_CHUNK {
                let Some(job) = store.job(job_id).await? else {
                    return Ok(());
                };
                let Some(forming) = forming(&job) else {
                    return Ok(());
                };
                pool = Some(job.queue.clone());
                let after =
                    after.get_or_insert((job.phase_first_ordinal - 1).max(job.fed_through) as i32);
                let through = after.saturating_add(room as i32);
                let page = store.feed_page(job_id, *after, through, forming).await?;
                let fed = match forming {
                    true => &page[..stored_run(page.iter().map(|task| task.ordinal), *after)],
                    false => &page[..],
                };
                self.publish(&job, fed).await?;
                if !forming {
                    *after = through;
                    let last = job.task_count - 1;
                    let through = i64::from(through).min(last);
                    store
                        .record_fed(job_id, job.phase_first_ordinal, through)
                        .await?;
                    if through >= last {
                        store
                            .mark_tasks_published(
                                std::slice::from_ref(&job.id),
                                job.phase_first_ordinal,
                                job.run,
                            )
                            .await?;
                        tracing::info!(%job_id, tasks = job.task_count, pool = %job.queue, "job fed");
                        return Ok(());
                    }
                    wait = POLL;
                    continue;
                }
                if let Some(last) = fed.last() {
                    *after = last.ordinal;
                    store
                        .record_fed(job_id, job.phase_first_ordinal, i64::from(last.ordinal))
                        .await?;
                    last_row = Instant::now();
                    wait = POLL;
                }
                if fed.len() == room as usize {
                    continue;
                }
                waiting_for_rows = Some(fed.is_empty());
            }
            let limit = match waiting_for_rows {
                None => FULL_POLL_MAX,
                Some(_) => FORMING_POLL_MAX,
            };
            if waiting_for_rows == Some(true)
                && last_row.elapsed() >= REST_AFTER
                && self.may_rest(job_id, wake)
            {
                tracing::debug!(%job_id, "no new rows; the feeder rests until the next part");
                return Ok(());
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => wait = (wait * 2).min(limit),
                _ = wake.notify.notified() => {
                    wake.again.store(false, Ordering::SeqCst);
                    (wait, last_row) = (POLL, Instant::now());
                }
            }
        }
    }

    /// Publishes attempt 1 of every task in `tasks` never claimed, confirms pipelined.
    async fn publish(&self, job: &job::Model, tasks: &[task::Model]) -> Result<(), Error> {
        let settings = messages::settings_of(job);
        let mut pending = Vec::with_capacity(tasks.len());
        for task in tasks.iter().filter(|task| never_claimed(task)) {
            let message = TaskMessage::new(
                settings,
                task.id,
                &task.task_type,
                &task.payload,
                FIRST_ATTEMPT,
            );
            pending.push(
                messages::send_task(&self.publisher, &self.shared.topology, &job.queue, &message)
                    .await?,
            );
        }
        Ok(all_confirmed(pending).await?)
    }
}

/// Whether the job is still forming (`Some(true)`), running with messages to publish
/// (`Some(false)`), or needs no feeder (`None`).
fn forming(job: &job::Model) -> Option<bool> {
    match job.stage.parse::<JobStage>() {
        Ok(JobStage::Formation) => Some(true),
        Ok(JobStage::Running) if !job.tasks_published => Some(false),
        _ => None,
    }
}

/// How many of `ordinals` follow `after` without a gap. While a job forms, a gap is a
/// row not committed yet: feeding stops there until it is.
fn stored_run(ordinals: impl IntoIterator<Item = i32>, after: i32) -> usize {
    ordinals
        .into_iter()
        .zip(after + 1..)
        .take_while(|(ordinal, expected)| ordinal == expected)
        .count()
}

fn never_claimed(task: &task::Model) -> bool {
    task.status == TaskStatus::Pending.as_str() && task.attempts == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeding_a_forming_job_stops_at_the_first_row_not_stored() {
        assert_eq!(stored_run([3, 4, 5, 7, 8], 2), 3);
        assert_eq!(stored_run([3, 4, 5, 7, 8], 1), 0, "ordinal 2 is missing");
        assert_eq!(stored_run([], 1), 0);
    }
}
