//! The consumer every consuming role (intake, worker, completion) stands on: one
//! channel with its prefetch, deliveries one at a time or in batches (whatever the
//! broker has already pushed), decoding with the protocol's checks, and stopping — cancel the consumer, give the work in flight its grace
//! period, close the channel. Whatever is still unacked then returns to the queue.
//!
//! A role run under [`reporting_consumption`] has its flag raised the moment its broker
//! consumer is started: the readiness probe's "live" means "the broker delivers to it",
//! not "its run began" (declares and channel setup come first, and can take a while).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::broker::{close_channel, BrokerError, CLOSE_TIMEOUT};
use crate::protocol::{self, DecodeError, Incoming};

tokio::task_local! {
    /// The flag of the role run being polled, if its supervisor asked to hear when it
    /// consumes. A task-local rather than a parameter: every consuming role opens its
    /// consumer the same way, and none of them has to carry its supervisor's flag.
    static CONSUMING: Arc<AtomicBool>;
}

/// Runs `run`, raising `consuming` once it has started a [`Consumer`].
pub(crate) async fn reporting_consumption<F: Future>(
    consuming: Arc<AtomicBool>,
    run: F,
) -> F::Output {
    CONSUMING.scope(consuming, run).await
}

/// One queue consumed on a channel of its own.
pub(crate) struct Consumer {
    channel: Channel,
    /// The current broker consumer last; before it, any cancelled by
    /// [`Consumer::set_prefetch`] that still hold deliveries. Their tags are lower,
    /// so taking them first keeps deliveries in tag order, which acks rely on.
    streams: VecDeque<lapin::Consumer>,
    queue: String,
    tag: String,
    prefetch: u16,
    max_bytes: usize,
}

impl Consumer {
    /// Opens a channel that holds at most `prefetch` unacked deliveries (clamped to
    /// what `basic.qos` carries) and starts consuming `queue`. Bodies over `max_bytes`
    /// fail to decode.
    pub async fn start(
        connection: &Connection,
        queue: String,
        prefetch: usize,
        max_bytes: usize,
    ) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        let prefetch = qos(prefetch);
        let (tag, stream) = consume(&channel, &queue, prefetch).await?;
        tracing::info!(queue, prefetch, "consuming");
        // Outside a reporting run (a client, a test) there is nobody to tell.
        let _ = CONSUMING.try_with(|consuming| consuming.store(true, Ordering::Relaxed));
        Ok(Self {
            channel,
            streams: VecDeque::from([stream]),
            queue,
            tag,
            prefetch,
            max_bytes,
        })
    }

    /// Changes how many unacked deliveries the consumer holds. RabbitMQ applies a
    /// prefetch to consumers started after it, so this replaces the broker consumer
    /// on the same channel: the old one is cancelled first (deliveries it holds stay
    /// unacked on the channel and are still taken, before any of the new one's), then
    /// the new one starts with the new prefetch.
    pub async fn set_prefetch(&mut self, prefetch: usize) -> Result<(), BrokerError> {
        let prefetch = qos(prefetch);
        if prefetch == self.prefetch {
            return Ok(());
        }
        self.channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await?;
        let (tag, stream) = consume(&self.channel, &self.queue, prefetch).await?;
        self.streams.push_back(stream);
        self.tag = tag;
        self.prefetch = prefetch;
        Ok(())
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery, or `None` once `shutdown` is cancelled.
    pub async fn next(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Delivery>, BrokerError> {
        loop {
            let stream = self.streams.front_mut().expect("a consumer is running");
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                next = stream.next() => next,
            };
            if let Some(delivery) = self.yielded(next) {
                return delivery.map(Some);
            }
        }
    }

    /// A delivery the broker has already pushed, without waiting for one.
    pub fn buffered(&mut self) -> Option<Result<Delivery, BrokerError>> {
        loop {
            let stream = self.streams.front_mut().expect("a consumer is running");
            let next = stream.next().now_or_never()?;
            if let Some(delivery) = self.yielded(next) {
                return Some(delivery);
            }
        }
    }

    /// The next delivery and whatever else is buffered, `max` at most; `None` once
    /// `shutdown` is cancelled.
    pub async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Delivery>>, BrokerError> {
        let Some(first) = self.next(shutdown).await? else {
            return Ok(None);
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match self.buffered() {
                Some(delivery) => batch.push(delivery?),
                None => break,
            }
        }
        Ok(Some(batch))
    }

    /// What the front stream yielded: a delivery, an error, or — `None` — the end of
    /// a cancelled consumer, which the next one takes over from.
    fn yielded(
        &mut self,
        next: Option<Result<Delivery, lapin::Error>>,
    ) -> Option<Result<Delivery, BrokerError>> {
        match next {
            Some(delivery) => Some(delivery.map_err(BrokerError::from)),
            None if self.streams.len() > 1 => {
                self.streams.pop_front();
                None
            }
            None => Some(Err(BrokerError::ConsumerEnded(self.queue.clone()))),
        }
    }

    /// Decodes a delivery and checks it as its type requires.
    pub fn decode<T: Incoming>(&self, delivery: &Delivery) -> Result<T, DecodeError> {
        decode(delivery, self.max_bytes)
    }

    /// Stops deliveries, waits for the work in flight — it holds permits of `slots`,
    /// `permits` in all — for at most `grace`, and closes the channel.
    pub async fn stop(self, slots: &Semaphore, permits: usize, grace: Duration) {
        self.drain(slots, permits, grace).await;
        self.close().await;
    }

    /// [`Self::stop`] but for the close: work still in flight can be abandoned first.
    pub async fn drain(&self, slots: &Semaphore, permits: usize, grace: Duration) {
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            self.channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await;
        let permits = u32::try_from(permits).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, slots.acquire_many(permits))
            .await
            .is_err()
        {
            tracing::warn!(
                queue = self.queue,
                ?grace,
                "work still in flight after the grace period; the broker will redeliver its messages"
            );
        }
    }

    /// Closes the channel at once: its unacked deliveries return to the queue.
    pub async fn close(self) {
        close_channel(&self.channel).await;
    }
}

fn qos(prefetch: usize) -> u16 {
    u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX)
}

/// Starts a broker consumer of `queue` with `prefetch` and a tag of its own: a
/// restarted role, or a new prefetch, must not collide with an earlier consumer.
async fn consume(
    channel: &Channel,
    queue: &str,
    prefetch: u16,
) -> Result<(String, lapin::Consumer), BrokerError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("taskmill-{queue}-{}", uuid::Uuid::new_v4());
    let stream = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((tag, stream))
}

/// Decodes a delivery with the protocol's checks (content type, size, schema): what
/// [`Consumer::decode`] does, for work that decodes later, away from its consumer.
pub(crate) fn decode<T: Incoming>(delivery: &Delivery, max_bytes: usize) -> Result<T, DecodeError> {
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|s| s.as_str());
    protocol::decode_incoming(&delivery.data, content_type, max_bytes)
}
