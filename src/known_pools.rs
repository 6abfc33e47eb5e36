//! Pools: which worker pools a deployment serves. A producer names a pool in its
//! request; the intake accepts only known ones, so producers cannot name work queues
//! into existence. A pool is known when it is the default pool, is configured
//! ([`crate::config::Config::known_pools`]), or was registered by a pod consuming it. Pods
//! refresh their registration every [`HEARTBEAT`]; a running job whose pool has not
//! been consumed for [`SILENT_AFTER`] is reported by the sweeper and by
//! `taskmill status`.

use std::collections::HashSet;
use std::sync::RwLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::DEFAULT_QUEUE;
use crate::store::{Store, StoreError};

/// How often a pod consuming a pool says so.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A pool not consumed for this long is silent: its jobs are waiting on nobody.
pub const SILENT_AFTER: Duration = Duration::from_secs(60);

/// The intake's answer to "may a request name this pool?". Known pools are cached;
/// an unknown one is looked up again each time, so a pool registered a moment ago
/// is accepted at once.
pub(crate) struct KnownPools {
    known: RwLock<HashSet<String>>,
}

impl KnownPools {
    pub fn new(configured: &[String]) -> Self {
        let mut known: HashSet<String> = configured.iter().cloned().collect();
        known.insert(DEFAULT_QUEUE.to_owned());
        Self {
            known: RwLock::new(known),
        }
    }

    pub async fn contains(&self, store: &Store, pool: &str) -> Result<bool, StoreError> {
        if self.known.read().expect("pools lock").contains(pool) {
            return Ok(true);
        }
        let registered = store.pool(pool).await?.is_some();
        if registered {
            self.known
                .write()
                .expect("pools lock")
                .insert(pool.to_owned());
        }
        Ok(registered)
    }
}

/// Keeps `pools` registered while the caller consumes them (until `stop`).
pub(crate) async fn keep_registered(store: Store, pools: Vec<String>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(err) = store.register_pools(&pools).await {
            tracing::warn!(%err, ?pools, "could not refresh the pools' registration");
        }
    }
}

/// The moment before which a pool's last consumer makes it silent.
pub fn silent_since(now: DateTime<Utc>) -> DateTime<Utc> {
    crate::clock::before(now, SILENT_AFTER)
}

/// Says how long a pool has gone without a consumer, for status and warnings.
pub fn describe_silence(
    pool: &str,
    last_seen_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> String {
    match last_seen_at {
        None => format!("no pod has ever consumed pool {pool:?}"),
        Some(at) => {
            let quiet = (now - at).to_std().unwrap_or_default();
            format!("no pod has consumed pool {pool:?} for {}s", quiet.as_secs())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_described_with_its_length() {
        let now = Utc::now();
        assert_eq!(
            describe_silence("gpu", None, now),
            "no pod has ever consumed pool \"gpu\""
        );
        let seen = now - chrono::Duration::seconds(125);
        assert_eq!(
            describe_silence("gpu", Some(seen), now),
            "no pod has consumed pool \"gpu\" for 125s"
        );
        assert!(silent_since(now) < now);
    }
}
