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
    let rows = insert_jobs_task_rows(db, backend, &[(job_id, tasks)], now).await?;
    Ok(rows
        .into_iter()
        .map(|(id, _, ordinal)| (id, ordinal))
        .collect())
}

/// [`insert_task_rows`] for the tasks of several jobs at once, `(job id, its tasks)`;
/// returns `(id, job id, ordinal)` of the rows it inserted: one statement.
pub(super) async fn insert_jobs_task_rows<C: ConnectionTrait>(
    db: &C,
    backend: DatabaseBackend,
    jobs: &[(&str, &[NewTask])],
    now: DateTime<Utc>,
) -> Result<Vec<(i64, String, i32)>, StoreError> {
    let rows = if backend == DatabaseBackend::Postgres {
        db.query_all_raw(pg_batch::insert_tasks(jobs, now)).await?
    } else {
        db.query_all(&insert_statement(jobs, now)).await?
    };
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get::<i64>("", "id")?,
                row.try_get::<String>("", "job_id")?,
                row.try_get::<i32>("", "ordinal")?,
            ))
        })
        .collect()
}

/// The portable form of [`insert_jobs_task_rows`]: one multi-row INSERT.
fn insert_statement(
    jobs: &[(&str, &[NewTask])],
    now: chrono::DateTime<Utc>,
) -> sea_orm::sea_query::InsertStatement {
    let tasks = jobs
        .iter()
        .flat_map(|&(job_id, tasks)| tasks.iter().map(move |new| (job_id, new)));
    let rows = tasks.map(|(job_id, new)| task::ActiveModel {
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
    insert.returning(Query::returning().columns([
        task::Column::Id,
        task::Column::JobId,
        task::Column::Ordinal,
    ]));
    insert
}
