//! Periodic jobs fired ([`crate::schedule`]): before each pass, the request relay's
//! holder fires the due ticks of the schedules, so that a tick's request goes out in
//! the same pass.

use chrono::Utc;

use super::Intake;
use crate::error::Error;
use crate::schedule::{Schedule, TICKS_PER_FIRE};
use crate::store::{schedule, Fired};
use crate::transactional::requests_of;

/// Due schedules fired per look at most.
const SCHEDULES_PER_LOOK: u64 = 100;
/// How long a schedule that cannot fire (its row does not parse) waits before the
/// next try, so that it does not hold every look up.
const BROKEN_RETRY: chrono::TimeDelta = chrono::TimeDelta::hours(1);

impl Intake {
    /// Fires the due ticks; how many fired.
    pub(super) async fn fire_due_ticks(&self) -> Result<usize, Error> {
        let now = Utc::now();
        let due = self
            .shared
            .store
            .due_schedules(now, SCHEDULES_PER_LOOK)
            .await?;
        let mut fired = 0;
        for row in due {
            // One schedule that cannot fire must not hold up the others.
            let fire = match Schedule::from_row(&row).and_then(|s| ticks_of(&s, &row, now)) {
                Ok(fire) => fire,
                Err(err) => {
                    tracing::error!(schedule = %row.name, %err, "schedule cannot fire; trying again in an hour");
                    postponed(&row, now)
                }
            };
            let ticks = fire.requests.len();
            if self.shared.store.fire_ticks(&fire).await? && fire.last.is_some() {
                tracing::info!(schedule = %row.name, last = ?fire.last, "schedule fired");
                fired += ticks;
            }
        }
        Ok(fired)
    }
}

/// The next ticks of `schedule` to fire, at most [`TICKS_PER_FIRE`], oldest first.
fn ticks_of(
    schedule: &Schedule,
    row: &schedule::Model,
    now: chrono::DateTime<Utc>,
) -> Result<Fired, Error> {
    let ticks: Vec<_> = schedule
        .due_ticks(row.next_tick, now)
        .into_iter()
        .take(TICKS_PER_FIRE)
        .collect();
    let mut requests = Vec::new();
    for tick in &ticks {
        requests.extend(requests_of(schedule.request_for(*tick))?.1);
    }
    let from = ticks.last().copied().unwrap_or(now);
    // A pattern with no tick left (a date passed) waits as a broken one does.
    let next_tick = schedule.next_after(from).unwrap_or(now + BROKEN_RETRY);
    Ok(Fired {
        name: row.name.clone(),
        expected: row.next_tick,
        last: ticks.last().map(|tick| (*tick, schedule.job_id(*tick))),
        next_tick,
        requests,
    })
}

fn postponed(row: &schedule::Model, now: chrono::DateTime<Utc>) -> Fired {
    Fired {
        name: row.name.clone(),
        expected: row.next_tick,
        last: None,
        next_tick: now + BROKEN_RETRY,
        requests: Vec::new(),
    }
}
