//! A task: one unit of work of a job, with statuses
//! `pending` → `running` → `done` | `failed` (or `retrying` → `running` again, or `cancelled`).
//!
//! On PostgreSQL the table also has `filed_at`, its partition key (the job's creation
//! time, see migration 17): only the store's insert statements write it, and nothing
//! reads it as a field, so the model leaves it out.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "tasks")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub job_id: String,
    /// Position in the request's `tasks` array, unique within the job.
    pub ordinal: i32,
    #[sea_orm(column_name = "type")]
    pub task_type: String,
    pub payload: Json,
    pub status: String,
    /// Attempts started; a redelivery of the same attempt does not bump it.
    pub attempts: i32,
    /// Starts of the current attempt's handler: a task that keeps killing its worker
    /// fails once it passes the limit, instead of looping forever.
    pub deliveries: i32,
    /// The last error.
    pub info: Option<String>,
    pub result: Option<Json>,
    /// Bumped by every state change: lets readers ignore stale snapshots.
    pub version: i64,
    /// Token of the claim that holds the task: a retried claim whose first write
    /// landed recognises itself by it.
    pub claimed_by: Option<String>,
    pub lease_until: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub finished_at: Option<DateTimeUtc>,
    /// The backend an external task was handed to, and its id there.
    pub external_backend: Option<String>,
    pub external_id: Option<String>,
    /// The attempt that made the hand-off: only that attempt is synced.
    pub external_attempt: Option<i32>,
    /// The highest update id the backend reported: lower ones are stale.
    pub external_update_id: Option<i64>,
    /// When the syncer next asks the backend; cleared once the task leaves it.
    pub next_sync_at: Option<DateTimeUtc>,
    /// When the backend last answered for it, moving or not.
    pub last_poll_at: Option<DateTimeUtc>,
    /// When it last moved (a higher update id, or the hand-off).
    pub last_progress_at: Option<DateTimeUtc>,
    /// The job's run that last put the task back to `pending` (1 until a retry of the
    /// failed job does): a message of an earlier run claims and finishes nothing.
    pub run: i32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::job::Entity",
        from = "Column::JobId",
        to = "super::job::Column::Id"
    )]
    Job,
}

impl Related<super::job::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Job.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
