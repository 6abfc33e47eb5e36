//! Time arithmetic between configured durations (`std::time::Duration`) and stored
//! timestamps (`chrono`), written once. It saturates instead of panicking: an absurd
//! setting (a lease of `u64::MAX` seconds) means "never", not a crash.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// `duration` as a timestamp difference, `TimeDelta::MAX` if it does not fit.
pub fn span(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}

/// `duration` after `at`, or the latest representable moment.
pub fn after(at: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    at.checked_add_signed(span(duration))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `duration` before `at`, or the earliest representable moment.
pub fn before(at: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    at.checked_sub_signed(span(duration))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

pub fn from_now(duration: Duration) -> DateTime<Utc> {
    after(Utc::now(), duration)
}

pub fn ago(duration: Duration) -> DateTime<Utc> {
    before(Utc::now(), duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_durations_saturate() {
        let now = Utc::now();
        assert_eq!(after(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(before(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
        assert_eq!(span(Duration::MAX), TimeDelta::MAX);
    }

    #[test]
    fn ordinary_durations_are_exact() {
        let now = Utc::now();
        let minute = Duration::from_secs(60);
        assert_eq!(after(now, minute) - now, TimeDelta::seconds(60));
        assert_eq!(now - before(now, minute), TimeDelta::seconds(60));
    }
}
