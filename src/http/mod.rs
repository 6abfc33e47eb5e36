//! The pod's HTTP endpoint, on one port: the probes (`/healthz`, `/readyz`) and the
//! Prometheus metrics (`/metrics`), open as orchestrators and scrapers need them, and
//! the dashboard (`/`), which needs the pod's token ([`Access`]). It reads the pod's
//! store, broker link and role vitals; it never takes part in the pipeline, and the
//! dashboard reads through a small store of its own, so a slow scrape or a busy
//! dashboard cannot hold a task back.

mod access;
mod dashboard;
mod endpoint;
mod probes;
mod scrape;

pub(crate) use access::Access;
pub(crate) use endpoint::Endpoint;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds `addr`. With `fallback`, an address in use — another pod on the same host,
/// the first step of scaling out — gives way to a free port of the same interface,
/// with one warning that names it; otherwise it is the pod's error, at start, not a
/// silent pod without probes.
pub(crate) async fn bind(addr: SocketAddr, fallback: bool) -> std::io::Result<TcpListener> {
    let listener = match TcpListener::bind(addr).await {
        Err(err) if fallback && err.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?;
            tracing::warn!(
                taken = %addr,
                addr = %listener.local_addr()?,
                "the default HTTP address is in use (another pod on this host?): serving on a free port instead"
            );
            listener
        }
        bound => bound?,
    };
    tracing::info!(addr = %listener.local_addr()?, "serving probes, metrics and the dashboard");
    Ok(listener)
}

/// Serves until `stop` is cancelled; a failure is logged (the pod goes on: its work
/// does not depend on being watched).
pub(crate) async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(scrape::metrics))
        .merge(dashboard::routes(endpoint.clone()))
        .with_state(endpoint);
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(%err, "the HTTP endpoint stopped");
    }
}
