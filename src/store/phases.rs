//! Moving a multi-stage job to its next phase, inside the completion check's
//! transaction, under the job's row lock (see [`crate::phases`] for the shape).
//!
//! When every task of the current phase is done, [`advance`] makes the next phase's
//! tasks and moves the job to it in the same transaction — the reduce tasks by one
//! `INSERT … SELECT` in which the database groups the map output by key, so nothing of
//! it passes through taskmill's memory — or, after the last phase, says how the job
//! ends and with what result. The phase change is a compare-and-set on the phase read
//! under the lock; a consumer that lost the race finds the job in the next phase with
//! tasks to wait for. The new tasks' messages are left to a feeder (`tasks_published`
//! goes back to false): the caller feeds them after the commit, and if it dies first,
//! any intake's orphan scan does within seconds.

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};
use serde_json::{Map, Value};

use super::error::StoreError;
use super::rows::NewTask;
use super::task_rows::insert_task_rows;
use crate::phases::{Phase, PhasePlan};
use crate::state::{JobStage, TaskStatus};
use entity::{job, task};

/// Rows of a phase's output read per page when merging it.
const MERGE_PAGE: i64 = 1_000;

/// What [`advance`] did with a job whose current phase is over.
#[derive(Debug)]
pub(super) enum Advanced {
    /// The job moved to `phase`, whose `tasks` new tasks wait for a feeder.
    Moved {
        /// The job row as it is now.
        job: Box<job::Model>,
        /// The phase it entered.
        phase: Phase,
    },
    /// The job has no phase left: it ends in `stage`, with `first_error` (a failed
    /// stage change) or `result`.
    Ends {
        /// `done`, or `failed` when a phase's output could not go on.
        stage: JobStage,
        /// Why it failed.
        first_error: Option<String>,
        /// The job's result when it is done.
        result: Option<Value>,
    },
}

/// Moves a running multi-stage job (locked by the caller) whose current phase's tasks
/// are all done to the next phase with tasks, passing over phases that get none (a map
/// stage without output makes no reduce tasks: the reduce output is `{}`). A payload it
/// would make over `cap` bytes (a reduce task's input, the finalize task's input, the
/// job's result) fails the job instead, saying which and how large; it is measured by
/// the database before it is made, so the completion pod holds at most `cap` bytes of
/// the job's output (the merged reduce output) and the database builds no value past
/// its own limits.
pub(super) async fn advance<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    cap: usize,
) -> Result<Advanced, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("job {}: {what}", job.id));
    let plan: PhasePlan = job
        .stage_plan
        .clone()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|err| corrupt(&format!("unreadable stage plan: {err}")))?
        .ok_or_else(|| corrupt("a phase but no stage plan"))?;
    let mut phase = job
        .phase
        .as_deref()
        .and_then(Phase::parse)
        .ok_or_else(|| corrupt("no phase"))?;
    let mut first = job.phase_first_ordinal;
    let end = job.task_count;
    loop {
        let made = match (phase, plan.after(phase)) {
            (Phase::Map, _) => {
                if let Some(error) = bad_map_output(txn, &job.id, first, end).await? {
                    return Ok(failed(error));
                }
                if let Some(error) = reduce_input_over_cap(txn, job, &plan, first, end, cap).await?
                {
                    return Ok(failed(error));
                }
                insert_reduce_tasks(txn, job, &plan, first, end).await?
            }
            (Phase::Reduce, Some(_)) => {
                let input = "the finalize task's input (the merged reduce output)";
                let merged = match merged_reduce_output(txn, job, &plan, (first, end), (input, cap))
                    .await?
                {
                    Ok(merged) => merged,
                    Err(error) => return Ok(failed(error)),
                };
                let finalize = plan.finalize.as_ref().expect("a finalize phase is planned");
                let task = NewTask {
                    ordinal: ordinal(end)?,
                    task_type: finalize.task_type.clone(),
                    payload: merged,
                };
                let backend = txn.get_database_backend();
                insert_task_rows(txn, backend, &job.id, &[task], Utc::now()).await?;
                1
            }
            (Phase::Reduce, None) => {
                let result = "the job's result (the merged reduce output)";
                return Ok(
                    match merged_reduce_output(txn, job, &plan, (first, end), (result, cap)).await?
                    {
                        Ok(merged) => done(merged),
                        Err(error) => failed(error),
                    },
                );
            }
            (Phase::Finalize, _) => {
                let result = phase_results(txn, &job.id, first, end, false).await?;
                return Ok(done(
                    result.into_iter().next().map_or(Value::Null, |r| r.result),
                ));
            }
        };
        let next = plan
            .after(phase)
            .expect("a phase with tasks to make has a next one");
        if made == 0 {
            phase = next;
            first = end;
            continue;
        }
        return move_to(txn, job, next, end, made).await;
    }
}

fn failed(error: String) -> Advanced {
    Advanced::Ends {
        stage: JobStage::Failed,
        first_error: Some(error),
        result: None,
    }
}

fn done(result: Value) -> Advanced {
    Advanced::Ends {
        stage: JobStage::Done,
        first_error: None,
        result: Some(result),
    }
}

fn ordinal(value: i64) -> Result<i32, StoreError> {
    i32::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("ordinal {value} is past the column's range")))
}

/// The compare-and-set that enters `phase`, whose `made` tasks start at ordinal `first`.
async fn move_to<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    phase: Phase,
    first: i64,
    made: i64,
) -> Result<Advanced, StoreError> {
    let moved = job::Entity::update_many()
        .col_expr(job::Column::Phase, Expr::value(phase.as_str()))
        .col_expr(job::Column::PhaseFirstOrdinal, Expr::value(first))
        .col_expr(job::Column::TaskCount, Expr::value(first + made))
        .col_expr(job::Column::TasksPublished, Expr::value(false))
        .col_expr(job::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(job::Column::Id.eq(job.id.as_str()))
        .filter(job::Column::Stage.eq(JobStage::Running.as_str()))
        .filter(job::Column::Phase.eq(job.phase.clone()))
        .exec_with_returning(txn)
        .await?;
    let job = moved.into_iter().next().ok_or_else(|| {
        StoreError::Corrupt(format!(
            "job {} changed phase while its row was locked",
            job.id
        ))
    })?;
    Ok(Advanced::Moved {
        job: Box::new(job),
        phase,
    })
}

/// The first map task whose output is neither an object nor `null`, as an error.
async fn bad_map_output<C: ConnectionTrait>(
    txn: &C,
    job_id: &str,
    first: i64,
    end: i64,
) -> Result<Option<String>, StoreError> {
    let json_type = match txn.get_database_backend() {
        DatabaseBackend::Postgres => "jsonb_typeof(result)",
        _ => "json_type(result)",
    };
    let bad: Option<(i32, Option<Value>)> = task::Entity::find()
        .select_only()
        .columns([task::Column::Ordinal, task::Column::Result])
        .filter(task::Column::JobId.eq(job_id))
        .filter(task::Column::Ordinal.gte(first))
        .filter(task::Column::Ordinal.lt(end))
        .filter(task::Column::Status.eq(TaskStatus::Done.as_str()))
        .filter(Expr::cust(json_type).is_not_in(["object", "null"]))
        .order_by_asc(task::Column::Ordinal)
        .into_tuple()
        .one(txn)
        .await?;
    Ok(bad.map(|(ordinal, result)| {
        let shown = result.map(|r| r.to_string()).unwrap_or_default();
        let shown: String = shown.chars().take(100).collect();
        format!("map task {ordinal} returned {shown}, not an object of key → value")
    }))
}

#[derive(FromQueryResult)]
struct LargestShard {
    shard: i64,
    bytes: i64,
}

/// Why the reduce tasks cannot be made, if one of them would take more than `cap`
/// bytes of map output: measured by the database from the map output's keys and
/// values, dealt to shards (or one per key) as [`insert_reduce_tasks`] deals them,
/// without building a single grouped value. The size counts each key and value as
/// JSON text with room for punctuation, never less than the payload will take.
async fn reduce_input_over_cap<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    plan: &PhasePlan,
    first: i64,
    end: i64,
    cap: usize,
) -> Result<Option<String>, StoreError> {
    let backend = txn.get_database_backend();
    let (pairs, key_bytes, value_bytes) = match backend {
        DatabaseBackend::Postgres => (
            PG_PAIRS.to_owned(),
            "octet_length(to_jsonb(e.key)::text)",
            "octet_length(e.value::text)",
        ),
        _ => (
            SQLITE_PAIRS.to_owned(),
            "length(CAST(json_quote(e.key) AS BLOB))",
            "length(CAST(SQLITE_VALUE AS BLOB))",
        ),
    };
    let value_bytes = value_bytes.replace("SQLITE_VALUE", SQLITE_VALUE);
    let p = |n: u8| match backend {
        DatabaseBackend::Postgres => format!("${n}"),
        _ => format!("?{n}"),
    };
    let shards = p(4);
    let sql = format!(
        "SELECT k.shard AS shard, CAST(sum(k.bytes) AS BIGINT) AS bytes
         FROM (SELECT (row_number() OVER (ORDER BY g.key) - 1) % {shards} AS shard, g.bytes
               FROM (SELECT e.key AS key, sum({value_bytes} + 2) + {key_bytes} + 8 AS bytes
                     {pairs} GROUP BY e.key) AS g) AS k
         GROUP BY k.shard ORDER BY bytes DESC LIMIT 1"
    );
    let shards = if plan.reduce.per_key {
        i64::MAX
    } else {
        i64::from(Ord::max(plan.reduce.shards, 1))
    };
    let values: Vec<sea_orm::Value> = vec![
        job.id.clone().into(),
        ordinal(first)?.into(),
        ordinal(end)?.into(),
        shards.into(),
    ];
    let largest =
        LargestShard::find_by_statement(Statement::from_sql_and_values(backend, sql, values))
            .one(txn)
            .await?;
    Ok(largest
        .filter(|largest| largest.bytes as u64 > cap as u64)
        .map(|largest| {
            let task = format!("reduce task {}", end + largest.shard);
            let (what, hint) = match plan.reduce.per_key {
                true => (format!("the input of {task} (one key's values)"), ""),
                false => (
                    format!("the input of {task} (shard {} of {shards})", largest.shard),
                    ": more reduce shards would spread it",
                ),
            };
            format!(
                "{}{hint}",
                crate::caps::over_cap(&what, largest.bytes as u64, cap)
            )
        }))
}

/// Groups the output of the map tasks with ordinals `first..end` by key and inserts
/// the reduce tasks from ordinal `end` on: one per key, or up to `shards` with the keys
/// dealt round-robin in key order. Returns how many it inserted.
async fn insert_reduce_tasks<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    plan: &PhasePlan,
    first: i64,
    end: i64,
) -> Result<i64, StoreError> {
    let backend = txn.get_database_backend();
    let sql = reduce_sql(backend, plan.reduce.per_key);
    let mut values: Vec<sea_orm::Value> = vec![
        job.id.clone().into(),
        ordinal(first)?.into(),
        ordinal(end)?.into(),
        plan.reduce.task_type.clone().into(),
        Utc::now().into(),
    ];
    if !plan.reduce.per_key {
        values.push((Ord::max(plan.reduce.shards, 1) as i32).into());
    }
    let inserted = txn
        .execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    Ok(inserted.rows_affected() as i64)
}

/// The map output of a job's tasks (ordinals `$1`, `$2..$3`, done) as rows of key
/// `e.key` and value `e.value`, in the ordinals' order. The CASE keeps jsonb_each away
/// from a non-object, whatever order the planner evaluates the filter in.
const PG_PAIRS: &str = r#"FROM tasks t CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(t.result) = 'object'
        THEN t.result ELSE '{}'::jsonb END) AS e
    WHERE t.job_id = $1 AND t.ordinal >= $2 AND t.ordinal < $3 AND t.status = 'done'"#;

/// [`PG_PAIRS`] for SQLite; a value is [`SQLITE_VALUE`].
const SQLITE_PAIRS: &str = r#"FROM (SELECT ordinal, result FROM tasks
          WHERE job_id = ?1 AND ordinal >= ?2 AND ordinal < ?3 AND status = 'done'
            AND json_type(result) = 'object'
          ORDER BY ordinal) AS t, json_each(t.result) AS e"#;

/// json_each gives SQL values; this turns each back into JSON of its own type.
const SQLITE_VALUE: &str = r#"json(CASE e.type WHEN 'text' THEN json_quote(e.value)
    WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' WHEN 'null' THEN 'null' ELSE e.value END)"#;

/// The statement of [`insert_reduce_tasks`]; parameters: job id, first and end
/// ordinals of the map tasks, reduce task type, now, and (unless per key) shards.
fn reduce_sql(backend: DatabaseBackend, per_key: bool) -> String {
    const INSERT: &str = r#"INSERT INTO tasks (job_id, ordinal, "type", payload, status,
        attempts, deliveries, version, created_at, updated_at)"#;
    // Filed in the job's partition (see `pg_batch::insert_tasks`).
    const PG_INSERT: &str = r#"INSERT INTO tasks (job_id, ordinal, "type", payload, status,
        attempts, deliveries, version, created_at, updated_at, filed_at)"#;
    const PG_FILED: &str = "(SELECT CASE WHEN tasks_kept THEN '1970-01-01 00:00:00+00' ELSE created_at END FROM jobs WHERE id = $1)";
    if backend == DatabaseBackend::Postgres {
        let grouped = format!(
            "SELECT e.key, jsonb_agg(e.value ORDER BY t.ordinal) AS vals {PG_PAIRS} GROUP BY e.key"
        );
        if per_key {
            format!(
                "{PG_INSERT} SELECT $1, $3 + (row_number() OVER (ORDER BY g.key))::int - 1, $4,
                    jsonb_build_object('key', g.key, 'values', g.vals), 'pending', 0, 0, 0, $5, $5,
                    {PG_FILED}
                 FROM ({grouped}) AS g"
            )
        } else {
            format!(
                "{PG_INSERT} SELECT $1, $3 + s.shard, $4,
                    jsonb_build_object('shard', s.shard, 'groups', s.groups), 'pending', 0, 0, 0, $5, $5,
                    {PG_FILED}
                 FROM (SELECT k.shard, jsonb_object_agg(k.key, k.vals) AS groups
                       FROM (SELECT g.key, g.vals,
                                    ((row_number() OVER (ORDER BY g.key)) - 1)::int % $6 AS shard
                             FROM ({grouped}) AS g) AS k
                       GROUP BY k.shard) AS s"
            )
        }
    } else {
        let grouped = format!(
            "SELECT e.key AS key, json_group_array({SQLITE_VALUE}) AS vals {SQLITE_PAIRS}
             GROUP BY e.key"
        );
        if per_key {
            format!(
                "{INSERT} SELECT ?1, ?3 + (row_number() OVER (ORDER BY g.key)) - 1, ?4,
                    json_object('key', g.key, 'values', json(g.vals)), 'pending', 0, 0, 0, ?5, ?5
                 FROM ({grouped}) AS g"
            )
        } else {
            format!(
                "{INSERT} SELECT ?1, ?3 + s.shard, ?4,
                    json_object('shard', s.shard, 'groups', json(s.groups)), 'pending', 0, 0, 0, ?5, ?5
                 FROM (SELECT k.shard AS shard, json_group_object(k.key, json(k.vals)) AS groups
                       FROM (SELECT g.key AS key, g.vals AS vals,
                                    (row_number() OVER (ORDER BY g.key) - 1) % ?6 AS shard
                             FROM ({grouped}) AS g) AS k
                       GROUP BY k.shard) AS s"
            )
        }
    }
}

#[derive(FromQueryResult)]
struct PhaseResult {
    ordinal: i32,
    key: Option<String>,
    result: Value,
}

/// The results of the done tasks with ordinals `first..end`, in ordinal order, with
/// each task's `key` when `with_key` (a per-key reduce task's payload names it).
async fn phase_results<C: ConnectionTrait>(
    txn: &C,
    job_id: &str,
    first: i64,
    end: i64,
    with_key: bool,
) -> Result<Vec<PhaseResult>, StoreError> {
    let key = match (with_key, txn.get_database_backend()) {
        (false, _) => "NULL",
        (true, DatabaseBackend::Postgres) => "payload->>'key'",
        (true, _) => "json_extract(payload, '$.key')",
    };
    let mut results = Vec::new();
    let mut from = first;
    while from < end {
        let to = Ord::min(from + MERGE_PAGE, end);
        let page = task::Entity::find()
            .select_only()
            .column(task::Column::Ordinal)
            .column_as(Expr::cust(key), "key")
            .column(task::Column::Result)
            .filter(task::Column::JobId.eq(job_id))
            .filter(task::Column::Ordinal.gte(from))
            .filter(task::Column::Ordinal.lt(to))
            .filter(task::Column::Status.eq(TaskStatus::Done.as_str()))
            .filter(task::Column::Result.is_not_null())
            .order_by_asc(task::Column::Ordinal)
            .into_model::<PhaseResult>()
            .all(txn)
            .await?;
        results.extend(page);
        from = to;
    }
    Ok(results)
}

/// The reduce stage's output as one object of key → value: per key, each task's
/// result under its key; per shard, the union of the shards' objects. `Err`: a shard
/// returned something other than an object, or the output (`what` it becomes) is over
/// `cap` bytes; either fails the job. The database sums the results' sizes first, so
/// an output over the cap is never read into memory.
async fn merged_reduce_output<C: ConnectionTrait>(
    txn: &C,
    job: &job::Model,
    plan: &PhasePlan,
    (first, end): (i64, i64),
    (what, cap): (&str, usize),
) -> Result<Result<Value, String>, StoreError> {
    let stored = phase_result_bytes(txn, &job.id, first, end).await?;
    if stored > cap as u64 {
        return Ok(Err(crate::caps::over_cap(what, stored, cap)));
    }
    let per_key = plan.reduce.per_key;
    let mut merged = Map::new();
    for row in phase_results(txn, &job.id, first, end, per_key).await? {
        match (per_key, row.result) {
            (true, result) => {
                merged.insert(row.key.unwrap_or_default(), result);
            }
            (false, Value::Object(part)) => merged.extend(part),
            (false, Value::Null) => {}
            (false, other) => {
                let shown: String = other.to_string().chars().take(100).collect();
                return Ok(Err(format!(
                    "reduce task {} returned {shown}, not an object of key → value",
                    row.ordinal
                )));
            }
        }
    }
    let merged = Value::Object(merged);
    // The keys a per-key output adds are not in the stored results.
    let bytes = crate::caps::json_bytes(&merged);
    if bytes > cap as u64 {
        return Ok(Err(crate::caps::over_cap(what, bytes, cap)));
    }
    Ok(Ok(merged))
}

/// The bytes of the results of the done tasks with ordinals `first..end`, as the
/// database stores them.
async fn phase_result_bytes<C: ConnectionTrait>(
    txn: &C,
    job_id: &str,
    first: i64,
    end: i64,
) -> Result<u64, StoreError> {
    let length = match txn.get_database_backend() {
        DatabaseBackend::Postgres => "octet_length(result::text)",
        _ => "length(CAST(result AS BLOB))",
    };
    let bytes: Option<Option<i64>> = task::Entity::find()
        .select_only()
        .column_as(
            Expr::cust(format!("CAST(sum({length}) AS BIGINT)")),
            "bytes",
        )
        .filter(task::Column::JobId.eq(job_id))
        .filter(task::Column::Ordinal.gte(first))
        .filter(task::Column::Ordinal.lt(end))
        .filter(task::Column::Status.eq(TaskStatus::Done.as_str()))
        .into_tuple()
        .one(txn)
        .await?;
    Ok(bytes
        .flatten()
        .map_or(0, |bytes| u64::try_from(bytes).unwrap_or(0)))
}
