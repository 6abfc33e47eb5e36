//! The AMQP plumbing every role shares, knowing nothing of jobs or tables: the
//! supervised connection (`link`), confirmed publishing ([`broker`]), the consumer
//! every consuming role uses, coalesced acks, every queue and exchange name and the
//! delay ladder ([`topology`]), and the parking lot ([`parking`]).

pub(crate) mod acks;
pub mod broker;
pub(crate) mod consumer;
pub(crate) mod link;
pub mod parking;
pub mod topology;
