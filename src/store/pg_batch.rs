//! PostgreSQL forms of the batch statements: the batch travels as array parameters
//! (`= ANY($1)`, `unnest(...)`), so each statement has one fixed text whatever the
//! batch size. sqlx then parses and plans it once per connection, where an `IN` list,
//! a `CASE` or a `VALUES` list whose length changes from batch to batch is parsed and
//! planned again every time — on a small machine that was most of PostgreSQL's work
//! per task. SQLite, which has no arrays and no planning cost worth saving, keeps the
//! portable forms, written beside the callers of these.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{extension::postgres::PgFunc, Expr, ExprTrait, IntoIden, SimpleExpr};
use sea_orm::{DatabaseBackend, Statement, Value};

use super::rows::{NewTask, TaskOutcome, Transition};

/// `column IN (values)` — on PostgreSQL `column = ANY($1)`, one array parameter.
pub(super) fn one_of<C, T>(backend: DatabaseBackend, column: C, values: Vec<T>) -> SimpleExpr
where
    C: IntoIden + Copy,
    T: Into<Value>,
    Vec<T>: Into<Value>,
{
    let column = Expr::col(column);
    if backend == DatabaseBackend::Postgres {
        column.eq(PgFunc::any(Expr::val(values)))
    } else {
        column.is_in(values)
    }
}

/// Inserts the task rows of one or more jobs from arrays of job ids, ordinals, types
/// and payloads; rows whose ordinal exists are skipped. Returns `(id, job_id,
/// ordinal)` of the inserted rows.
pub(super) fn insert_tasks(jobs: &[(&str, &[NewTask])], now: DateTime<Utc>) -> Statement {
    const SQL: &str = r#"
        INSERT INTO tasks (job_id, ordinal, "type", payload, status, attempts, deliveries,
                           version, created_at, updated_at)
        SELECT new.job_id, new.ordinal, new.type, new.payload, 'pending', 0, 0, 0, $1, $1
        FROM unnest($2::text[], $3::int[], $4::text[], $5::jsonb[])
            AS new(job_id, ordinal, type, payload)
        ON CONFLICT (job_id, ordinal) DO NOTHING
        RETURNING id, job_id, ordinal"#;
    let tasks = || {
        jobs.iter()
            .flat_map(|&(job_id, tasks)| tasks.iter().map(move |t| (job_id, t)))
    };
    let job_ids: Vec<String> = tasks().map(|(job_id, _)| job_id.to_owned()).collect();
    let ordinals: Vec<i32> = tasks().map(|(_, t)| t.ordinal).collect();
    let types: Vec<String> = tasks().map(|(_, t)| t.task_type.clone()).collect();
    let payloads: Vec<serde_json::Value> = tasks().map(|(_, t)| t.payload.clone()).collect();
    Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        SQL,
        [
            now.into(),
            job_ids.into(),
            ordinals.into(),
            types.into(),
            payloads.into(),
        ],
    )
}

/// Moves each running attempt of the batch to its outcome (`done` + result, or
/// `failed`/`retrying` + info) in one statement. Returns the ids moved; an attempt no
/// longer running (a duplicate, a cancelled task, a task a later run reset) is not.
pub(super) fn finish_tasks(transitions: &[Transition], now: DateTime<Utc>) -> Statement {
    const SQL: &str = r#"
        UPDATE tasks AS t SET
            status = o.status,
            result = CASE WHEN o.status = 'done' THEN o.result ELSE t.result END,
            info = CASE WHEN o.status = 'done' THEN t.info ELSE o.info END,
            finished_at = CASE WHEN o.status IN ('done', 'failed') THEN $1 END,
            lease_until = NULL,
            version = t.version + 1,
            updated_at = $1
        FROM unnest($2::bigint[], $3::int[], $4::text[], $5::jsonb[], $6::text[], $7::int[])
            AS o(id, attempt, status, result, info, run)
        WHERE t.id = o.id AND t.status = 'running' AND t.attempts = o.attempt
            AND t.run <= o.run
        RETURNING t.id"#;
    let ids: Vec<i64> = transitions.iter().map(|t| t.task_id).collect();
    let attempts: Vec<i32> = transitions.iter().map(|t| t.attempt).collect();
    let runs: Vec<i32> = transitions.iter().map(|t| t.run).collect();
    let statuses: Vec<String> = transitions
        .iter()
        .map(|t| t.outcome.status().as_str().to_owned())
        .collect();
    // Arrays cannot hold SQL NULLs here; the CASEs above ignore the filler.
    let (results, infos): (Vec<serde_json::Value>, Vec<String>) = transitions
        .iter()
        .map(|t| match &t.outcome {
            TaskOutcome::Done(result) => (result.clone(), String::new()),
            TaskOutcome::Failed(info) | TaskOutcome::Retrying(info) => {
                (serde_json::Value::Null, info.clone())
            }
        })
        .unzip();
    Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        SQL,
        [
            now.into(),
            ids.into(),
            attempts.into(),
            statuses.into(),
            results.into(),
            infos.into(),
            runs.into(),
        ],
    )
}
