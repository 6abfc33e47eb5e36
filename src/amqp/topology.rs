//! Every exchange and queue name, and their idempotent declaration.
//!
//! Names all start with the configured prefix:
//!
//! | name | kind | what flows |
//! |---|---|---|
//! | `{p}.jobs` | topic exchange | job requests, routing key = job type |
//! | `{p}.intake` | queue, bound to `{p}.jobs` with `#` | job requests |
//! | `{p}.work.{pool}` | queue, bound to `{p}.delay.deliver` | task messages of one worker pool |
//! | `{p}.delay.level.{k}` (k = 00..31) | topic exchange and queue, TTL 2^k ms | retries waiting: the delay ladder |
//! | `{p}.delay.deliver` | topic exchange | retries whose wait is over, to their pool's work queue |
//! | `{p}.completion` | queue | task-finished events |
//! | `{p}.events` | topic exchange | job events, routing key `job.<outcome>.<job_id>` |
//! | `{p}.parking` | queue | messages that cannot be processed, with a reason header |
//!
//! Task messages and finished events go through the default exchange straight to their
//! queue, published `mandatory`, so a missing queue is an error, not a loss.
//!
//! **The delay ladder.** A retry waits `attempt × retry_delay_ms`, and producers choose
//! the delay, so one queue per wait length would let them grow the broker without
//! limit. Instead a fixed ladder of [`DELAY_LEVELS`] levels serves every wait of every
//! pool (the delayed delivery of NServiceBus): level k is a topic exchange and a queue
//! whose messages live 2^k ms. A retry's routing key spells its wait in binary, one word
//! per level from the highest down, then the pool (`0.….1.0.1.default`). It enters at
//! the level of its highest 1 digit; each level's exchange sends it to its queue when its digit is 1 (it
//! waits 2^k ms there, then dead-letters to the level below) or straight to the level
//! below when the digit is 0; below level 0, `{p}.delay.deliver` routes it to its pool's
//! work queue. Each level's queue holds messages of one TTL only, so they expire in
//! arrival order, and the wait is the sum of the powers of its 1 digits: exact, in at
//! most 32 hops, whatever delays producers choose.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use lapin::options::{
    BasicConsumeOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Consumer, ExchangeKind};

use crate::config::QueueType;
use crate::protocol::MAX_DELAY_MS;

/// Levels of the delay ladder, and so its queues: level k holds a message 2^k ms.
pub const DELAY_LEVELS: u32 = 32;
// The ladder spells every wait the protocol allows, and no more.
const _: () = assert!(MAX_DELAY_MS == (1 << DELAY_LEVELS) - 1);

/// The names of one deployment's exchanges and queues, all under one prefix, and their
/// declaration. Clones share what was declared.
#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    queue_type: QueueType,
    /// What this process has declared on its current connection: declaring is
    /// idempotent but costs round trips, so each is declared once per connection.
    declared: Arc<Mutex<HashSet<String>>>,
}

impl Topology {
    /// The names under `prefix`, whose queues are declared as `queue_type`.
    pub fn new(prefix: impl Into<String>, queue_type: QueueType) -> Self {
        Self {
            prefix: prefix.into(),
            queue_type,
            declared: Arc::default(),
        }
    }

    /// The prefix every name starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.jobs`: the topic exchange producers publish job requests to.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// `<prefix>.events`: the topic exchange job events are published to.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// `<prefix>.intake`: the queue of job requests the intake role consumes.
    pub fn intake_queue(&self) -> String {
        format!("{}.intake", self.prefix)
    }

    /// `<prefix>.work.<pool>`: the queue of one worker pool's task messages.
    pub fn work_queue(&self, pool: &str) -> String {
        format!("{}.work.{pool}", self.prefix)
    }

    /// The exchange and the queue of one level of the delay ladder (one name: the
    /// broker keeps exchanges and queues apart).
    pub fn delay_level(&self, level: u32) -> String {
        format!("{}.delay.level.{level:02}", self.prefix)
    }

    /// Where a message that waits `delay_ms` enters the ladder: the level of its
    /// highest 1 digit. The levels above would only pass it down, and every exchange a
    /// message crosses costs the broker a topic match of the whole key.
    pub fn delay_entry(&self, delay_ms: u64) -> String {
        let delay_ms = delay_ms.clamp(1, MAX_DELAY_MS);
        self.delay_level(63 - delay_ms.leading_zeros())
    }

    /// Where the ladder hands a message whose wait is over to its pool's work queue.
    pub fn delay_deliver_exchange(&self) -> String {
        format!("{}.delay.deliver", self.prefix)
    }

    /// The routing key of a message that waits `delay_ms` (at most [`MAX_DELAY_MS`])
    /// for `pool`: the wait's binary digits, highest level first, then the pool.
    pub fn delay_routing_key(delay_ms: u64, pool: &str) -> String {
        let delay_ms = delay_ms.min(MAX_DELAY_MS);
        let mut key = String::with_capacity(2 * DELAY_LEVELS as usize + pool.len());
        for level in (0..DELAY_LEVELS).rev() {
            key.push(if (delay_ms >> level) & 1 == 1 {
                '1'
            } else {
                '0'
            });
            key.push('.');
        }
        key.push_str(pool);
        key
    }

    /// A binding key that skips the digits of the levels above `level` and matches
    /// `digit` at `level`.
    fn level_binding(level: u32, digit: char) -> String {
        let skipped = (DELAY_LEVELS - 1 - level) as usize;
        format!("{}{digit}.#", "*.".repeat(skipped))
    }

    /// The binding of a pool's work queue to the delivery exchange: every digit, then
    /// exactly the pool's words (a topic `*` is one word, so pools cannot overlap).
    fn delivery_binding(pool: &str) -> String {
        format!("{}{pool}", "*.".repeat(DELAY_LEVELS as usize))
    }

    /// `<prefix>.completion`: the queue of finished events the completion role consumes.
    pub fn completion_queue(&self) -> String {
        format!("{}.completion", self.prefix)
    }

    /// `<prefix>.parking`: the parking lot.
    pub fn parking_queue(&self) -> String {
        format!("{}.parking", self.prefix)
    }

    /// A queue of one producer's own, for one job's event (a client watching its
    /// job).
    pub fn watch_queue(&self, job_id: &str) -> String {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        format!("{}.watch.{job_id}.{}", self.prefix, &tag[..8])
    }

    /// Declares a watch queue: durable (an event waits there through a broker
    /// restart), deleted by the broker once unused for `expires`, and bound to the
    /// events of `job_id`. Always classic: it is one producer's, not the deployment's.
    pub async fn declare_watch_queue(
        &self,
        channel: &Channel,
        queue: &str,
        job_id: &str,
        expires: std::time::Duration,
    ) -> Result<(), lapin::Error> {
        let mut args = FieldTable::default();
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(expires.as_millis() as i64),
        );
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                self.events_exchange().as_str().into(),
                Self::job_binding_key(job_id).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
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

    /// Every queue a deployment has whatever its pools: the core queues and the delay
    /// ladder (the work queues come on top, one per pool).
    pub fn fixed_queues(&self) -> Vec<String> {
        let mut queues = vec![
            self.intake_queue(),
            self.completion_queue(),
            self.parking_queue(),
        ];
        queues.extend((0..DELAY_LEVELS).map(|level| self.delay_level(level)));
        queues
    }

    /// Every exchange a deployment has.
    pub fn exchanges(&self) -> Vec<String> {
        let mut exchanges = vec![
            self.jobs_exchange(),
            self.events_exchange(),
            self.delay_deliver_exchange(),
        ];
        exchanges.extend((0..DELAY_LEVELS).map(|level| self.delay_level(level)));
        exchanges
    }

    /// Forgets what was declared: after a reconnect, or when a publish found a queue
    /// missing, everything is declared again.
    pub fn forget_declared(&self) {
        self.declared().clear();
    }

    fn declared(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // Only inserts and clears happen under the lock: a poisoned set is still whole.
        self.declared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_declared(&self, name: &str) -> bool {
        self.declared().contains(name)
    }

    fn mark_declared(&self, name: &str) {
        self.declared().insert(name.to_owned());
    }

    /// Declares the exchanges and the shared queues (intake, completion, parking).
    pub async fn declare_core(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for exchange in [
            self.jobs_exchange(),
            self.events_exchange(),
            self.delay_deliver_exchange(),
        ] {
            declare_exchange(channel, &exchange).await?;
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

    /// Declares a pool's work queue and binds it to the ladder's delivery exchange, so
    /// that retries whose wait is over reach it.
    pub async fn declare_work_queue(
        &self,
        channel: &Channel,
        pool: &str,
    ) -> Result<(), lapin::Error> {
        let queue = self.work_queue(pool);
        if self.is_declared(&queue) {
            return Ok(());
        }
        self.declare_queue(channel, &queue, FieldTable::default())
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                self.delay_deliver_exchange().as_str().into(),
                Self::delivery_binding(pool).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.mark_declared(&queue);
        Ok(())
    }

    /// The messages waiting in `pool`'s work queue, not counting those delivered and
    /// not yet acked, by a passive declare: on a missing queue the broker closes
    /// `channel`.
    pub async fn ready_messages(&self, channel: &Channel, pool: &str) -> Result<u32, lapin::Error> {
        ready_in(channel, &self.work_queue(pool)).await
    }

    /// Declares the delay ladder: per level, a topic exchange and a queue whose
    /// messages live 2^k ms and then dead-letter to the level below. Idempotent; done
    /// once per connection by each pod that sends retries.
    pub async fn declare_delay_ladder(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let ladder = format!("{} ladder", self.delay_level(DELAY_LEVELS - 1));
        if self.is_declared(&ladder) {
            return Ok(());
        }
        declare_exchange(channel, &self.delay_deliver_exchange()).await?;
        for level in 0..DELAY_LEVELS {
            declare_exchange(channel, &self.delay_level(level)).await?;
        }
        for level in 0..DELAY_LEVELS {
            let name = self.delay_level(level);
            let below = match level {
                0 => self.delay_deliver_exchange(),
                _ => self.delay_level(level - 1),
            };
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(1 << level));
            // No dead-letter routing key: the message keeps its own (digits and pool).
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(below.as_str())),
            );
            if self.queue_type == QueueType::Quorum {
                // Quorum queues dead-letter at most once unless told otherwise, and
                // at-least-once needs a full queue to reject publishes, not drop messages.
                args.insert(
                    "x-dead-letter-strategy".into(),
                    AMQPValue::LongString(LongString::from("at-least-once")),
                );
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString(LongString::from("reject-publish")),
                );
            }
            self.declare_queue(channel, &name, args).await?;
            channel
                .queue_bind(
                    name.as_str().into(),
                    name.as_str().into(),
                    Self::level_binding(level, '1').as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            channel
                .exchange_bind(
                    below.as_str().into(),
                    name.as_str().into(),
                    Self::level_binding(level, '0').as_str().into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        self.mark_declared(&ladder);
        Ok(())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        mut args: FieldTable,
    ) -> Result<(), lapin::Error> {
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
        Ok(())
    }
}

async fn declare_exchange(channel: &Channel, name: &str) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// The messages waiting in `queue`, not counting those delivered and not yet acked, by
/// a passive declare: on a missing queue the broker closes `channel`.
pub async fn ready_in(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    Ok(declare_passive(channel, queue).await?.message_count())
}

/// Declares `queue` passively: its ready messages and consumers if it exists; if not,
/// an error, and the broker closes `channel`.
pub async fn declare_passive(channel: &Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_spell_the_wait_in_binary() {
        let key = Topology::delay_routing_key(5, "default");
        let words: Vec<&str> = key.split('.').collect();
        assert_eq!(words.len(), DELAY_LEVELS as usize + 1);
        assert_eq!(&words[29..], ["1", "0", "1", "default"]);
        assert!(words[..29].iter().all(|w| *w == "0"));
        let max = Topology::delay_routing_key(u64::MAX, "p");
        assert!(max.split('.').take(32).all(|w| w == "1"));
    }

    #[test]
    fn a_wait_enters_at_its_highest_digit() {
        let topology = Topology::new("p", QueueType::Classic);
        assert_eq!(topology.delay_entry(1), "p.delay.level.00");
        assert_eq!(topology.delay_entry(100), "p.delay.level.06");
        assert_eq!(topology.delay_entry(128), "p.delay.level.07");
        assert_eq!(topology.delay_entry(0), "p.delay.level.00");
        assert_eq!(topology.delay_entry(u64::MAX), "p.delay.level.31");
    }

    #[test]
    fn each_level_reads_its_own_digit() {
        // Level k's binding skips the 31 - k words of the levels above it.
        assert_eq!(Topology::level_binding(31, '1'), "1.#");
        assert_eq!(
            Topology::level_binding(0, '0'),
            format!("{}0.#", "*.".repeat(31))
        );
        let key = Topology::delay_routing_key(1 << 7, "p");
        let words: Vec<&str> = key.split('.').collect();
        assert_eq!(words[(DELAY_LEVELS - 1 - 7) as usize], "1");
        assert_eq!(words.iter().filter(|w| **w == "1").count(), 1);
    }
}
