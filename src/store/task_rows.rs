//! Inserting task rows: the one statement every path that makes tasks uses (a job's
//! formation, a group of small jobs, a multi-stage job's next phase).

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{ActiveValue::Set, ConnectionTrait, DatabaseBackend, EntityTrait, QueryTrait};

use super::error::StoreError;
use super::pg_batch;
use super::rows::NewTask;
use crate::state::TaskStatus;
use entity::task;

/// Inserts task rows (skipping ordinals that exist) and returns `(id, ordinal)` of
/// those it inserted: one statement.
pub(super) async fn insert_task_rows<C: ConnectionTrait>(
    db: &C,
    backend: DatabaseBackend,
    job_id: &str,
    tasks: &[NewTask],
    now: DateTime<Utc>,
) -> Result<Vec<(i64, i32)>, StoreError> {
    let rows = if backend == DatabaseBackend::Postgres {
        db.query_all_raw(pg_batch::insert_tasks(job_id, tasks, now))
            .await?
    } else {
        db.query_all(&insert_statement(job_id, tasks, now)).await?
    };
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get::<i64>("", "id")?,
                row.try_get::<i32>("", "ordinal")?,
            ))
        })
        .collect()
}

/// The portable form of [`insert_task_rows`]: one multi-row INSERT.
fn insert_statement(
    job_id: &str,
    tasks: &[NewTask],
    now: chrono::DateTime<Utc>,
) -> sea_orm::sea_query::InsertStatement {
    let rows = tasks.iter().map(|new| task::ActiveModel {
        job_id: Set(job_id.to_owned()),
        ordinal: Set(new.ordinal),
        task_type: Set(new.task_type.clone()),
        payload: Set(new.payload.clone()),
        status: Set(TaskStatus::Pending.as_str().to_owned()),
        attempts: Set(0),
        deliveries: Set(0),
        info: Set(None),
        result: Set(None),
        version: Set(0),
        claimed_by: Set(None),
        lease_until: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        finished_at: Set(None),
        ..Default::default()
    });
    let mut insert = task::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::columns([task::Column::JobId, task::Column::Ordinal])
                .do_nothing()
                .to_owned(),
        )
        .into_query();
    insert.returning(Query::returning().columns([task::Column::Id, task::Column::Ordinal]));
    insert
}
