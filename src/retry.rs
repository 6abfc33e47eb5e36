//! Transient-error retries: the only module that touches the `backoff` crate.
//!
//! `backoff` is unmaintained (RUSTSEC-2025-0012); keeping it behind this file makes a
//! swap one edit. The policy follows the original system's datastore retries: first
//! wait 10 ms, growing exponentially with jitter up to 10 s, giving up after 90 s.

use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};

/// The builder, not a struct literal: a literal over `default()` keeps the default's
/// first wait of 500 ms (`current_interval`), whatever `initial_interval` says.
fn policy(first: Duration, cap: Duration, max_elapsed: Option<Duration>) -> ExponentialBackoff {
    ExponentialBackoffBuilder::new()
        .with_initial_interval(first)
        .with_max_interval(cap)
        .with_max_elapsed_time(max_elapsed)
        .build()
}

/// Runs `op` until it succeeds, fails with an error `is_transient` rejects, or 90 s
/// of transient failures have passed.
pub async fn transient<T, E, F, Fut>(
    what: &str,
    is_transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = Delays::transient();
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(err) if is_transient(&err) => match delays.next() {
                Some(delay) => {
                    tracing::debug!(%err, ?delay, "{what}: transient error, retrying");
                    // The store is this function's one user: its retries are the
                    // database's.
                    crate::metrics::database_retried(what);
                    tokio::time::sleep(delay).await;
                }
                None => return Err(err),
            },
            Err(err) => return Err(err),
        }
    }
}

/// A sequence of waits between attempts, for loops that change something between
/// attempts (a smaller batch, a new connection) and so cannot use [`transient`].
pub struct Delays(ExponentialBackoff);

impl Delays {
    /// 10 ms growing to 10 s, `None` once 90 s have passed.
    pub fn transient() -> Self {
        Self(policy(
            Duration::from_millis(10),
            Duration::from_secs(10),
            Some(Duration::from_secs(90)),
        ))
    }

    /// For reconnect loops: 100 ms growing to `cap`, never giving up.
    pub fn reconnect(cap: Duration) -> Self {
        Self(policy(Duration::from_millis(100), cap, None))
    }

    /// Starts over from the first wait.
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

impl Iterator for Delays {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.0.next_backoff()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_waits_start_at_10_ms_and_stop_at_10_s() {
        let waits: Vec<Duration> = Delays::transient().take(40).collect();
        // ±50% jitter around 10 ms.
        assert!(
            waits[0] <= Duration::from_millis(15),
            "first wait {:?}",
            waits[0]
        );
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(15)));
        assert!(waits.iter().any(|w| *w >= Duration::from_secs(5)));
    }

    #[test]
    fn reconnect_waits_start_at_100_ms() {
        let first = Delays::reconnect(Duration::from_secs(10)).next().unwrap();
        assert!(first <= Duration::from_millis(150), "first wait {first:?}");
    }
}
