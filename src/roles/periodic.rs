//! The loop every periodic role runs (the sweeper, the syncer, the cleaner and the
//! intake's request relay): take or renew a lease, and while it is held, do one pass
//! of work at a time; give the lease up on the way out.
//!
//! Only one pod at a time does a periodic role's work: the one holding its row in
//! `leases`. A renewal that does not answer within half the lease counts as lost,
//! since by the time it did another pod could hold it; losing the lease cancels the
//! `holding` token the passes were given, so work a pass started (the syncer's calls)
//! stops before it writes. A pass that fails is logged and tried again after a wait
//! that doubles from the period; only a lost broker connection ends the loop, for the
//! pod's supervisor to start the role again on a new connection.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::store::Store;

/// How a periodic role holds its lease and paces its passes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cadence {
    /// The lease's name: one per role.
    pub lease: &'static str,
    /// How long a taken or renewed lease lasts: long enough to outlive a slow pass or
    /// a missed renewal, short enough that a dead holder's work moves on soon.
    pub lease_for: Duration,
    /// How often the lease is renewed (and, by the pods without it, tried for).
    pub renew_every: Duration,
    /// From the start of one pass to the start of the next, when a pass leaves nothing
    /// waiting.
    pub period: Duration,
    /// The longest wait after failed passes in a row (the wait doubles from `period`).
    pub failure_wait_max: Duration,
}

/// What a pass leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pace {
    /// Nothing waiting: the next pass comes a period after this one began.
    Idle,
    /// More is waiting: the next pass comes at once.
    Busy,
}

/// A periodic role's work.
pub(crate) trait Periodic {
    /// The role's name, in logs.
    fn name(&self) -> &'static str;

    /// One pass, run only while this pod holds the lease; `holding` is cancelled when
    /// the lease is lost or the pod stops. A pass dropped half-way (at shutdown) must
    /// leave nothing the next pass cannot carry on from.
    fn pass(
        &mut self,
        holding: &CancellationToken,
    ) -> impl Future<Output = Result<Pace, Error>> + Send;
}

/// Runs `work` at `cadence` until `shutdown`: `Ok` then, `Err` on a lost broker
/// connection. The lease is released on the way out, so that another pod takes the
/// role over at once rather than once it lapses.
pub(crate) async fn run<W: Periodic + Send>(
    store: &Store,
    cadence: Cadence,
    work: &mut W,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let holder = uuid::Uuid::new_v4().to_string();
    let name = work.name();
    // Live while this pod holds the lease.
    let mut holding: Option<CancellationToken> = None;
    let mut renew_at = Instant::now();
    let mut next_pass = Instant::now();
    let mut failure_wait = cadence.period;
    let stopped = loop {
        if Instant::now() >= renew_at {
            renew_at = Instant::now() + cadence.renew_every;
            if take_lease(store, &cadence, &holder, name).await {
                holding.get_or_insert_with(|| shutdown.child_token());
            } else if let Some(lost) = holding.take() {
                lost.cancel();
                tracing::warn!(role = name, "lease lost; this pod stops this role's work");
            }
        }
        if let Some(term) = holding.as_ref().filter(|_| Instant::now() >= next_pass) {
            let began = Instant::now();
            let passed = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                passed = work.pass(term) => passed,
            };
            next_pass = match passed {
                Ok(pace) => {
                    failure_wait = cadence.period;
                    match pace {
                        Pace::Busy => Instant::now(),
                        Pace::Idle => began + cadence.period,
                    }
                }
                Err(err) if err.is_broker_connection() => break Err(err),
                Err(err) => {
                    tracing::warn!(role = name, %err, wait = ?failure_wait, "pass failed; trying again");
                    let wait = failure_wait;
                    failure_wait = (failure_wait * 2).min(cadence.failure_wait_max);
                    Instant::now() + wait
                }
            };
        }
        let wake = match holding {
            Some(_) => renew_at.min(next_pass),
            None => renew_at,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep_until(wake) => {}
        }
    };
    if let Some(held) = holding {
        held.cancel();
        hand_lease_on(store, cadence.lease, &holder).await;
    }
    stopped
}

/// Takes or renews the lease; `false` if another pod holds it, or if the database
/// did not answer within half the lease.
async fn take_lease(store: &Store, cadence: &Cadence, holder: &str, name: &str) -> bool {
    let acquire = store.acquire_lease(cadence.lease, holder, cadence.lease_for);
    match tokio::time::timeout(cadence.lease_for / 2, acquire).await {
        Ok(Ok(held)) => held,
        Ok(Err(err)) => {
            tracing::warn!(role = name, %err, "lease unavailable");
            false
        }
        Err(_) => {
            tracing::warn!(role = name, "lease not renewed in time");
            false
        }
    }
}

/// Releases a lease as its pod stops; one that cannot be released within two seconds
/// (the database away) is left to lapse.
async fn hand_lease_on(store: &Store, name: &str, holder: &str) {
    let release = store.release_lease(name, holder);
    if let Ok(Err(err)) = tokio::time::timeout(Duration::from_secs(2), release).await {
        tracing::debug!(%err, lease = name, "lease not released; it lapses");
    }
}
