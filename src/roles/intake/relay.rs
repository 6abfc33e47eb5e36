//! The request relay: publishes the `job_requests` outbox to the jobs exchange — the
//! requests producers wrote in their own transactions (`submit_in`) at once,
//! and those of scheduled jobs once their `run_at` has come, marked due so that the
//! intake forms the job then.
//!
//! One intake pod at a time holds the `request-relay` lease and looks at the outbox
//! every 200 ms; the others try for the lease every 5 s ([`CADENCE`]), so an idle outbox
//! costs three small indexed reads per poll and a lease write per renewal, however many
//! scheduled jobs wait. A pass publishes the rows to send now, oldest first — at most
//! [`BATCH_ROWS`] rows and [`BATCH_CHARS`] characters of JSON — waits for the broker's
//! confirms, and deletes the rows it confirmed. A relay that dies between the confirm and the delete leaves
//! rows that the next holder publishes again: each names its job (the body's `job_id`,
//! or the row's as the message id), so the copy makes nothing new. A row over the
//! intake's request limit (the broker could refuse it and stall the outbox), or with a
//! `run_at` past the intake's 366 days (it would wait for ever, unanswered), is never
//! published: SQL can write either past the intake's checks, and each is answered with
//! `job.rejected` and deleted.

use std::sync::Arc;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use super::Intake;
use crate::amqp::broker::Outgoing;
use crate::error::Error;
use crate::protocol::{
    check_id, check_name, too_far_ahead, CONTENT_TYPE, DUE_HEADER, MAX_RUN_AT_AHEAD,
};
use crate::roles::periodic::{self, Cadence, Pace, Periodic};
use crate::store::job_request;

/// The relay's lease: renewed every 5 s, it outlives two missed renewals, so a slow
/// pass does not let a second relay start beside it, and a dead holder's lapses within
/// 15 s. The holder looks at the outbox every 200 ms: the most a committed request
/// waits for its publish while the outbox is otherwise empty.
const CADENCE: Cadence = Cadence {
    lease: "request-relay",
    lease_for: Duration::from_secs(15),
    renew_every: Duration::from_secs(5),
    period: Duration::from_millis(200),
    failure_wait_max: Duration::from_secs(5),
};
/// Rows per pass at most.
const BATCH_ROWS: u64 = 256;
/// A `run_at` further ahead than this is answered, not kept: the intake's bound, and a
/// day more so that no pod's clock refuses what another pod's intake stored.
const FAR_AHEAD: chrono::TimeDelta = MAX_RUN_AT_AHEAD.checked_add(&chrono::TimeDelta::days(1)).expect("in range");
/// Characters of request JSON per pass at most (one row whatever its size): what a
/// pass holds in memory.
const BATCH_CHARS: i64 = 8 * 1024 * 1024;

/// The intake as the relay of the outbox.
struct Relay(Arc<Intake>);

impl Periodic for Relay {
    fn name(&self) -> &'static str {
        "request relay"
    }

    /// Fires the due ticks and relays one batch; busy while more may be waiting. A
    /// pass dropped half-way leaves its rows for the next: nothing is lost, and a tick
    /// is fired whole or not at all.
    async fn pass(&mut self, _holding: &CancellationToken) -> Result<Pace, Error> {
        Ok(match self.0.fire_and_relay().await? {
            true => Pace::Busy,
            false => Pace::Idle,
        })
    }
}

impl Intake {
    /// Relays the outbox until `shutdown` or a lost broker connection, giving the
    /// lease up on the way out.
    pub(super) async fn relay(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), Error> {
        let store = self.shared.store.clone();
        periodic::run(&store, CADENCE, &mut Relay(self), &shutdown).await
    }

    /// Fires the schedules' due ticks, then relays; a failure to fire delays the
    /// ticks, not the requests waiting.
    async fn fire_and_relay(&self) -> Result<bool, Error> {
        if let Err(err) = self.fire_due_ticks().await {
            tracing::warn!(%err, "due schedules not fired; trying again");
        }
        self.relay_pass().await
    }

    /// Publishes and removes the oldest waiting rows; `true` if more may be waiting.
    async fn relay_pass(&self) -> Result<bool, Error> {
        let store = &self.shared.store;
        let now = chrono::Utc::now();
        let beyond = now + FAR_AHEAD;
        let waiting = store.waiting_requests(BATCH_ROWS, now, beyond).await?;
        if waiting.is_empty() {
            return Ok(false);
        }
        let mut chars = 0;
        let ids: Vec<i64> = waiting
            .iter()
            .take_while(|row| {
                let first = chars == 0;
                chars += i64::from(row.size);
                first || chars <= BATCH_CHARS
            })
            .map(|row| row.id)
            .collect();
        let more = ids.len() < waiting.len() || waiting.len() as u64 == BATCH_ROWS;
        let rows = store.requests(ids).await?;
        let exchange = self.shared.topology.jobs_exchange();
        let limit = self.shared.config.max_request_bytes;
        let mut answered = Vec::new();
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.body.len() > limit {
                let reason = format!(
                    "request of {} bytes is over the intake's limit of {limit} bytes",
                    row.body.len()
                );
                self.refuse(row, &reason).await;
                answered.push(row.id);
                continue;
            }
            if let Some(run_at) = row.run_at.filter(|at| *at > beyond) {
                self.refuse(row, &too_far_ahead(run_at)).await;
                answered.push(row.id);
                continue;
            }
            let sent = self
                .publisher
                .send_with(
                    Outgoing {
                        exchange: &exchange,
                        // The intake's binding takes any key; one the broker would
                        // refuse must not stall the outbox (the body's job type is the
                        // one the intake checks).
                        routing_key: match check_name("job_type", &row.job_type) {
                            Ok(()) => &row.job_type,
                            Err(_) => "",
                        },
                        body: row.body.as_bytes(),
                        mandatory: true,
                        headers: None,
                    },
                    properties(row),
                )
                .await;
            match sent {
                Ok(confirm) => pending.push((row.id, confirm)),
                // The rows sent so far may still be confirmed: wait for them below.
                Err(err) => {
                    tracing::warn!(%err, "request relay publish failed");
                    break;
                }
            }
        }
        let mut failed = None;
        for (id, confirm) in pending {
            match confirm.confirmed().await {
                Ok(()) => answered.push(id),
                Err(err) => {
                    failed.get_or_insert(err);
                }
            }
        }
        let relayed = answered.len();
        if !answered.is_empty() {
            store.remove_requests(answered).await?;
        }
        tracing::debug!(relayed, "job requests relayed");
        match failed {
            Some(err) => Err(err.into()),
            None if relayed < rows.len() => Err(Error::Other(
                "request relay stopped at a failed publish".into(),
            )),
            None => Ok(more),
        }
    }

    /// A row the intake would refuse and that must not be published or wait: too large
    /// (the broker could refuse it, and the parking lot could not hold it), or a
    /// `run_at` past the bound. Answered as the intake answers a request it parks.
    async fn refuse(&self, row: &job_request::Model, reason: &str) {
        tracing::error!(job_id = %row.job_id, %reason, "job request in the outbox refused");
        self.answer_rejection(row.body.as_bytes(), Some(&row.job_id), reason)
            .await;
    }
}

/// A request's properties: its row's job id as the message id when it is a valid id,
/// which names the job of a body without a `job_id`; the due header on a scheduled
/// job's request.
fn properties(row: &job_request::Model) -> BasicProperties {
    let mut properties = BasicProperties::default().with_content_type(CONTENT_TYPE.into());
    if check_id("job_id", &row.job_id).is_ok() {
        properties = properties.with_message_id(row.job_id.as_str().into());
    }
    if row.run_at.is_some() {
        let mut headers = FieldTable::default();
        headers.insert(DUE_HEADER.into(), AMQPValue::Boolean(true));
        properties = properties.with_headers(headers);
    }
    properties
}
