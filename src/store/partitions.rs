//! The tasks table's partitions on PostgreSQL, and removal by partition.
//!
//! Task rows are partitioned by `filed_at`, their job's creation time (migration
//! 17), in spans the cleaner makes ahead of need ([`Store::make_partitions`],
//! recorded in `task_partitions`). Beside them: `tasks_kept`, for the tasks of ended
//! jobs set aside because they are kept longer than the rest of their partition;
//! `tasks_before_migration`; and `tasks_default`, for rows filed where no partition was
//! made in time. Only the spans are ever dropped; the rows of the other three leave by
//! the batched deletes of `retention.rs`. Each partition has a unique index on `id`
//! of its own (migration 18), for lookups by task id: the table as a whole has none,
//! since PostgreSQL would need `filed_at` in it.
//!
//! A span's partition goes, in steps, once it is due (it ended before the rule's
//! `partitions_ending_before`):
//!
//! 1. its jobs that may not leave yet but have ended (failed ones, kept longer) have
//!    their tasks moved to `tasks_kept` (at most [`MOVE_CAP`] rows; more, and the
//!    partition waits); a job still running, or whose event is undelivered, holds the
//!    partition until it can leave;
//! 2. once every other job of the span may leave, it is detached (a short lock on the
//!    tasks table, with a `lock_timeout`) and marked so in `task_partitions`: its
//!    tasks are gone from every query at once, and the jobs left are being removed;
//! 3. its jobs' rows (events and parts with them) are deleted a batch per transaction;
//! 4. the detached table is dropped, with no lock on the tasks table.
//!
//! A cleaner stopped between steps leaves the partition in one of these states, and
//! the next one carries on. Retrying a failed job and moving or detaching take one
//! advisory lock (shared for the retry), so a retry never starts on a job whose tasks
//! are leaving, and a partition is never detached under a job a retry just started.

use chrono::{DateTime, DurationRound, SubsecRound, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseTransaction, FromQueryResult, Statement};

use super::error::StoreError;
use super::handle::Store;
use super::retention::{add_to_totals, RemovalRule, Removed};

/// Task rows moved to `tasks_kept` at most to let one partition go.
pub const MOVE_CAP: i64 = 100_000;
/// Job rows of a detached partition deleted per transaction.
const JOB_BATCH: i64 = 1_000;
/// The advisory lock a retry takes shared, and moving or detaching exclusive.
pub(super) const RERUN_LOCK: i64 = 7_215_863;
/// How long detaching or attaching waits for the tasks table's lock before it gives
/// up until the next run: claims and finishes queue behind a waiting lock.
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '200ms'";
/// Tries at detaching a partition whose lock times out, half a second apart.
const DETACH_TRIES: usize = 10;

#[derive(Clone, Debug, FromQueryResult)]
struct Partition {
    name: String,
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    detached_at: Option<DateTime<Utc>>,
}

#[derive(FromQueryResult)]
struct Blocker {
    id: String,
    stage: String,
    task_count: i64,
    /// Its event is not delivered yet, it is being removed one job at a time, or its
    /// retention ends within the rule's hold time: it is about to leave, and the
    /// partition waits for it.
    leaving_soon: bool,
}

impl Blocker {
    /// Whether its tasks may be set aside: it has ended and is simply kept longer.
    fn may_move(&self) -> bool {
        !self.leaving_soon
            && self
                .stage
                .parse::<crate::state::JobStage>()
                .is_ok_and(|stage| stage.is_terminal())
    }
}

#[derive(FromQueryResult)]
struct Gone {
    id: String,
    stage: String,
    task_count: i64,
}

impl Store {
    /// Makes the partitions of the tasks table that jobs created until `until` need,
    /// each ending at a multiple of `span` (from the Unix epoch); how many it made.
    /// Nothing on SQLite.
    pub async fn make_partitions(
        &self,
        span: std::time::Duration,
        until: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        if self.backend() != DatabaseBackend::Postgres {
            return Ok(0);
        }
        let span = TimeDelta::from_std(span)
            .unwrap_or(TimeDelta::days(1))
            .max(TimeDelta::seconds(1));
        let mut made = 0;
        loop {
            let last_end: Option<DateTime<Utc>> = self
                .scalar("SELECT MAX(ends_at) AS at FROM task_partitions")
                .await?;
            if last_end.is_some_and(|end| end >= until) {
                // The usual run: nothing to make, and no scan of `tasks_default`.
                return Ok(made);
            }
            let default_end: Option<DateTime<Utc>> = self
                .scalar("SELECT MAX(filed_at) + interval '1 microsecond' AS at FROM tasks_default")
                .await?;
            // Never a span that starts before a moment from now (a span, at most a
            // minute): a row of it may be going into the default partition right now
            // (its job created just before, or by a pod whose clock runs ahead), and
            // attaching would then fail, or fail that insert. In whole microseconds,
            // PostgreSQL's precision: the bound is written as text, which it rounds,
            // and `starts_at` as a value, which is truncated, and the two must agree.
            let soonest = (Utc::now() + span.min(TimeDelta::minutes(1))).trunc_subsecs(6);
            let Some(start) = last_end.max(default_end).map(|start| start.max(soonest)) else {
                return Ok(made);
            };
            if start >= until {
                return Ok(made);
            }
            let end = start.duration_trunc(span).unwrap_or(start) + span;
            self.attach_partition(start, end).await?;
            made += 1;
        }
    }

    /// One step of removal by partition under `rule` (see the module docs); `None`
    /// when no partition can move on now, or on SQLite.
    pub(super) async fn partition_step(
        &self,
        rule: &RemovalRule,
    ) -> Result<Option<Removed>, StoreError> {
        if self.backend() != DatabaseBackend::Postgres {
            return Ok(None);
        }
        let partitions: Vec<Partition> = Partition::find_by_statement(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT name, starts_at, ends_at, detached_at FROM task_partitions \
             ORDER BY starts_at",
        ))
        .all(&self.db)
        .await?;
        if let Some(detached) = partitions.iter().find(|p| p.detached_at.is_some()) {
            return self.finish_partition(detached).await.map(Some);
        }
        let Some(due_before) = rule.partitions_ending_before() else {
            return Ok(None);
        };
        for partition in partitions.iter().filter(|p| p.ends_at <= due_before) {
            if let Some(step) = self.free_partition_when_let(partition, rule).await? {
                return Ok(Some(step));
            }
        }
        Ok(None)
    }

    /// [`Self::free_partition`], tried again a few times when its lock on the tasks
    /// table did not come within the lock timeout (a long transaction on the table);
    /// `None` if it never came: the next run tries again.
    async fn free_partition_when_let(
        &self,
        partition: &Partition,
        rule: &RemovalRule,
    ) -> Result<Option<Removed>, StoreError> {
        for _ in 0..DETACH_TRIES {
            match self.free_partition(partition, rule).await {
                Err(err) if err.to_string().contains("lock timeout") => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                freed => return freed,
            }
        }
        tracing::info!(
            partition = partition.name,
            "partition not detached: the tasks table stayed busy; the next run tries again"
        );
        Ok(None)
    }

    /// Moves the kept jobs out of `partition`, or detaches it when none is left;
    /// `None` when something holds it (a job running, an event undelivered, too many
    /// kept tasks to move).
    async fn free_partition(
        &self,
        partition: &Partition,
        rule: &RemovalRule,
    ) -> Result<Option<Removed>, StoreError> {
        let partition = partition.clone();
        let rule = rule.clone();
        self.transact(move |txn| {
            Box::pin(async move {
                exec(txn, &format!("SELECT pg_advisory_xact_lock({RERUN_LOCK})")).await?;
                let blockers = blockers(txn, &partition, &rule).await?;
                if !blockers.iter().all(Blocker::may_move) {
                    return Ok(None);
                }
                if !blockers.is_empty() {
                    let tasks: i64 = blockers.iter().map(|job| job.task_count).sum();
                    if tasks > MOVE_CAP {
                        return Ok(None);
                    }
                    let ids: Vec<String> = blockers.into_iter().map(|job| job.id).collect();
                    txn.execute_raw(Statement::from_sql_and_values(
                        DatabaseBackend::Postgres,
                        "UPDATE tasks SET filed_at = '1970-01-01 00:00:00+00' \
                         WHERE job_id = ANY($1) AND filed_at >= $2 AND filed_at < $3",
                        [
                            ids.clone().into(),
                            partition.starts_at.into(),
                            partition.ends_at.into(),
                        ],
                    ))
                    .await?;
                    txn.execute_raw(Statement::from_sql_and_values(
                        DatabaseBackend::Postgres,
                        "UPDATE jobs SET tasks_kept = true WHERE id = ANY($1)",
                        [ids.into()],
                    ))
                    .await?;
                    return Ok(Some(Removed::default()));
                }
                exec(txn, LOCK_TIMEOUT).await?;
                exec(
                    txn,
                    &format!("ALTER TABLE tasks DETACH PARTITION {}", partition.name),
                )
                .await?;
                txn.execute_raw(Statement::from_sql_and_values(
                    DatabaseBackend::Postgres,
                    "UPDATE task_partitions SET detached_at = now() WHERE name = $1",
                    [partition.name.clone().into()],
                ))
                .await?;
                Ok(Some(Removed::default()))
            })
        })
        .await
    }

    /// Deletes a batch of the jobs of detached `partition`; once none is left, drops
    /// it.
    async fn finish_partition(&self, partition: &Partition) -> Result<Removed, StoreError> {
        let partition = partition.clone();
        self.transact(move |txn| {
            Box::pin(async move {
                let gone = Gone::find_by_statement(Statement::from_sql_and_values(
                    DatabaseBackend::Postgres,
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                       WHERE created_at >= $1 AND created_at < $2 AND NOT tasks_kept LIMIT $3) \
                     RETURNING id, stage, task_count",
                    [
                        partition.starts_at.into(),
                        partition.ends_at.into(),
                        JOB_BATCH.into(),
                    ],
                ))
                .all(txn)
                .await?;
                if gone.is_empty() {
                    exec(txn, &format!("DROP TABLE {}", partition.name)).await?;
                    txn.execute_raw(Statement::from_sql_and_values(
                        DatabaseBackend::Postgres,
                        "DELETE FROM task_partitions WHERE name = $1",
                        [partition.name.clone().into()],
                    ))
                    .await?;
                    return Ok(Removed::default());
                }
                let ids: Vec<String> = gone.iter().map(|job| job.id.clone()).collect();
                for table in ["job_events", "job_parts"] {
                    txn.execute_raw(Statement::from_sql_and_values(
                        DatabaseBackend::Postgres,
                        format!("DELETE FROM {table} WHERE job_id = ANY($1)"),
                        [ids.clone().into()],
                    ))
                    .await?;
                }
                let mut removed = Removed::default();
                let mut by_stage: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
                for job in &gone {
                    let tasks = u64::try_from(job.task_count).unwrap_or(0);
                    let entry = by_stage.entry(job.stage.as_str()).or_default();
                    entry.0 += 1;
                    entry.1 += tasks;
                    removed.add(Removed { jobs: 1, tasks });
                }
                for (stage, (jobs, tasks)) in by_stage {
                    add_to_totals(txn, stage, jobs, tasks).await?;
                }
                Ok(removed)
            })
        })
        .await
    }

    /// Makes and attaches the partition for `[start, end)`, with its unique index on
    /// `id`: the planner then knows an id finds one row before it has statistics on
    /// the partition (migration 18).
    async fn attach_partition(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let name = format!("tasks_{}", start.format("%Y%m%d_%H%M%S_%3f"));
        let (from, to) = (start.to_rfc3339(), end.to_rfc3339());
        self.transact(move |txn| {
            Box::pin(async move {
                exec(txn, LOCK_TIMEOUT).await?;
                exec(
                    txn,
                    &format!(
                        "CREATE TABLE {name} (LIKE tasks INCLUDING DEFAULTS INCLUDING STORAGE) \
                           WITH (fillfactor = 80);
                         CREATE UNIQUE INDEX {name}_id ON {name} (id);
                         ALTER TABLE {name} ADD CONSTRAINT {name}_span \
                           CHECK (filed_at >= '{from}' AND filed_at < '{to}');
                         ALTER TABLE tasks ATTACH PARTITION {name} \
                           FOR VALUES FROM ('{from}') TO ('{to}');
                         ALTER TABLE {name} DROP CONSTRAINT {name}_span;"
                    ),
                )
                .await?;
                txn.execute_raw(Statement::from_sql_and_values(
                    DatabaseBackend::Postgres,
                    "INSERT INTO task_partitions (name, starts_at, ends_at) VALUES ($1, $2, $3)",
                    [name.into(), start.into(), end.into()],
                ))
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// The one timestamp `sql` selects as `at`.
    async fn scalar(&self, sql: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(DatabaseBackend::Postgres, sql))
            .await?;
        Ok(row.and_then(|row| {
            row.try_get::<Option<DateTime<Utc>>>("", "at")
                .ok()
                .flatten()
        }))
    }
}

/// The jobs of `partition`'s span that `rule` does not let go and whose tasks are
/// still in it.
async fn blockers(
    txn: &DatabaseTransaction,
    partition: &Partition,
    rule: &RemovalRule,
) -> Result<Vec<Blocker>, StoreError> {
    use sea_orm::sea_query::{Alias, CaseStatement, Expr, ExprTrait, PostgresQueryBuilder, Query};
    let leaving_soon = CaseStatement::new()
        .case(rule.leaves_soon(), Expr::val(true))
        .finally(Expr::cust(
            "removal_started_at IS NOT NULL OR EXISTS (SELECT 1 FROM job_events e \
             WHERE e.job_id = jobs.id AND (e.published_at IS NULL OR e.target_retry_at IS NOT NULL))",
        ));
    let (sql, values) = Query::select()
        .columns([
            entity::job::Column::Id,
            entity::job::Column::Stage,
            entity::job::Column::TaskCount,
        ])
        .expr_as(leaving_soon, Alias::new("leaving_soon"))
        .from(entity::job::Entity)
        .and_where(Expr::col(entity::job::Column::CreatedAt).gte(partition.starts_at))
        .and_where(Expr::col(entity::job::Column::CreatedAt).lt(partition.ends_at))
        .and_where(Expr::col(entity::job::Column::TasksKept).eq(false))
        .cond_where(rule.leaves().not())
        .build(PostgresQueryBuilder);
    Ok(Blocker::find_by_statement(Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        sql,
        values,
    ))
    .all(txn)
    .await?)
}

async fn exec(txn: &DatabaseTransaction, sql: &str) -> Result<(), StoreError> {
    txn.execute_unprepared(sql).await?;
    Ok(())
}

/// Takes a retry's side of the advisory lock (see the module docs): first in its
/// transaction, before any row lock, so that it never waits on one while holding
/// another.
pub(super) async fn lock_for_rerun(txn: &DatabaseTransaction) -> Result<(), StoreError> {
    if txn.get_database_backend() == DatabaseBackend::Postgres {
        exec(
            txn,
            &format!("SELECT pg_advisory_xact_lock_shared({RERUN_LOCK})"),
        )
        .await?;
    }
    Ok(())
}

/// Why job `job` cannot be retried now because of its partition: its span is being
/// dropped. Under [`lock_for_rerun`].
pub(super) async fn rerun_refused(
    txn: &DatabaseTransaction,
    job: &entity::job::Model,
) -> Result<Option<String>, StoreError> {
    if txn.get_database_backend() != DatabaseBackend::Postgres || job.tasks_kept {
        return Ok(None);
    }
    let leaving = txn
        .query_one_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT 1 AS n FROM task_partitions WHERE detached_at IS NOT NULL \
             AND starts_at <= $1 AND ends_at > $1",
            [job.created_at.into()],
        ))
        .await?;
    Ok(leaving.map(|_| "the job is past its retention and being removed".to_owned()))
}
