//! Every exchange and queue name, and their idempotent declaration.
//!
//! Names all start with the configured prefix:
//!
//! | name | kind | what flows |
//! |---|---|---|
//! | `{p}.jobs` | topic exchange | job requests, routing key = job type |
//! | `{p}.intake` | queue, bound to `{p}.jobs` with `#` | job requests |
//! | `{p}.work.{pool}` | queue, bound to `{p}.delay.deliver` | task messages of one worker pool |
//! | `{p}.delay.{k}` (k = 0..9) | topic exchange | retries routed by their digit at level k: the delay ladder |
//! | `{p}.delay.{k}.{d}` (d = 1..9, 85 in all) | queue, TTL d × 10^k ms | retries waiting |
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
//! limit. Instead a fixed ladder serves every wait of every pool (the delayed delivery of
//! NServiceBus, in decimal): one level per decimal digit of the longest wait, and at
//! level k one queue per nonzero digit d, whose messages live d × 10^k ms. A retry's
//! routing key spells its wait in decimal, one word per level from the highest down,
//! the zeros after its last nonzero digit spelled `_`, then the pool
//! (`0.….0.1.5._._._.default` for 15 s). It enters at the exchange of its highest
//! nonzero digit's level and waits in the queue of each nonzero digit in turn: level k's
//! exchange routes a digit d to its queue, which dead-letters the message to the
//! exchange of level k − 1 when it expires; a 0 to the exchange of level k − 1 at once;
//! a `_` to `{p}.delay.deliver`, which routes it to its pool's work queue. Each queue
//! holds messages of one TTL only, so they expire in arrival order. Every queue a retry
//! crosses costs the broker a persistent write and a dead-lettering, most of what a
//! retry costs, so a wait is rounded to its [`DELAY_HOPS`] leading nonzero digits: a
//! retry crosses at most three queues (one for a round wait such as 100 ms or 5 s);
//! waits under a second and waits of at most three nonzero digits are exact, the others
//! off by less than 0.5%.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::future::try_join_all;
use lapin::options::{
    BasicConsumeOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Consumer, ExchangeKind};

use crate::config::QueueType;
use crate::protocol::MAX_DELAY_MS;

/// Levels of the delay ladder: the decimal digits of the longest wait.
pub const DELAY_LEVELS: u32 = 10;
// The ladder spells every wait the protocol allows, and its top level is used.
const _: () =
    assert!(10u64.pow(DELAY_LEVELS - 1) <= MAX_DELAY_MS && MAX_DELAY_MS < 10u64.pow(DELAY_LEVELS));

/// Queues a retry crosses at most: a wait is rounded to this many leading nonzero
/// digits.
pub const DELAY_HOPS: usize = 3;

/// The queues of the delay ladder as (level, digit): each nonzero digit of each level
/// whose wait fits under [`MAX_DELAY_MS`].
fn delay_digits() -> impl Iterator<Item = (u32, u64)> {
    (0..DELAY_LEVELS)
        .flat_map(|level| (1..10).map(move |digit| (level, digit)))
        .filter(|&(level, digit)| digit * 10u64.pow(level) <= MAX_DELAY_MS)
}

/// The decimal digit of `wait` at `level`.
fn digit_at(wait: u64, level: u32) -> u64 {
    wait / 10u64.pow(level) % 10
}

/// The wait the ladder spells for `delay_ms`: at most [`MAX_DELAY_MS`], rounded to its
/// [`DELAY_HOPS`] leading nonzero decimal digits (to the nearest, or down where up would
/// pass the longest wait). Rounding never adds a nonzero digit: a carry turns a 9 into
/// a 0.
pub fn ladder_wait(delay_ms: u64) -> u64 {
    let delay_ms = delay_ms.min(MAX_DELAY_MS);
    let mut nonzero = (0..DELAY_LEVELS)
        .rev()
        .filter(|&level| digit_at(delay_ms, level) != 0);
    let Some(last_kept) = nonzero.nth(DELAY_HOPS - 1) else {
        return delay_ms;
    };
    if nonzero.next().is_none() {
        return delay_ms;
    }
    let unit = 10u64.pow(last_kept);
    let nearest = (delay_ms + unit / 2) / unit * unit;
    if nearest <= MAX_DELAY_MS {
        nearest
    } else {
        delay_ms / unit * unit
    }
}

/// The word of a digit with no nonzero digit at or below it in a delay routing key:
/// the exchange of its level sends the message on to the delivery exchange at once,
/// not exchange by exchange through the trailing zeros.
const DONE: &str = "_";

/// Where a retry enters the delay ladder, and the routing key that spells its wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayRoute {
    /// The exchange of the level of the wait's highest nonzero digit.
    pub exchange: String,
    /// The wait's decimal digits, highest level first, then the pool.
    pub routing_key: String,
}

/// The names of one deployment's exchanges and queues, all under one prefix, and their
/// declaration. Clones share what was declared.
#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    queue_type: QueueType,
    /// What this process has declared on its current connection: declaring is
    /// idempotent but costs round trips, so each is declared once per connection.
    declared: Arc<Mutex<HashSet<String>>>,
    /// The parking lot's bound in messages (`TASKMILL_PARKING_MAX`).
    parking_max: u32,
}

impl Topology {
    /// The names under `prefix`, whose queues are declared as `queue_type`.
    pub fn new(prefix: impl Into<String>, queue_type: QueueType) -> Self {
        Self {
            prefix: prefix.into(),
            queue_type,
            declared: Arc::default(),
            parking_max: crate::config::DEFAULT_PARKING_MAX,
        }
    }

    /// These names with a parking lot bound to `max` messages.
    pub fn with_parking_max(self, max: u32) -> Self {
        Self {
            parking_max: max,
            ..self
        }
    }

    /// The parking lot's bound in messages.
    pub fn parking_max(&self) -> u32 {
        self.parking_max
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

    /// `<prefix>.delay.<level>`: the exchange that routes a waiting message by its word
    /// at `level`: to the queue of its digit, on an inner 0 to the exchange of the level
    /// below, on a `_` to the delivery exchange.
    fn delay_exchange(&self, level: u32) -> String {
        format!("{}.delay.{level}", self.prefix)
    }

    /// `<prefix>.delay.<level>.<digit>`: the queue where a message waits
    /// `digit` × 10^`level` ms.
    fn delay_queue(&self, level: u32, digit: u64) -> String {
        format!("{}.delay.{level}.{digit}", self.prefix)
    }

    /// Every queue of the delay ladder, 85: digits 1 to 9 at levels 0 to 8, and 1 to 4
    /// at level 9 (4 × 10^9 ms is the largest that fits under [`MAX_DELAY_MS`]).
    pub fn delay_queues(&self) -> Vec<String> {
        delay_digits()
            .map(|(level, digit)| self.delay_queue(level, digit))
            .collect()
    }

    /// Where a message that waits `delay_ms` for `pool` is published, and with which
    /// routing key: the wait is [`ladder_wait`], entering at the level of its highest
    /// nonzero digit (a wait of 0 goes straight through to the pool).
    pub fn delay_route(&self, delay_ms: u64, pool: &str) -> DelayRoute {
        let wait = ladder_wait(delay_ms);
        let mut routing_key = String::with_capacity(2 * DELAY_LEVELS as usize + pool.len());
        for level in (0..DELAY_LEVELS).rev() {
            if wait.is_multiple_of(10u64.pow(level + 1)) {
                routing_key.push_str(DONE);
            } else {
                routing_key.push_str(&digit_at(wait, level).to_string());
            }
            routing_key.push('.');
        }
        routing_key.push_str(pool);
        DelayRoute {
            exchange: self.delay_exchange(wait.checked_ilog10().unwrap_or(0)),
            routing_key,
        }
    }

    /// Where the ladder hands a message whose wait is over to its pool's work queue.
    pub fn delay_deliver_exchange(&self) -> String {
        format!("{}.delay.deliver", self.prefix)
    }

    /// A binding key on the exchange of `level`: any words at the levels above it
    /// (already waited), `word` at `level`, then anything (the levels below, the pool).
    fn ladder_binding(level: u32, word: &str) -> String {
        format!(
            "{}{word}.#",
            "*.".repeat((DELAY_LEVELS - 1 - level) as usize)
        )
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
        queues.extend(self.delay_queues());
        queues
    }

    /// Every exchange a deployment has.
    pub fn exchanges(&self) -> Vec<String> {
        let mut exchanges = vec![
            self.jobs_exchange(),
            self.events_exchange(),
            self.delay_deliver_exchange(),
        ];
        exchanges.extend((0..DELAY_LEVELS).map(|level| self.delay_exchange(level)));
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

    /// Declares the delay ladder: per level a topic exchange, and per nonzero digit a
    /// queue whose messages live digit × 10^level ms and then dead-letter to the
    /// exchange of the level below. Idempotent; done once per connection by each pod
    /// that sends retries, its 200-odd declarations pipelined on `channel`.
    pub async fn declare_delay_ladder(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let ladder = format!("{} ladder", self.delay_exchange(DELAY_LEVELS - 1));
        if self.is_declared(&ladder) {
            return Ok(());
        }
        let exchanges: Vec<String> = std::iter::once(self.delay_deliver_exchange())
            .chain((0..DELAY_LEVELS).map(|level| self.delay_exchange(level)))
            .collect();
        try_join_all(exchanges.iter().map(|name| declare_exchange(channel, name))).await?;
        try_join_all(delay_digits().map(|(level, digit)| {
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt((digit * 10u64.pow(level)) as i64),
            );
            // No dead-letter routing key: the message keeps its own (digits and pool).
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(self.below(level).as_str())),
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
            let name = self.delay_queue(level, digit);
            async move { self.declare_queue(channel, &name, args).await }
        }))
        .await?;
        let (to_queues, onward) = self.ladder_bindings();
        try_join_all(to_queues.iter().map(|binding| {
            channel.queue_bind(
                binding.destination.as_str().into(),
                binding.source.as_str().into(),
                binding.key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
        }))
        .await?;
        try_join_all(onward.iter().map(|binding| {
            channel.exchange_bind(
                binding.destination.as_str().into(),
                binding.source.as_str().into(),
                binding.key.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
        }))
        .await?;
        self.mark_declared(&ladder);
        Ok(())
    }

    /// The ladder's bindings: each level's exchange to the queue of each of its
    /// digits, to the exchange of the level below on an inner 0, and to the delivery
    /// exchange on a `_` (no nonzero digit left). Exactly one matches a message.
    fn ladder_bindings(&self) -> (Vec<Binding>, Vec<Binding>) {
        let mut to_queues = Vec::new();
        let mut onward = Vec::new();
        for level in 0..DELAY_LEVELS {
            let exchange = self.delay_exchange(level);
            for (_, digit) in delay_digits().filter(|&(at, _)| at == level) {
                to_queues.push(Binding {
                    destination: self.delay_queue(level, digit),
                    source: exchange.clone(),
                    key: Self::ladder_binding(level, &digit.to_string()),
                });
            }
            onward.push(Binding {
                destination: self.below(level),
                source: exchange.clone(),
                key: Self::ladder_binding(level, "0"),
            });
            onward.push(Binding {
                destination: self.delay_deliver_exchange(),
                source: exchange,
                key: Self::ladder_binding(level, DONE),
            });
        }
        (to_queues, onward)
    }

    /// Where a message goes on from `level`: the exchange of the level below, or
    /// below level 0 the delivery exchange.
    fn below(&self, level: u32) -> String {
        match level {
            0 => self.delay_deliver_exchange(),
            _ => self.delay_exchange(level - 1),
        }
    }

    /// Messages in the parking lot now, declaring it if it is missing (a declare,
    /// unlike a passive one, leaves the channel open either way).
    pub async fn parked_now(&self, channel: &Channel) -> Result<u32, lapin::Error> {
        let lot = self
            .declare_queue(channel, &self.parking_queue(), FieldTable::default())
            .await?;
        Ok(lot.message_count())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        mut args: FieldTable,
    ) -> Result<lapin::Queue, lapin::Error> {
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
            .await
    }
}

/// A binding of a queue or an exchange (`destination`) to an exchange (`source`).
struct Binding {
    destination: String,
    source: String,
    key: String,
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

    /// Topic matching as the broker does it, for the keys and bindings of the ladder:
    /// `*` is one word, `#` any number.
    fn matches(binding: &str, key: &str) -> bool {
        fn go(pattern: &[&str], words: &[&str]) -> bool {
            match (pattern.first(), words.first()) {
                (None, None) => true,
                (Some(&"#"), _) => {
                    go(&pattern[1..], words) || (!words.is_empty() && go(pattern, &words[1..]))
                }
                (Some(p), Some(w)) if *p == "*" || p == w => go(&pattern[1..], &words[1..]),
                _ => false,
            }
        }
        let pattern: Vec<&str> = binding.split('.').collect();
        let words: Vec<&str> = key.split('.').collect();
        go(&pattern, &words)
    }

    /// The queues a message crosses from its entry to the delivery exchange, and the
    /// exchanges that route it, following the bindings and each queue's dead-letter
    /// exchange.
    fn walk(topology: &Topology, route: &DelayRoute) -> (Vec<(u32, u64)>, Vec<String>) {
        let (to_queues, onward) = topology.ladder_bindings();
        let mut exchange = route.exchange.clone();
        let mut crossed = Vec::new();
        let mut routed_by = vec![exchange.clone()];
        while exchange != topology.delay_deliver_exchange() {
            let matching = |bindings: &[Binding]| -> Vec<String> {
                bindings
                    .iter()
                    .filter(|b| b.source == exchange && matches(&b.key, &route.routing_key))
                    .map(|b| b.destination.clone())
                    .collect()
            };
            let (queues, on) = (matching(&to_queues), matching(&onward));
            assert_eq!(
                queues.len() + on.len(),
                1,
                "one binding of {exchange} matches {}",
                route.routing_key
            );
            exchange = match on.first() {
                Some(next) => next.clone(),
                None => {
                    let (level, digit) = delay_digits()
                        .find(|&(level, digit)| topology.delay_queue(level, digit) == queues[0])
                        .unwrap();
                    crossed.push((level, digit));
                    topology.below(level)
                }
            };
            routed_by.push(exchange.clone());
        }
        (crossed, routed_by)
    }

    #[test]
    fn routing_keys_spell_the_wait_in_decimal() {
        let topology = Topology::new("p", QueueType::Classic);
        let route = topology.delay_route(5_000, "default");
        assert_eq!(route.exchange, "p.delay.3");
        assert_eq!(route.routing_key, "0.0.0.0.0.0.5._._._.default");
        assert_eq!(
            topology.delay_route(1_023, "p").routing_key,
            "0.0.0.0.0.0.1.0.2.3.p"
        );
        assert_eq!(
            topology.delay_route(u64::MAX, "a.b").routing_key,
            "4.2.9._._._._._._._.a.b"
        );
        assert_eq!(
            topology.delay_route(0, "p").routing_key,
            "_._._._._._._._._._.p"
        );
    }

    #[test]
    fn a_wait_enters_at_its_highest_digit() {
        let topology = Topology::new("p", QueueType::Classic);
        let entry = |wait| topology.delay_route(wait, "p").exchange;
        assert_eq!(entry(0), "p.delay.0");
        assert_eq!(entry(1), "p.delay.0");
        assert_eq!(entry(100), "p.delay.2");
        assert_eq!(entry(999), "p.delay.2");
        // Rounded up to 10,000.
        assert_eq!(entry(9_999), "p.delay.4");
        assert_eq!(entry(u64::MAX), "p.delay.9");
    }

    #[test]
    fn waits_keep_three_digits() {
        for exact in [
            1, 7, 100, 333, 999, 1_000, 1_023, 4_097, 5_000, 15_000, 2_000_300,
        ] {
            assert_eq!(ladder_wait(exact), exact);
        }
        assert_eq!(ladder_wait(1_115), 1_120);
        assert_eq!(ladder_wait(12_345), 12_300);
        assert_eq!(ladder_wait(19_995), 20_000);
        assert_eq!(ladder_wait(u64::MAX), 4_290_000_000);
        let mut wait = 1;
        while wait <= MAX_DELAY_MS {
            for wait in [wait, wait + 1, wait * 3 / 2 + 7] {
                let wait = wait.min(MAX_DELAY_MS);
                let rounded = ladder_wait(wait);
                assert!(rounded <= MAX_DELAY_MS);
                assert!(rounded.abs_diff(wait) * 200 <= wait, "{wait} → {rounded}");
                let digits = (0..DELAY_LEVELS)
                    .filter(|&level| digit_at(rounded, level) != 0)
                    .count();
                assert!(digits <= DELAY_HOPS, "{wait} → {rounded}");
            }
            wait = wait * 7 / 5 + 3;
        }
    }

    #[test]
    fn the_ladder_has_its_documented_queues() {
        const DELAY_QUEUES: usize = 85;
        let topology = Topology::new("p", QueueType::Classic);
        assert_eq!(topology.delay_queues().len(), DELAY_QUEUES);
        assert_eq!(topology.delay_queue(3, 5), "p.delay.3.5");
        assert_eq!(topology.fixed_queues().len(), 3 + DELAY_QUEUES);
    }

    #[test]
    fn a_message_waits_in_the_queue_of_each_nonzero_digit() {
        let topology = Topology::new("p", QueueType::Classic);
        for (wait, crossed) in [
            (0, vec![]),
            (1, vec![(0, 1)]),
            (100, vec![(2, 1)]),
            (5_000, vec![(3, 5)]),
            (15_000, vec![(4, 1), (3, 5)]),
            (1_023, vec![(3, 1), (1, 2), (0, 3)]),
            (4_000_000_009, vec![(9, 4), (0, 9)]),
        ] {
            assert_eq!(walk(&topology, &topology.delay_route(wait, "p")).0, crossed);
        }
        // After its last queue a round wait goes on to the delivery exchange at once.
        assert_eq!(
            walk(&topology, &topology.delay_route(5_000, "p")).1,
            ["p.delay.3", "p.delay.2", "p.delay.deliver"]
        );
        let mut wait = 1;
        while wait <= MAX_DELAY_MS {
            let (crossed, _) = walk(&topology, &topology.delay_route(wait, "a.b"));
            let waited: u64 = crossed
                .iter()
                .map(|&(level, digit)| digit * 10u64.pow(level))
                .sum();
            assert_eq!(waited, ladder_wait(wait));
            assert!(crossed.len() <= DELAY_HOPS);
            wait = wait * 3 / 2 + 1;
        }
    }
}
