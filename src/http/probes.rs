//! The probes. Liveness is the process answering, nothing more: a broker or database
//! outage is no reason to restart a pod, and restarting every pod at once when the
//! broker blinks would turn an outage into a storm. Readiness is everything a pod needs
//! to do work: the broker connected, the database answering with every migration
//! applied, every role running; otherwise 503 and the reasons, one per line.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;

use super::endpoint::Endpoint;

/// How long the database may take to answer a probe.
const DATABASE_WAIT: Duration = Duration::from_secs(2);

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

pub(super) async fn readyz(State(endpoint): State<Arc<Endpoint>>) -> (StatusCode, String) {
    let reasons = not_ready_because(&endpoint).await;
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        let mut body = String::from("not ready:\n");
        for reason in reasons {
            body.push_str(&reason);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// Why the pod cannot do its work now; empty when it can. Errors are described, never
/// printed with a URL: they could carry a password.
async fn not_ready_because(endpoint: &Endpoint) -> Vec<String> {
    let mut reasons = Vec::new();
    if endpoint.stopping.is_cancelled() {
        reasons.push("shutting down".to_owned());
    }
    if !endpoint.link.is_connected() {
        reasons.push("broker: not connected".to_owned());
    }
    if !endpoint.vitals.started() {
        reasons.push("roles: not started yet".to_owned());
    }
    for role in endpoint.vitals.roles_down() {
        reasons.push(format!(
            "role {role}: not running (reconnecting or restarting)"
        ));
    }
    match tokio::time::timeout(DATABASE_WAIT, endpoint.store.ping()).await {
        Err(_) => reasons.push(format!("database: no answer within {DATABASE_WAIT:?}")),
        Ok(Err(err)) => reasons.push(format!("database: {err}")),
        Ok(Ok(())) if !endpoint.migrated.load(Ordering::Relaxed) => {
            match endpoint.store.pending_migrations().await {
                Ok(0) => endpoint.migrated.store(true, Ordering::Relaxed),
                Ok(pending) => reasons.push(format!("database: {pending} migrations not applied")),
                Err(err) => reasons.push(format!("database: migrations unknown: {err}")),
            }
        }
        Ok(Ok(())) => {}
    }
    reasons
}
