//! The AMQP plumbing every role shares: the supervised connection (`link`),
//! confirmed publishing ([`broker`]), the consumer every consuming role uses, coalesced acks, every queue and exchange name and
//! the delay ladder ([`topology`]), the parking lot ([`parking`]), task dispatch, and
//! job events with their outbox relay ([`events`]).

pub(crate) mod acks;
pub mod broker;
pub(crate) mod consumer;
pub(crate) mod dispatch;
pub mod events;
pub(crate) mod link;
pub mod parking;
pub mod topology;
