//! A job: one producer request, split into tasks, moving through stages
//! `formation` → `running` → `done` | `failed` | `cancelled`; a multi-stage job runs
//! its phases (`map` → `reduce` → `finalize`) while `running`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "jobs")]
pub struct Model {
    /// Producer-chosen (idempotency key) or generated.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    #[sea_orm(column_name = "type")]
    pub job_type: String,
    /// The worker pool (work queue) its tasks go to.
    pub queue: String,
    pub stage: String,
    pub params: Json,
    pub max_retries: i32,
    pub retry_delay_ms: i64,
    /// `fail_fast` (the first failed task fails the job) or `continue`.
    pub on_failure: String,
    pub task_count: i64,
    pub first_task_id: Option<i64>,
    pub done_count: i64,
    pub failed_count: i64,
    pub cancelled_count: i64,
    pub first_error: Option<String>,
    /// Where the job event also goes: `{"exchange": .., "routing_key": ..}`.
    pub on_complete: Option<Json>,
    /// Every task message has been published and confirmed at least once.
    pub tasks_published: bool,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub started_at: Option<DateTimeUtc>,
    pub finished_at: Option<DateTimeUtc>,
    /// SHA-256 of what the creating request asked for (all but `on_complete`): a second
    /// request with this id and another digest is refused. None for older rows.
    pub request_digest: Option<String>,
    /// How long one attempt of a task may run, when the request said.
    pub task_timeout_ms: Option<i64>,
    /// The job event carries the tasks' results (up to a cap), as the request asked.
    pub results_in_event: bool,
    /// The stages after the map stage, for a job type that has them: `{"reduce":
    /// {"task_type", "shards", "per_key"}, "finalize": {"task_type"}}`. None: one stage.
    pub stage_plan: Option<Json>,
    /// The stage of a multi-stage job while it runs: `map`, `reduce` or `finalize`.
    pub phase: Option<String>,
    /// The ordinal of the current stage's first task: earlier ordinals belong to
    /// earlier stages.
    pub phase_first_ordinal: i64,
    /// A multi-stage job's result: its finalizer's, else its reduce stage's merged.
    pub result: Option<Json>,
    /// A job sent in parts, once sealed: how many parts it has.
    pub sealed_parts: Option<i32>,
    /// A job sent in parts, once sealed: how many tasks it has.
    pub sealed_tasks: Option<i64>,
    /// Which run of the job this is: 1, then one more each time a failed job is
    /// retried.
    pub run: i32,
    /// The last ordinal whose task message a feeder published (confirmed) in the
    /// current phase or an earlier one; -1 for none. The next feeder starts after it.
    pub fed_through: i64,
    /// When the cleaner began removing the job's rows in batches (a job with more
    /// tasks than one short transaction deletes); `None` for every other job.
    pub removal_started_at: Option<DateTimeUtc>,
    /// On PostgreSQL: its tasks were set aside in the partition of kept tasks, so
    /// that the partition of its creation could be dropped without them.
    pub tasks_kept: bool,
    /// A scheduled job's start: its request's `run_at`.
    pub run_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::task::Entity")]
    Task,
}

impl Related<super::task::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Task.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
