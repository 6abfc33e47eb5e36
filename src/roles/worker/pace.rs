//! How deep a worker's pipeline runs: the channel's prefetch follows the handlers'
//! pace.
//!
//! Past `concurrency`, a prefetch keeps the database and broker busy — messages are
//! claimed while others are recorded and acked — but a message it holds waits in the
//! pod for a handler, and RabbitMQ closes a channel whose delivery stays unacked past
//! its `consumer_timeout`. So the depth is sized by the handlers' mean time: the
//! messages past `concurrency` wait about [`WAIT_FOR_HANDLER`] on average. Fast
//! handlers get the whole `prefetch`; handlers that take minutes get `concurrency`,
//! as before pipelining. A pod starts at `concurrency` until it has measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The mean wait of a message for a handler that the depth past `concurrency` aims at.
pub(super) const WAIT_FOR_HANDLER: Duration = Duration::from_secs(1);
/// How often the depth is reconsidered (a change costs a round trip to the broker).
const EVERY: Duration = Duration::from_millis(250);

/// The handlers' mean time, measured.
#[derive(Default)]
pub(crate) struct Pace {
    /// Exponentially weighted mean of handler times, in microseconds (0: none yet).
    mean_micros: AtomicU64,
}

impl Pace {
    /// Adds one handler's time to the mean (weight 1/8: a change of pace shows
    /// within a few dozen handlers).
    pub fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        // Racing updates may lose a sample; a mean does not need every one.
        let mean = self.mean_micros.load(Ordering::Relaxed);
        let next = if mean == 0 {
            took
        } else {
            mean - mean / 8 + took / 8
        };
        self.mean_micros.store(next.max(1), Ordering::Relaxed);
    }

    fn mean(&self) -> Option<Duration> {
        match self.mean_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}

/// The prefetch for handlers of mean time `mean`: `concurrency` plus what they run in
/// [`WAIT_FOR_HANDLER`], at most `prefetch`.
pub(super) fn depth(concurrency: usize, prefetch: usize, mean: Option<Duration>) -> usize {
    let Some(mean) = mean else {
        return concurrency;
    };
    let rounds = WAIT_FOR_HANDLER.as_secs_f64() / mean.as_secs_f64().max(1e-6);
    let extra = (concurrency as f64 * rounds).min(prefetch as f64) as usize;
    concurrency
        .saturating_add(extra)
        .min(prefetch)
        .max(concurrency)
}

/// When the consumer's prefetch should change, and to what.
pub(super) struct Depth {
    concurrency: usize,
    prefetch: usize,
    current: usize,
    checked: Instant,
}

impl Depth {
    /// Starts at `concurrency`: nothing is known of the handlers yet.
    pub fn new(concurrency: usize, prefetch: usize) -> Self {
        Self {
            concurrency,
            prefetch,
            current: concurrency,
            checked: Instant::now(),
        }
    }

    /// The prefetch to change to, if the pace asks for one worth the change (a
    /// limit, or a move of a quarter or more), at most every [`EVERY`].
    pub fn next(&mut self, pace: &Pace) -> Option<usize> {
        if self.checked.elapsed() < EVERY {
            return None;
        }
        self.checked = Instant::now();
        let wanted = depth(self.concurrency, self.prefetch, pace.mean());
        let at_a_limit = wanted == self.prefetch || wanted == self.concurrency;
        let moved = wanted > self.current * 5 / 4 || wanted < self.current * 4 / 5;
        if wanted == self.current || !(at_a_limit || moved) {
            return None;
        }
        tracing::debug!(prefetch = wanted, mean = ?pace.mean(), "worker prefetch follows the handlers");
        self.current = wanted;
        Some(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_handlers_get_the_whole_prefetch_and_slow_ones_only_their_own() {
        let ms = Duration::from_millis;
        assert_eq!(
            depth(32, 256, None),
            32,
            "unmeasured: no messages held waiting"
        );
        assert_eq!(depth(32, 256, Some(Duration::from_micros(50))), 256);
        assert_eq!(depth(32, 256, Some(ms(100))), 256);
        // 32 handlers of 500 ms run 64 more messages in a second.
        assert_eq!(depth(32, 256, Some(ms(500))), 96);
        assert_eq!(depth(32, 256, Some(ms(2_000))), 48);
        assert_eq!(depth(32, 256, Some(Duration::from_secs(300))), 32);
        assert_eq!(depth(256, 256, Some(ms(1))), 256);
    }

    #[test]
    fn the_mean_follows_a_change_of_pace() {
        let pace = Pace::default();
        assert_eq!(pace.mean(), None);
        pace.record(Duration::from_secs(10));
        assert_eq!(pace.mean(), Some(Duration::from_secs(10)));
        for _ in 0..64 {
            pace.record(Duration::from_millis(1));
        }
        assert!(pace.mean().unwrap() < Duration::from_millis(20));
    }
}
