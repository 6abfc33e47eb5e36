//! `/metrics`: the counters and histograms the roles record as they go, plus gauges
//! read at scrape time — pool load from the vitals, unfinished jobs and the outbox
//! backlog from the database, ready messages from the broker — rendered in Prometheus
//! text format. A source that does not answer within a few seconds keeps its last
//! values: the scrape itself always answers.

use std::sync::Arc;
use std::time::Duration;

use super::endpoint::Endpoint;
use crate::amqp::broker::close_channel;
use crate::amqp::topology::ready_in;
use crate::metrics;
use crate::state::JobStage;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// How long one source (database or broker) may take to answer a scrape.
const SOURCE_WAIT: Duration = Duration::from_secs(3);

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) async fn metrics(State(endpoint): State<Arc<Endpoint>>) -> Response {
    let Some(prometheus) = metrics::prometheus() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process: taskmill's metrics go to it\n",
        )
            .into_response();
    };
    for (pool, held, running) in endpoint.vitals.pool_loads() {
        metrics::pool_load(&pool, held, running);
    }
    let _ = tokio::join!(
        tokio::time::timeout(SOURCE_WAIT, read_database(&endpoint)),
        tokio::time::timeout(SOURCE_WAIT, read_queues(&endpoint)),
    );
    prometheus.run_upkeep();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], prometheus.render()).into_response()
}

async fn read_database(endpoint: &Endpoint) {
    match endpoint.store.unfinished_jobs_by_stage().await {
        Ok(counts) => {
            for stage in [JobStage::Scheduled, JobStage::Formation, JobStage::Running] {
                let count = counts
                    .iter()
                    .find(|(counted, _)| *counted == stage)
                    .map_or(0, |(_, count)| *count);
                metrics::jobs_in_stage(stage.as_str(), count);
            }
        }
        Err(err) => tracing::debug!(%err, "metrics: jobs by stage not read"),
    }
    match endpoint.store.unpublished_event_count().await {
        Ok(count) => metrics::outbox_backlog(count),
        Err(err) => tracing::debug!(%err, "metrics: outbox backlog not read"),
    }
    match endpoint
        .store
        .waiting_request_count(chrono::Utc::now())
        .await
    {
        Ok(count) => metrics::requests_waiting(count),
        Err(err) => tracing::debug!(%err, "metrics: waiting requests not read"),
    }
    match endpoint.store.schedules().await {
        Ok(rows) => {
            for row in rows {
                metrics::schedule_ticks(&row.name, row.next_tick, row.last_tick);
            }
        }
        Err(err) => tracing::debug!(%err, "metrics: schedules not read"),
    }
}

/// Ready messages of the queues this pod reads, by passive declares; a queue not
/// declared yet is skipped (its declare closes the channel, so each gets its own).
async fn read_queues(endpoint: &Endpoint) {
    let Some(connection) = endpoint.link.live_connection() else {
        return;
    };
    let topology = &endpoint.topology;
    let mut queues = vec![
        topology.intake_queue(),
        topology.completion_queue(),
        topology.parking_queue(),
    ];
    queues.extend(endpoint.pools.iter().map(|pool| topology.work_queue(pool)));
    for queue in queues {
        let Ok(channel) = connection.create_channel().await else {
            return;
        };
        if let Ok(ready) = ready_in(&channel, &queue).await {
            metrics::queue_ready(&queue, ready);
            close_channel(&channel).await;
        }
    }
}
