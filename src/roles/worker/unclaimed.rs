//! The attempts this worker runs without a claim, by task and attempt: a copy of one of
//! their messages (the sweeper's, a feeder's after a takeover) waits for the original
//! here instead of running beside it, since no row says the original is running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// How long a handler runs unclaimed before its attempt is claimed.
pub(super) const CLAIM_AFTER: Duration = Duration::from_secs(1);

/// A task id and an attempt number.
type Key = (i64, i32);

#[derive(Default)]
pub(super) struct Unclaimed {
    running: Mutex<HashMap<Key, Arc<Notify>>>,
}

/// An attempt running unclaimed: held until its outcome is recorded (or dropped).
pub(super) struct Running {
    owner: Arc<Unclaimed>,
    key: Key,
}

impl Unclaimed {
    /// Marks `key` as running here; `None` if it already is (the message is a copy).
    pub fn start(self: &Arc<Self>, key: Key) -> Option<Running> {
        let mut running = self.running.lock().unwrap();
        if running.contains_key(&key) {
            return None;
        }
        running.insert(key, Arc::default());
        Some(Running {
            owner: self.clone(),
            key,
        })
    }

    /// Waits until `key` no longer runs here unclaimed, or `limit` has passed.
    pub async fn wait(&self, key: Key, limit: Duration) {
        let notify = match self.running.lock().unwrap().get(&key) {
            Some(notify) => notify.clone(),
            None => return,
        };
        let ended = notify.notified();
        // Registered before the check below, so an end between the two is not missed.
        tokio::pin!(ended);
        ended.as_mut().enable();
        if !self.running.lock().unwrap().contains_key(&key) {
            return;
        }
        let _ = tokio::time::timeout(limit, ended).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(notify) = self.owner.running.lock().unwrap().remove(&self.key) {
            notify.notify_waiters();
        }
    }
}
