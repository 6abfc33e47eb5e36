//! SeaORM entities for taskmill's tables: `jobs`, `tasks`, `job_parts` (a job sent
//! in parts), the `job_events` and `job_requests` outboxes, `leases`, `pools`,
//! `removed_jobs` (what retention removed) and `schedules` (periodic jobs).
//!
//! Only the shape of the rows lives here; every query and state change lives in
//! `taskmill::store`, so that the dangerous parts are written once.

pub mod job;
pub mod job_event;
pub mod job_part;
pub mod job_request;
pub mod lease;
pub mod pool;
pub mod removed_job;
pub mod schedule;
pub mod task;

pub mod prelude {
    pub use super::job::Entity as Job;
    pub use super::job_event::Entity as JobEvent;
    pub use super::job_part::Entity as JobPart;
    pub use super::job_request::Entity as JobRequest;
    pub use super::lease::Entity as Lease;
    pub use super::pool::Entity as Pool;
    pub use super::removed_job::Entity as RemovedJob;
    pub use super::schedule::Entity as Schedule;
    pub use super::task::Entity as Task;
}
