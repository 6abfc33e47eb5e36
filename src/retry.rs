//! Transient-error retries: the only module that touches the `backoff` crate.
//!
//! `backoff` is unmaintained (RUSTSEC-2025-0012); keeping it behind this file makes a
//! swap one edit. The policy follows the original system's datastore retries: first
//! wait 10 ms, growing exponentially with jitter up to 10 s, giving up after 90 s.

use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;

fn policy(max_elapsed: Option<Duration>) -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_millis(10),
        max_interval: Duration::from_secs(10),
        max_elapsed_time: max_elapsed,
        ..ExponentialBackoff::default()
    }
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
        Self(policy(Some(Duration::from_secs(90))))
    }

    /// For reconnect loops: 100 ms growing to `cap`, never giving up.
    pub fn reconnect(cap: Duration) -> Self {
        let mut policy = policy(None);
        policy.initial_interval = Duration::from_millis(100);
        policy.max_interval = cap;
        Self(policy)
    }

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
