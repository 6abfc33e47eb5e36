//! Retention: which ended jobs leave, and the paced loop that removes them in short
//! steps, under the cleaner role and `taskmill prune` alike.
//!
//! A job leaves with every row of its own (tasks, parts, its event) once it has ended
//! and its event has been delivered, and it is older than the retention of the stage
//! it ended in ([`crate::config::Retention`]). The steps are [`Store`]'s: each one a
//! short transaction. Between steps the loop rests as long as the step took, so that
//! removal takes at most about half of the database's write time, however much is
//! due: on SQLite, whose one writer every claim and finish waits for, above all.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::state::JobStage;
use crate::store::{RemovalRule, Removed, Store, StoreError};

/// Task rows deleted per transaction, at most: a step holds SQLite's writer lock, or
/// PostgreSQL's row locks on the job's rows, for a few milliseconds.
pub const TASK_BATCH: u64 = 1_000;

/// The jobs a pod's retention lets go at `now`: those ended `done` or `cancelled`
/// before `now - retention.ended`, and `failed` before `now - retention.failed`.
///
/// On PostgreSQL the tasks of the jobs created in one `span` share a partition, and
/// they leave with it: a partition goes once it ended `retention.ended` ago and every
/// job of its span may leave (or has ended and is kept longer: its tasks are set
/// aside; one it lets go within a span holds the partition instead). From a held
/// partition jobs leave one by one, each once it was created two spans before the
/// cut-off: by then its partition has ended a span before the cut-off, and nothing
/// that would let it go whole within the hold window is left, so a job never goes row
/// by row from a partition about to be dropped.
pub fn rule(retention: &Retention, span: Duration, now: DateTime<Utc>) -> RemovalRule {
    let mut rule = RemovalRule::none();
    if let Some(kept) = retention.failed {
        rule = rule.with(JobStage::Failed, crate::clock::before(now, kept));
    }
    if let Some(kept) = retention.ended {
        let cut_off = crate::clock::before(now, kept);
        rule = rule
            .with(JobStage::Done, cut_off)
            .with(JobStage::Cancelled, cut_off)
            .by_partition(cut_off, Some(crate::clock::before(cut_off, span * 2)))
            .holding_within(chrono::Duration::from_std(span).unwrap_or(chrono::Duration::MAX));
    }
    rule
}

/// The jobs that ended in one of `stages` (every ended stage when empty) more than
/// `age` before `now`: what `taskmill prune --older-than` removes. With every stage,
/// whole partitions of the tasks table go too, where they can.
pub fn older_than(age: Duration, stages: &[JobStage], now: DateTime<Utc>) -> RemovalRule {
    let cut_off = crate::clock::before(now, age);
    let every = [JobStage::Done, JobStage::Failed, JobStage::Cancelled];
    let rule = stages.iter().fold(RemovalRule::none(), |rule, stage| {
        rule.with(*stage, cut_off)
    });
    if stages.is_empty() {
        every
            .iter()
            .fold(rule, |rule, stage| rule.with(*stage, cut_off))
            .by_partition(cut_off, None)
    } else {
        rule
    }
}

/// Removes what `rule` lets go, step after paced step, until nothing is left, `budget`
/// has been spent (the rest is left for the next run), or `stop` is cancelled.
/// Returns what it removed; a removal cut off between steps is carried on by the
/// next run, whoever makes it.
pub async fn remove(
    store: &Store,
    rule: &RemovalRule,
    budget: Duration,
    stop: &CancellationToken,
) -> Result<Removed, StoreError> {
    let started = Instant::now();
    let mut total = Removed::default();
    let mut last_report = Instant::now();
    loop {
        let step_started = Instant::now();
        let step = tokio::select! {
            _ = stop.cancelled() => return Ok(total),
            step = store.remove_ended_step(rule, TASK_BATCH) => step?,
        };
        let Some(removed) = step else {
            return Ok(total);
        };
        crate::metrics::removed(removed.jobs, removed.tasks);
        total.add(removed);
        if started.elapsed() >= budget {
            tracing::info!(
                ?total,
                "retention removal paused for its budget; the next run carries on"
            );
            return Ok(total);
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            tracing::info!(?total, "retention removal under way");
            last_report = Instant::now();
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(total),
            _ = tokio::time::sleep(step_started.elapsed()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held partition's jobs go one by one from two spans before the cut-off: at one
    /// span they went row by row while their partition waited seconds for a job that
    /// ended late in the span, about to let it go whole.
    #[test]
    fn jobs_of_a_held_partition_go_one_by_one_from_two_spans_before_the_cut_off() {
        let now = "2026-12-06T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let (day, hour) = (Duration::from_secs(86_400), Duration::from_secs(3_600));
        let retention = Retention {
            ended: Some(day),
            failed: None,
        };
        let cut_off = now - chrono::Duration::days(1);
        let expected = RemovalRule::none()
            .with(JobStage::Done, cut_off)
            .with(JobStage::Cancelled, cut_off)
            .by_partition(cut_off, Some(cut_off - chrono::Duration::hours(2)))
            .holding_within(chrono::Duration::hours(1));
        assert_eq!(rule(&retention, hour, now), expected);
    }
}
