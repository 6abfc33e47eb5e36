//! The pod's broker link: one shared connection, re-established with capped, jittered
//! backoff when it dies, and a supervisor that puts each role back to work on it.
//!
//! A role's consumer stream ending, a channel closed by the broker, a lost socket: all
//! end the role's run with an error, and [`supervise`] starts it again on a live
//! connection. Messages the dead channel had not acked return to their queues; the
//! conditional transitions of the store make their second run harmless. While the
//! broker is away the log says so once per outage, at warn level.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::amqp::broker;
use crate::retry::Delays;

/// Longest wait between reconnect attempts.
const RECONNECT_CAP: Duration = Duration::from_secs(10);

/// A broker connection shared by everything in a pod (or a client), re-established
/// when lost.
pub struct BrokerLink {
    /// One URL, or several (comma-separated) for the nodes of a cluster.
    url: String,
    /// The URL that answered last (an index, modulo their number): tried first on the
    /// next connect.
    preferred: std::sync::atomic::AtomicUsize,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// When the current outage began, if the broker is away.
    outage: Mutex<Option<Instant>>,
    /// Whether any connect has succeeded: before the first, the link is not connected
    /// though no outage has begun.
    connected_once: std::sync::atomic::AtomicBool,
}

impl BrokerLink {
    /// A link to the broker at `url`; it connects on the first call of
    /// [`Self::connection`].
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            // Pods given the same list start at different nodes, so they spread over
            // the cluster instead of all crowding its first node.
            preferred: std::sync::atomic::AtomicUsize::new(uuid::Uuid::new_v4().as_u128() as usize),
            current: tokio::sync::Mutex::new(None),
            outage: Mutex::new(None),
            connected_once: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The live connection, reconnecting first if needed. `None` once `shutdown` is
    /// cancelled while waiting.
    pub async fn connection(&self, shutdown: &CancellationToken) -> Option<Arc<Connection>> {
        // Another role may be reconnecting: wait for it, but never past a shutdown.
        let mut current = tokio::select! {
            _ = shutdown.cancelled() => return None,
            current = self.current.lock() => current,
        };
        if let Some(connection) = current.as_ref() {
            if connection.status().connected() {
                return Some(connection.clone());
            }
        }
        let mut delays = Delays::reconnect(RECONNECT_CAP);
        loop {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return None,
                attempt = broker::connect_any(&self.url, self.preferred.load(Ordering::Relaxed)) => attempt,
            };
            match attempt {
                Ok((connection, index)) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    *current = Some(connection.clone());
                    self.connected_once.store(true, Ordering::Relaxed);
                    if let Some(began) = self.outage.lock().expect("outage lock").take() {
                        crate::metrics::broker_reconnected();
                        tracing::warn!(after = ?began.elapsed(), "broker connection restored");
                    }
                    return Some(connection);
                }
                Err(err) => self.report(&err),
            }
            let delay = delays.next().unwrap_or(RECONNECT_CAP);
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The connection if it is up, without waiting: `None` while the broker is away,
    /// before the first connect, or while a role is reconnecting.
    pub fn live_connection(&self) -> Option<Arc<Connection>> {
        let current = self.current.try_lock().ok()?;
        current
            .as_ref()
            .filter(|connection| connection.status().connected())
            .cloned()
    }

    /// Whether the broker is connected, as far as the link knows without waiting: a
    /// role holding the link to reconnect means an outage, and so does the first
    /// connect while it is under way.
    pub fn is_connected(&self) -> bool {
        match self.current.try_lock() {
            Ok(current) => current
                .as_ref()
                .is_some_and(|connection| connection.status().connected()),
            Err(_) => {
                self.connected_once.load(Ordering::Relaxed)
                    && self.outage.lock().expect("outage lock").is_none()
            }
        }
    }

    /// Logs a broker failure: at warn for the first of an outage, at debug after.
    pub fn report(&self, err: &dyn std::fmt::Display) {
        let mut outage = self.outage.lock().expect("outage lock");
        if outage.is_none() {
            *outage = Some(Instant::now());
            tracing::warn!(%err, "broker connection lost; reconnecting");
        } else {
            tracing::debug!(%err, "broker still away");
        }
    }

    /// Closes the connection, waiting at most [`broker::CLOSE_TIMEOUT`] for the
    /// broker, and not at all for a role still holding the link (it is reconnecting to
    /// a broker that is away: there is nothing to close).
    pub async fn close(&self) {
        let Ok(mut current) = self.current.try_lock() else {
            return;
        };
        if let Some(connection) = current.take() {
            broker::close_connection(&connection).await;
        }
    }
}

/// Runs `role` on the link's connection until it returns `Ok` (a clean shutdown) or
/// `shutdown` is cancelled; any error restarts it on a live connection after a
/// backoff wait.
pub async fn supervise<F, Fut, E>(
    name: &'static str,
    link: Arc<BrokerLink>,
    shutdown: CancellationToken,
    mut role: F,
) -> Result<(), E>
where
    F: FnMut(Arc<Connection>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut delays = Delays::reconnect(RECONNECT_CAP);
    loop {
        let Some(connection) = link.connection(&shutdown).await else {
            return Ok(());
        };
        let started = Instant::now();
        match role(connection.clone()).await {
            Ok(()) => return Ok(()),
            Err(_) if shutdown.is_cancelled() => return Ok(()),
            Err(err) => {
                crate::metrics::role_restarted(name);
                if connection.status().connected() {
                    tracing::error!(role = name, %err, "role failed; restarting it");
                } else {
                    link.report(&err);
                }
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            delays.reset();
        }
        let delay = delays.next().unwrap_or(RECONNECT_CAP);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
