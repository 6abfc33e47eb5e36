//! Task messages: the one way a task message reaches its pool's work queue, for the intake
//! (first attempts), the sweeper (lost and stuck ones) and anyone else; the way a retry
//! enters the delay ladder; and the finished events the completion role consumes — for
//! the worker and the syncer alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};

use crate::amqp::broker::{Outgoing, Pending, Publisher};
use crate::amqp::topology::Topology;
use crate::error::Error;
use crate::protocol::{self, FinishedTask, JobSettings, TaskMessage, TasksFinished};
use crate::store::job;

/// Header of a task message: when it was sent, in Unix milliseconds, so the worker
/// that records its outcome can tell the attempt's latency. A retry's copy is stamped
/// when it enters the delay ladder: its latency includes the backoff wait.
pub const SENT_AT_HEADER: &str = "x-taskmill-sent-ms";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

fn stamped() -> Option<FieldTable> {
    let mut headers = FieldTable::default();
    headers.insert(SENT_AT_HEADER.into(), AMQPValue::LongLongInt(now_ms()));
    Some(headers)
}

/// How long ago a task message was sent, by its [`SENT_AT_HEADER`]; `None` without
/// one (a message from an older version) or with a clock that went backwards.
pub fn since_sent(delivery: &Delivery) -> Option<Duration> {
    let sent = delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(SENT_AT_HEADER)?;
    let AMQPValue::LongLongInt(sent) = sent else {
        return None;
    };
    u64::try_from(now_ms() - sent)
        .ok()
        .map(Duration::from_millis)
}

/// The settings a job's task messages carry.
pub fn settings_of(job: &job::Model) -> JobSettings<'_> {
    JobSettings {
        job_id: &job.id,
        max_retries: job.max_retries,
        retry_delay_ms: job.retry_delay_ms,
        task_timeout_ms: job.task_timeout_ms,
        run: job.run,
    }
}

/// Publishes `message` to the work queue of `pool` (declared first, once per
/// connection); the caller awaits the confirm.
pub async fn send_task(
    publisher: &Publisher,
    topology: &Topology,
    pool: &str,
    message: &TaskMessage,
) -> Result<Pending, Error> {
    topology
        .declare_work_queue(&publisher.channel().await?, pool)
        .await?;
    let queue = topology.work_queue(pool);
    let body = message.to_body();
    Ok(publisher
        .send(Outgoing {
            headers: stamped(),
            ..Outgoing::to_queue(&queue, &body)
        })
        .await?)
}

/// Sends attempt n+1 of `message` into the delay ladder to wait n × retry_delay_ms; the
/// broker moves it back to `pool`'s work queue when the wait is over. Nobody sleeps
/// meanwhile. Mandatory: a ladder queue that is gone is an error, not a lost retry.
pub async fn send_retry(
    publisher: &Publisher,
    topology: &Topology,
    pool: &str,
    message: &TaskMessage,
) -> Result<Pending, Error> {
    let delay_ms = protocol::retry_wait_ms(message.attempt, message.retry_delay_ms);
    topology
        .declare_delay_ladder(&publisher.channel().await?)
        .await?;
    let body = message.next_attempt().to_body();
    let route = topology.delay_route(delay_ms, pool);
    Ok(publisher
        .send(Outgoing {
            exchange: &route.exchange,
            routing_key: &route.routing_key,
            body: &body,
            mandatory: true,
            headers: stamped(),
        })
        .await?)
}

/// Sends one finished-event message reporting `tasks` to the completion queue.
pub async fn send_finished(
    publisher: &Publisher,
    topology: &Topology,
    tasks: Vec<FinishedTask>,
) -> Result<Pending, Error> {
    let body = serde_json::to_vec(&TasksFinished::new(tasks)).expect("a finished event serializes");
    let queue = topology.completion_queue();
    Ok(publisher.send(Outgoing::to_queue(&queue, &body)).await?)
}
