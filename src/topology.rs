//! Every exchange and queue name, and their idempotent declaration.
//!
//! Names all start with the configured prefix:
//!
//! | name | kind | what flows |
//! |---|---|---|
//! | `{p}.jobs` | topic exchange | job requests, routing key = job type |
//! | `{p}.intake` | queue, bound to `{p}.jobs` with `#` | job requests |
//! | `{p}.work.{pool}` | queue | task messages of one worker pool |
//! | `{p}.delay.{pool}.{ms}ms` | queue, TTL `ms`, dead-letters to `{p}.work.{pool}` | retries waiting |
//! | `{p}.completion` | queue | task-finished events |
//! | `{p}.events` | topic exchange | job events, routing key `job.<outcome>.<job_id>` |
//! | `{p}.parking` | queue | messages that cannot be processed, with a reason header |
//!
//! Task messages, retries and finished events go through the default exchange straight
//! to their queue, published `mandatory`, so a missing queue is an error, not a loss.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Consumer, ExchangeKind};

use crate::config::QueueType;

#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    queue_type: QueueType,
    /// Queues this process has declared on its current connection: declaring is
    /// idempotent but costs a round trip, so each is declared once per connection.
    declared: Arc<Mutex<HashSet<String>>>,
}

impl Topology {
    pub fn new(prefix: impl Into<String>, queue_type: QueueType) -> Self {
        Self {
            prefix: prefix.into(),
            queue_type,
            declared: Arc::default(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn intake_queue(&self) -> String {
        format!("{}.intake", self.prefix)
    }

    pub fn work_queue(&self, pool: &str) -> String {
        format!("{}.work.{pool}", self.prefix)
    }

    pub fn delay_queue(&self, pool: &str, delay_ms: i64) -> String {
        format!("{}.delay.{pool}.{delay_ms}ms", self.prefix)
    }

    pub fn completion_queue(&self) -> String {
        format!("{}.completion", self.prefix)
    }

    pub fn parking_queue(&self) -> String {
        format!("{}.parking", self.prefix)
    }

    /// Routing key of a job event on the events exchange.
    pub fn event_routing_key(kind: &str, job_id: &str) -> String {
        format!("{kind}.{job_id}")
    }

    /// Binding key that matches every event of one job.
    pub fn job_binding_key(job_id: &str) -> String {
        format!("job.*.{job_id}")
    }

    /// A private, auto-deleted queue bound to the events exchange with `binding_key`
    /// (`job.#` for every event, [`Self::job_binding_key`] for one job's), consumed
    /// without acks: listening to job events, for producers and tools.
    pub async fn subscribe_events(
        &self,
        channel: &Channel,
        binding_key: &str,
    ) -> Result<Consumer, lapin::Error> {
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                self.events_exchange().as_str().into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// Forgets what was declared: after a reconnect everything is declared again.
    pub fn forget_declared(&self) {
        self.declared.lock().expect("declared set poisoned").clear();
    }

    /// Declares the exchanges and the shared queues (intake, completion, parking).
    pub async fn declare_core(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for exchange in [self.jobs_exchange(), self.events_exchange()] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        for queue in [
            self.intake_queue(),
            self.completion_queue(),
            self.parking_queue(),
        ] {
            self.declare_queue(channel, &queue, FieldTable::default())
                .await?;
        }
        channel
            .queue_bind(
                self.intake_queue().as_str().into(),
                self.jobs_exchange().as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    pub async fn declare_work_queue(
        &self,
        channel: &Channel,
        pool: &str,
    ) -> Result<(), lapin::Error> {
        self.declare_queue(channel, &self.work_queue(pool), FieldTable::default())
            .await
    }

    /// The delay queue for one wait length: a retry sits there for `delay_ms`, then
    /// the broker dead-letters it back to the pool's work queue. One queue per length,
    /// never per-message TTLs: RabbitMQ expires messages only at the head of a queue.
    pub async fn declare_delay_queue(
        &self,
        channel: &Channel,
        pool: &str,
        delay_ms: i64,
    ) -> Result<String, lapin::Error> {
        let name = self.delay_queue(pool, delay_ms);
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ms));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(self.work_queue(pool).as_str())),
        );
        self.declare_queue(channel, &name, args).await?;
        Ok(name)
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        mut args: FieldTable,
    ) -> Result<(), lapin::Error> {
        if self
            .declared
            .lock()
            .expect("declared set poisoned")
            .contains(name)
        {
            return Ok(());
        }
        if self.queue_type == QueueType::Quorum {
            args.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        self.declared
            .lock()
            .expect("declared set poisoned")
            .insert(name.to_owned());
        Ok(())
    }
}
