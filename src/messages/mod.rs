//! The messages taskmill sends, a floor above both the database and the broker: task
//! messages into a pool's work queue or the delay ladder, the finished notes the
//! completion role consumes (`tasks`), and job events with their outbox relay
//! ([`events`]). Each reads rows from `store` and publishes through `amqp`, which know
//! nothing of each other.

pub mod events;
pub(crate) mod tasks;

pub(crate) use tasks::{send_finished, send_retry, send_task, settings_of, since_sent};
