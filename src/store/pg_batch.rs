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
/// and payloads, each filed in its job's partition (`filed_at`: the job's creation);
/// rows whose ordinal exists are skipped. Returns `(id, job_id, ordinal)` of the
/// inserted rows.
pub(super) fn insert_tasks(jobs: &[(&str, &[NewTask])], now: DateTime<Utc>) -> Statement {
    const SQL: &str = r#"
        INSERT INTO tasks (job_id, ordinal, "type", payload, status, attempts, deliveries,
                           version, created_at, updated_at, filed_at)
        SELECT new.job_id, new.ordinal, new.type, new.payload, 'pending', 0, 0, 0, $1, $1,
               CASE WHEN j.tasks_kept THEN '1970-01-01 00:00:00+00' ELSE j.created_at END
        FROM unnest($2::text[], $3::int[], $4::text[], $5::jsonb[]) WITH ORDINALITY
            AS new(job_id, ordinal, type, payload, n)
            JOIN jobs j ON j.id = new.job_id
        -- Ids in the order given, as without the join.
        ORDER BY new.n
        ON CONFLICT (job_id, ordinal, filed_at) DO NOTHING
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

/// Adds each job's tally of terminal outcomes, `(job id, done, failed, first error)`,
/// to its counters, for the jobs that are forming or running, in one statement; a
/// first error is kept only where the job has none yet. Returns the jobs' rows as
/// changed.
pub(super) fn count_into_jobs(tallies: &[(&str, i64, i64, Option<&str>)]) -> Statement {
    const SQL: &str = r#"
        UPDATE jobs AS j SET
            done_count = j.done_count + c.done,
            failed_count = j.failed_count + c.failed,
            first_error = CASE WHEN c.has_error THEN COALESCE(j.first_error, c.first_error)
                               ELSE j.first_error END
        FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bool[], $5::text[])
            AS c(id, done, failed, has_error, first_error)
        WHERE j.id = c.id AND j.stage IN ('formation', 'running')
        RETURNING j.*"#;
    let ids: Vec<String> = tallies.iter().map(|t| t.0.to_owned()).collect();
    let done: Vec<i64> = tallies.iter().map(|t| t.1).collect();
    let failed: Vec<i64> = tallies.iter().map(|t| t.2).collect();
    // Arrays cannot hold SQL NULLs here: `has_error` says which filler to ignore.
    let has_error: Vec<bool> = tallies.iter().map(|t| t.3.is_some()).collect();
    let errors: Vec<String> = tallies
        .iter()
        .map(|t| t.3.unwrap_or_default().to_owned())
        .collect();
    Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        SQL,
        [
            ids.into(),
            done.into(),
            failed.into(),
            has_error.into(),
            errors.into(),
        ],
    )
}

/// How one job ends, as [`end_jobs`] writes it.
pub(super) struct EndRow<'a> {
    pub id: &'a str,
    pub to: &'a str,
    pub done: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub first_error: Option<&'a str>,
    pub result: Option<&'a serde_json::Value>,
}

/// Ends every job of `ends` that is at stage `from` with its final counts, first error
/// and result, in one statement (a compare-and-set per job). Returns the ids moved.
pub(super) fn end_jobs(ends: &[EndRow], from: &str, now: DateTime<Utc>) -> Statement {
    const SQL: &str = r#"
        UPDATE jobs AS j SET
            stage = e.stage,
            done_count = e.done,
            failed_count = e.failed,
            cancelled_count = e.cancelled,
            first_error = CASE WHEN e.has_error THEN e.first_error END,
            result = CASE WHEN e.has_result THEN e.result END,
            finished_at = $1,
            updated_at = $1
        FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                    $7::bool[], $8::text[], $9::bool[], $10::jsonb[])
            AS e(id, stage, done, failed, cancelled, has_error, first_error, has_result, result)
        WHERE j.id = e.id AND j.stage = $11
        RETURNING j.id"#;
    let ids: Vec<String> = ends.iter().map(|e| e.id.to_owned()).collect();
    let stages: Vec<String> = ends.iter().map(|e| e.to.to_owned()).collect();
    let done: Vec<i64> = ends.iter().map(|e| e.done).collect();
    let failed: Vec<i64> = ends.iter().map(|e| e.failed).collect();
    let cancelled: Vec<i64> = ends.iter().map(|e| e.cancelled).collect();
    // Arrays cannot hold SQL NULLs here: the flags say which filler to ignore.
    let has_error: Vec<bool> = ends.iter().map(|e| e.first_error.is_some()).collect();
    let errors: Vec<String> = ends
        .iter()
        .map(|e| e.first_error.unwrap_or_default().to_owned())
        .collect();
    let has_result: Vec<bool> = ends.iter().map(|e| e.result.is_some()).collect();
    let results: Vec<serde_json::Value> = ends
        .iter()
        .map(|e| e.result.cloned().unwrap_or(serde_json::Value::Null))
        .collect();
    Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        SQL,
        [
            now.into(),
            ids.into(),
            stages.into(),
            done.into(),
            failed.into(),
            cancelled.into(),
            has_error.into(),
            errors.into(),
            has_result.into(),
            results.into(),
            from.into(),
        ],
    )
}

/// Moves each attempt of the batch to its outcome (`done` + result, or
/// `failed`/`retrying` + info) in one statement: an attempt running, or one that ran
/// without a claim (its row still `pending`/`retrying` at the attempt before). Returns
/// the ids moved; an attempt neither (a duplicate, a cancelled task, a task a later
/// run reset) is not.
pub(super) fn finish_tasks(transitions: &[Transition], now: DateTime<Utc>) -> Statement {
    const SQL: &str = r#"
        UPDATE tasks AS t SET
            status = o.status,
            result = CASE WHEN o.status = 'done' THEN o.result ELSE t.result END,
            info = CASE WHEN o.status = 'done' THEN t.info ELSE o.info END,
            finished_at = CASE WHEN o.status IN ('done', 'failed') THEN $1 END,
            lease_until = NULL,
            version = t.version + 1,
            updated_at = $1,
            attempts = o.attempt,
            deliveries = CASE WHEN t.status = 'running' THEN t.deliveries ELSE 1 END
        FROM unnest($2::bigint[], $3::int[], $4::text[], $5::jsonb[], $6::text[], $7::int[])
            AS o(id, attempt, status, result, info, run)
        WHERE t.id = o.id AND t.run <= o.run
            AND (t.status = 'running' AND t.attempts = o.attempt
                 OR t.status IN ('pending', 'retrying') AND t.attempts = o.attempt - 1)
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
