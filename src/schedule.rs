//! Periodic jobs: a [`Schedule`] submits its request on every tick of a cron pattern
//! read in a time zone.
//!
//! Schedules live in the `schedules` table: a pod built with
//! `PodBuilder::schedule` writes its schedules there as it starts, and
//! `taskmill schedule add` writes one from the command line. The intake pod holding the
//! `request-relay` lease fires the due ticks each time it looks at the outbox (every
//! 200 ms): for each, in one transaction, it writes the tick's request to
//! `job_requests` and moves the schedule's `next_tick` on by a compare-and-set on its
//! old value, so a tick fires once however many pods run; and the tick's job id is
//! `<name>:<tick>` (`nightly:20261224T180000Z`), so that even a second fire of one tick
//! would be the same job. The next tick is computed from the tick fired, never from the
//! clock, so a late pass shifts nothing.
//!
//! Ticks missed while no pod ran (or the broker was away) follow the schedule's
//! [`CatchUp`]: `skip` fires only the latest of them, `all` fires each, oldest first,
//! the [`MAX_CATCH_UP`] latest at most.

use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::protocol::{check_id, JobRequest};
use crate::store::NewSchedule;

/// Characters of a schedule's name at most: its jobs' ids add 17.
pub const MAX_NAME_LEN: usize = 96;
/// Missed ticks a schedule with [`CatchUp::All`] fires at most, the latest ones.
pub const MAX_CATCH_UP: usize = 1_000;
/// Ticks fired per transaction at most; the rest of a catch-up follows at the next
/// look.
pub(crate) const TICKS_PER_FIRE: usize = 100;

/// What happens to the ticks a schedule missed while no pod fired it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Only the latest missed tick fires: one job however long the gap.
    #[default]
    Skip,
    /// Every missed tick fires, oldest first ([`MAX_CATCH_UP`] at most, the latest).
    All,
}

impl CatchUp {
    /// Its name in the `schedules` table and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::All => "all",
        }
    }
}

impl FromStr for CatchUp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "skip" => Ok(Self::Skip),
            "all" => Ok(Self::All),
            other => Err(Error::Config(format!(
                "catch-up {other:?} is neither skip nor all"
            ))),
        }
    }
}

/// A periodic job: `request` submitted on every tick of `cron` in `timezone`.
#[derive(Clone, Debug)]
pub struct Schedule {
    name: String,
    cron: Cron,
    timezone: Tz,
    request: JobRequest,
    catch_up: CatchUp,
}

impl Schedule {
    /// A schedule named `name` (1–96 characters of `A-Z a-z 0-9 - _ :`), firing on
    /// `cron` — five fields from the minute, or six from the second — in UTC, missed
    /// ticks skipped. The request's `job_id` and `run_at` are the tick's.
    pub fn new(name: &str, cron: &str, request: JobRequest) -> Result<Self, Error> {
        check_id("schedule name", name)?;
        if name.len() > MAX_NAME_LEN {
            return Err(Error::Config(format!(
                "schedule name {name:?} is longer than {MAX_NAME_LEN} characters"
            )));
        }
        let schedule = Self {
            name: name.to_owned(),
            cron: parse_cron(cron)?,
            timezone: Tz::UTC,
            request,
            catch_up: CatchUp::default(),
        };
        schedule.request_for(Utc::now()).validate()?;
        Ok(schedule)
    }

    /// Reads the pattern in the IANA time zone `timezone` (`Europe/Paris`).
    pub fn timezone(mut self, timezone: &str) -> Result<Self, Error> {
        self.timezone = timezone
            .parse()
            .map_err(|_| Error::Config(format!("unknown time zone {timezone:?}")))?;
        Ok(self)
    }

    /// What happens to ticks missed while no pod ran.
    pub fn catch_up(mut self, catch_up: CatchUp) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Ticks are whole seconds: the search keeps the fraction it starts from.
        let after = after.trunc_subsecs(0).with_timezone(&self.timezone);
        self.cron
            .find_next_occurrence(&after, false)
            .ok()
            .map(|tick| tick.with_timezone(&Utc))
    }

    /// The ticks due at `now` for a schedule whose next tick is `next_tick`, oldest
    /// first: none before `next_tick`, the latest under [`CatchUp::Skip`], up to
    /// [`MAX_CATCH_UP`] of the latest under [`CatchUp::All`]. Walked back from `now`,
    /// so a long gap costs no more than the ticks fired.
    pub(crate) fn due_ticks(
        &self,
        next_tick: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        let most = match self.catch_up {
            CatchUp::Skip => 1,
            CatchUp::All => MAX_CATCH_UP,
        };
        let mut ticks = Vec::new();
        let mut at = now.trunc_subsecs(0).with_timezone(&self.timezone);
        let mut inclusive = true;
        while ticks.len() < most {
            match self.cron.find_previous_occurrence(&at, inclusive) {
                Ok(tick) if tick.with_timezone(&Utc) >= next_tick => {
                    ticks.push(tick.with_timezone(&Utc));
                    at = tick;
                    inclusive = false;
                }
                _ => break,
            }
        }
        ticks.reverse();
        ticks
    }

    /// The id of the job of `tick`: `<name>:<tick in UTC, to the second>`.
    pub fn job_id(&self, tick: DateTime<Utc>) -> String {
        format!("{}:{}", self.name, tick.format("%Y%m%dT%H%M%SZ"))
    }

    /// The request `tick` submits.
    pub(crate) fn request_for(&self, tick: DateTime<Utc>) -> JobRequest {
        let mut request = self.request.clone();
        request.job_id = Some(self.job_id(tick));
        request.run_at = None;
        request
    }

    /// The pattern as given.
    pub fn cron(&self) -> String {
        self.cron.pattern.to_string()
    }

    /// The time zone's name.
    pub fn timezone_name(&self) -> &str {
        self.timezone.name()
    }

    /// What happens to missed ticks.
    pub fn catch_up_policy(&self) -> CatchUp {
        self.catch_up
    }

    /// The request each tick submits, as stored: without `job_id` and `run_at`.
    pub(crate) fn request_json(&self) -> String {
        let mut request = self.request.clone();
        request.job_id = None;
        request.run_at = None;
        serde_json::to_string(&request).expect("a request serializes")
    }

    /// A schedule as the `schedules` table holds it.
    pub(crate) fn from_row(row: &crate::store::schedule::Model) -> Result<Self, Error> {
        let request = serde_json::from_str(&row.request)
            .map_err(|err| Error::Config(format!("schedule {:?}: its request: {err}", row.name)))?;
        Ok(Self::new(&row.name, &row.cron, request)?
            .timezone(&row.timezone)?
            .catch_up(row.catch_up.parse()?))
    }
}

/// `schedule`'s row, starting at its first tick after `now`.
pub fn row_of(schedule: &Schedule, now: DateTime<Utc>) -> Result<NewSchedule, Error> {
    let next_tick = schedule.next_after(now).ok_or_else(|| {
        Error::Config(format!("schedule {:?} has no tick after now", schedule.name))
    })?;
    Ok(NewSchedule {
        name: schedule.name.clone(),
        cron: schedule.cron(),
        timezone: schedule.timezone_name().to_owned(),
        request: schedule.request_json(),
        catch_up: schedule.catch_up.as_str().to_owned(),
        next_tick,
    })
}

/// Five fields from the minute, or six from the second.
fn parse_cron(pattern: &str) -> Result<Cron, Error> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(pattern)
        .map_err(|err| Error::Config(format!("cron pattern {pattern:?}: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn hourly() -> Schedule {
        Schedule::new("hourly", "0 * * * *", JobRequest::new("t", vec![])).unwrap()
    }

    #[test]
    fn a_pattern_is_read_in_its_time_zone() {
        let nine = Schedule::new("nine", "0 9 * * *", JobRequest::new("t", vec![]))
            .unwrap()
            .timezone("Europe/Paris")
            .unwrap();
        let winter = Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, 0).unwrap();
        let summer = Utc.with_ymd_and_hms(2026, 7, 6, 12, 0, 0).unwrap();
        assert_eq!(
            nine.next_after(winter),
            Some(Utc.with_ymd_and_hms(2026, 12, 7, 8, 0, 0).unwrap())
        );
        assert_eq!(
            nine.next_after(summer),
            Some(Utc.with_ymd_and_hms(2026, 7, 7, 7, 0, 0).unwrap())
        );
    }

    #[test]
    fn daylight_saving_changes_fire_each_day_once() {
        let half_past_two = Schedule::new("p", "30 2 * * *", JobRequest::new("t", vec![]))
            .unwrap()
            .timezone("Europe/Paris")
            .unwrap();
        let at = |month, day, hour, minute| {
            Utc.with_ymd_and_hms(2026, month, day, hour, minute, 0)
                .unwrap()
        };
        // 02:30 does not exist on 29 March: it fires at 03:00 CEST instead.
        let spring = half_past_two.next_after(at(3, 28, 12, 0)).unwrap();
        assert_eq!(spring, at(3, 29, 1, 0));
        assert_eq!(half_past_two.next_after(spring), Some(at(3, 30, 0, 30)));
        // 02:30 happens twice on 25 October: it fires at the first.
        let fall = half_past_two.next_after(at(10, 24, 12, 0)).unwrap();
        assert_eq!(fall, at(10, 25, 0, 30));
        assert_eq!(half_past_two.next_after(fall), Some(at(10, 26, 1, 30)));
    }

    #[test]
    fn due_ticks_follow_the_catch_up_policy() {
        let next = Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 0).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 12, 6, 13, 30, 0).unwrap();
        let hour = |h| Utc.with_ymd_and_hms(2026, 12, 6, h, 0, 0).unwrap();
        assert_eq!(hourly().due_ticks(next, now), [hour(13)]);
        let all = hourly().catch_up(CatchUp::All);
        assert_eq!(
            all.due_ticks(next, now),
            [hour(10), hour(11), hour(12), hour(13)]
        );
        assert!(
            all.due_ticks(hour(14), now).is_empty(),
            "nothing before its time"
        );
        // Exactly on a tick: that tick is due.
        assert_eq!(hourly().due_ticks(hour(13), hour(13)), [hour(13)]);
    }

    #[test]
    fn a_long_gap_fires_at_most_the_latest_ticks() {
        let every_second = Schedule::new("s", "* * * * * *", JobRequest::new("t", vec![]))
            .unwrap()
            .catch_up(CatchUp::All);
        let now = Utc.with_ymd_and_hms(2026, 12, 6, 13, 0, 0).unwrap();
        let ticks = every_second.due_ticks(
            now - chrono::TimeDelta::days(30),
            now + chrono::TimeDelta::milliseconds(600),
        );
        assert_eq!(ticks.len(), MAX_CATCH_UP);
        assert_eq!(ticks.last(), Some(&now), "whole seconds");
        assert_eq!(
            every_second.next_after(now + chrono::TimeDelta::milliseconds(600)),
            Some(now + chrono::TimeDelta::seconds(1))
        );
    }

    #[test]
    fn a_ticks_job_id_names_the_schedule_and_the_tick() {
        let tick = Utc.with_ymd_and_hms(2026, 12, 24, 18, 0, 0).unwrap();
        assert_eq!(hourly().job_id(tick), "hourly:20261224T180000Z");
        assert!(check_id("job_id", &"n".repeat(MAX_NAME_LEN)).is_ok());
        let longest = Schedule::new(
            &"n".repeat(MAX_NAME_LEN),
            "0 * * * *",
            JobRequest::new("t", vec![]),
        );
        assert!(longest.is_ok());
        assert!(Schedule::new("bad name", "0 * * * *", JobRequest::new("t", vec![])).is_err());
        assert!(Schedule::new("x", "61 * * * *", JobRequest::new("t", vec![])).is_err());
    }
}
