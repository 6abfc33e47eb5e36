//! How a job is summed up for people — its rate and its age — the same in
//! `taskmill jobs` and on the dashboard.

use chrono::{DateTime, Utc};

use crate::store::job;

/// Tasks done per second since the job started, until it ended or `now`; `None`
/// before it started.
pub fn rate(job: &job::Model, now: DateTime<Utc>) -> Option<f64> {
    let started = job.started_at?;
    let seconds = (job.finished_at.unwrap_or(now) - started).num_milliseconds() as f64 / 1000.0;
    (seconds > 0.0).then(|| job.done_count as f64 / seconds)
}

/// `42s`, `7m`, `3h`, `2d`: how long before `now` `at` was.
pub fn age(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3_600 => format!("{}m", seconds / 60),
        3_600..86_400 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::age;
    use chrono::{TimeDelta, Utc};

    #[test]
    fn ages_read_in_the_largest_whole_unit() {
        let now = Utc::now();
        let ago = |s| age(now - TimeDelta::seconds(s), now);
        assert_eq!(
            [
                ago(5),
                ago(59),
                ago(60),
                ago(3_599),
                ago(7_200),
                ago(200_000)
            ],
            ["5s", "59s", "1m", "59m", "2h", "2d"]
        );
    }
}
