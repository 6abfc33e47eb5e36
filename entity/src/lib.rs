//! SeaORM entities for taskmill's tables: `jobs`, `tasks`, the `job_events` outbox and
//! `leases` and `pools`.
//!
//! Only the shape of the rows lives here; every query and state change lives in
//! `taskmill::store`, so that the dangerous parts are written once.

pub mod job;
pub mod job_event;
pub mod lease;
pub mod pool;
pub mod task;

pub mod prelude {
    pub use super::job::Entity as Job;
    pub use super::job_event::Entity as JobEvent;
    pub use super::lease::Entity as Lease;
    pub use super::pool::Entity as Pool;
    pub use super::task::Entity as Task;
}
