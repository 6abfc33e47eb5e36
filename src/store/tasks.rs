//! Task transitions, each one conditional UPDATE naming the state it expects:
//!
//! - claim: `pending|retrying` with `attempts = n-1` → `running`, `attempts = n`; or a
//!   `running` attempt n taken over (redelivery after a dead worker, expired lease, or
//!   our own retried write), which keeps `attempts`; `deliveries` counts the starts of
//!   the attempt's handler (a taken-over attempt counts its start when it runs);
//! - finish: `running` attempt n → `done` (+ result) or `failed` (+ info);
//! - retry: `running` attempt n → `retrying` (+ info).
//!
//! Every one of them also names the job's run r of its message: the task's `run` (the
//! run that last reset it) must be at most r. A retry of a failed job starts attempts
//! over at 1, so without it a message of run r-1 (in the delay ladder, redelivered)
//! would claim or finish attempt n of run r.
//!
//! Zero rows changed means the message was stale or a duplicate. Fresh claims and
//! outcomes come in batches: one statement per attempt number claims a batch, and one
//! transaction records a batch of outcomes, so the database's cost per task shrinks
//! with load instead of capping it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use sea_orm::sea_query::{
    CaseStatement, Expr, ExprTrait, Func, Query, SimpleExpr, UpdateStatement,
};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseBackend, EntityTrait, FromQueryResult,
    QueryFilter, QuerySelect, QueryTrait, Statement,
};

use super::error::StoreError;
use super::handle::Store;
use super::job_ends::end_over_in;
use super::pg_batch::{self, one_of};
use super::rows::{Claim, Recorded, TaskOutcome, Transition};
use crate::clock;
use crate::state::{JobStage, TaskStatus};
use entity::{job, task};

fn lease_deadline(lease: Duration) -> chrono::DateTime<Utc> {
    clock::from_now(lease)
}

impl Store {
    /// Claims attempt `attempt` of a task for the holder of `token`: fresh (`pending`
    /// or `retrying`), or else a takeover of the running attempt. `redelivered` (the
    /// broker's flag) allows the takeover at once: the previous holder's channel died,
    /// so nobody will finish it; otherwise only an expired lease (or our own claim,
    /// after a retried write) allows it. A takeover does not count a delivery: the
    /// caller does, with [`Store::count_start`], once the handler is about to run.
    ///
    /// A claim never looks at the job: a task is pending, retrying or running only
    /// while its job is live, since every job end cancels its unfinished tasks (or has
    /// none left) in the transaction that ends it, and task rows go in only while the
    /// job is forming ([`Store::insert_tasks`]). (Checking the job's stage per claimed
    /// row cost a lookup of the job's row per task, through every dead version its
    /// counter updates leave: 64 of the 65 s PostgreSQL worked in S2.)
    pub async fn claim_task(
        &self,
        task_id: i64,
        attempt: i32,
        run: i32,
        token: &str,
        redelivered: bool,
        lease: Duration,
    ) -> Result<Option<Claim>, StoreError> {
        self.retrying("claim task", || async {
            let fresh = claiming(attempt, Expr::value(1), token, lease)
                .filter(task::Column::Id.eq(task_id))
                .filter(task::Column::Run.lte(run))
                .filter(
                    task::Column::Status
                        .is_in([TaskStatus::Pending.as_str(), TaskStatus::Retrying.as_str()]),
                )
                .filter(task::Column::Attempts.eq(attempt - 1))
                .exec_with_returning(&self.db)
                .await?;
            if let Some(row) = fresh.into_iter().next() {
                return Ok(Some(Claim {
                    starts: row.deliveries,
                    taken_over: false,
                }));
            }
            let mut takeover_allowed = Condition::any()
                .add(task::Column::ClaimedBy.eq(token))
                .add(task::Column::LeaseUntil.lt(Utc::now()));
            if redelivered {
                takeover_allowed = takeover_allowed.add(Expr::value(true));
            }
            let taken = claiming(attempt, Expr::col(task::Column::Deliveries), token, lease)
                .filter(task::Column::Id.eq(task_id))
                .filter(task::Column::Run.lte(run))
                .filter(task::Column::Status.eq(TaskStatus::Running.as_str()))
                .filter(task::Column::Attempts.eq(attempt))
                .filter(takeover_allowed)
                .exec_with_returning(&self.db)
                .await?;
            Ok(taken.into_iter().next().map(|row| Claim {
                starts: row.deliveries,
                taken_over: true,
            }))
        })
        .await
    }

    /// Counts one more start of a taken-over attempt still claimed by `token`; returns
    /// the starts so far, this one included (`None`: the claim was lost meanwhile).
    pub async fn count_start(
        &self,
        task_id: i64,
        attempt: i32,
        token: &str,
    ) -> Result<Option<i32>, StoreError> {
        self.retrying("count a start", || async {
            let rows = task::Entity::update_many()
                .col_expr(
                    task::Column::Deliveries,
                    Expr::col(task::Column::Deliveries).add(1),
                )
                .filter(task::Column::Id.eq(task_id))
                .filter(task::Column::Status.eq(TaskStatus::Running.as_str()))
                .filter(task::Column::Attempts.eq(attempt))
                .filter(task::Column::ClaimedBy.eq(token))
                .exec_with_returning(&self.db)
                .await?;
            Ok(rows.into_iter().next().map(|row| row.deliveries))
        })
        .await
    }

    /// Extends the lease of a claim that is still ours.
    pub async fn renew_lease(
        &self,
        task_id: i64,
        attempt: i32,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.retrying("renew lease", || async {
            let renewed = task::Entity::update_many()
                .col_expr(task::Column::LeaseUntil, Expr::value(lease_deadline(lease)))
                .filter(task::Column::Id.eq(task_id))
                .filter(task::Column::Status.eq(TaskStatus::Running.as_str()))
                .filter(task::Column::Attempts.eq(attempt))
                .filter(task::Column::ClaimedBy.eq(token))
                .exec(&self.db)
                .await?;
            Ok(renewed.rows_affected == 1)
        })
        .await
    }

    /// Claims attempt `attempt` of run `run` of many fresh tasks (`pending` or
    /// `retrying` with `attempts = attempt - 1`), given as `(task id, attempt, run)`,
    /// for `token`: one statement per attempt and run. Returns the claimed ids; the
    /// others were stale, duplicates, or need a takeover ([`Store::claim_task`]).
    pub async fn claim_tasks(
        &self,
        claims: &[(i64, i32, i32)],
        token: &str,
        lease: Duration,
    ) -> Result<HashSet<i64>, StoreError> {
        let by_attempt = by_attempt(claims);
        if by_attempt.len() == 1 {
            return self
                .retrying("claim tasks", || {
                    claim_by_attempt(&self.db, &by_attempt, token, lease)
                })
                .await;
        }
        // Several statements: all or none, so an error never leaves tasks claimed that
        // the caller believes unclaimed.
        self.retrying("claim tasks", || {
            let (by_attempt, token) = (by_attempt.clone(), token.to_owned());
            self.transact(move |txn| {
                Box::pin(async move { claim_by_attempt(txn, &by_attempt, &token, lease).await })
            })
        })
        .await
    }

    /// Which of `attempts` (task id, attempt, run) may start without a claim: the
    /// attempt before is the row's last (`pending` or `retrying`), and no later run
    /// reset it. A read: it writes nothing, so a short handler costs no claim; the
    /// outcome's compare-and-set ([`Store::finish_tasks`]) is what counts it once.
    pub async fn startable_tasks(
        &self,
        attempts: &[(i64, i32, i32)],
    ) -> Result<HashSet<i64>, StoreError> {
        let backend = self.backend();
        let by_attempt = by_attempt(attempts);
        self.retrying("read tasks to start", || async {
            let mut startable = HashSet::new();
            for (&(attempt, run), ids) in &by_attempt {
                let ids: Vec<i64> = task::Entity::find()
                    .select_only()
                    .column(task::Column::Id)
                    .filter(one_of(backend, task::Column::Id, ids.clone()))
                    .filter(task::Column::Run.lte(run))
                    .filter(
                        task::Column::Status
                            .is_in([TaskStatus::Pending.as_str(), TaskStatus::Retrying.as_str()]),
                    )
                    .filter(task::Column::Attempts.eq(attempt - 1))
                    .into_tuple()
                    .all(&self.db)
                    .await?;
                startable.extend(ids);
            }
            Ok(startable)
        })
        .await
    }

    /// Records many attempts' outcomes in one transaction, each only if its attempt is
    /// still `running`, or was never claimed (the row still `pending` or `retrying` at
    /// the attempt before: a short handler runs unclaimed), and adds
    /// the tasks that ended to their jobs' counters in the same transaction — so a
    /// duplicate, which changes no row, can never count twice. A job those counters
    /// show over ends in that transaction too: its event is in the outbox when this
    /// returns, and no finished event need go to the completion role for its tasks.
    pub async fn finish_tasks(&self, transitions: &[Transition]) -> Result<Recorded, StoreError> {
        let finishing = self.finishing(transitions);
        self.retrying("finish tasks", || async {
            let finishing = finishing.clone();
            self.transact(move |txn| {
                Box::pin(async move {
                    let (ids, counted) = finish_in(txn, &finishing).await?;
                    let (ended, to_check) = end_over_in(txn, &counted).await?;
                    Ok(Recorded {
                        ids,
                        ended,
                        to_check,
                    })
                })
            })
            .await
        })
        .await
    }

    /// What [`finish_in`] runs for `transitions`.
    pub(super) fn finishing(&self, transitions: &[Transition]) -> Finishing {
        // Two deliveries of one attempt (a redelivery that took over a running copy)
        // can land in one batch: the row moves once, so only the first outcome is
        // written and counted.
        let mut seen = HashSet::with_capacity(transitions.len());
        let transitions: Vec<Transition> = transitions
            .iter()
            .filter(|t| seen.insert(t.task_id))
            .cloned()
            .collect();
        let statements = self.finish_statements(&transitions);
        let mut job_ids: Vec<String> = transitions.iter().map(|t| t.job_id.clone()).collect();
        job_ids.sort();
        job_ids.dedup();
        Finishing {
            statements,
            job_ids,
            transitions,
        }
    }

    /// The statements of [`Store::finish_tasks`]: one for the whole batch on
    /// PostgreSQL; elsewhere one per outcome kind, attempt number and run.
    fn finish_statements(&self, transitions: &[Transition]) -> Vec<Statement> {
        let now = Utc::now();
        let backend = self.backend();
        if backend == DatabaseBackend::Postgres {
            return vec![pg_batch::finish_tasks(transitions, now)];
        }
        let mut groups: HashMap<(TaskStatus, i32, i32), Vec<&Transition>> = HashMap::new();
        for transition in transitions {
            groups
                .entry((
                    transition.outcome.status(),
                    transition.attempt,
                    transition.run,
                ))
                .or_default()
                .push(transition);
        }
        groups
            .into_iter()
            .map(|((status, attempt, run), group)| {
                backend.build(&finish_statement(status, (attempt, run), &group, now))
            })
            .collect()
    }

    /// The task row, if there is one.
    pub async fn task(&self, task_id: i64) -> Result<Option<task::Model>, StoreError> {
        self.retrying("read task", || async {
            Ok(task::Entity::find_by_id(task_id).one(&self.db).await?)
        })
        .await
    }
}

/// The statements and bookkeeping of one batch of outcomes ([`Store::finish_tasks`]).
#[derive(Clone, Debug)]
pub(super) struct Finishing {
    statements: Vec<Statement>,
    job_ids: Vec<String>,
    transitions: Vec<Transition>,
}

/// Records a batch of outcomes inside `txn` (see [`Store::finish_tasks`]); returns the
/// ids recorded, and the rows of the jobs whose counters changed, as changed.
pub(super) async fn finish_in<C: ConnectionTrait>(
    txn: &C,
    finishing: &Finishing,
) -> Result<(HashSet<i64>, Vec<job::Model>), StoreError> {
    if finishing.transitions.is_empty() {
        return Ok((HashSet::new(), Vec::new()));
    }
    // Jobs first, in id order, like every transaction that changes a job: transactions
    // on one job queue up instead of deadlocking.
    lock_live_jobs(txn, &finishing.job_ids).await?;
    let mut recorded = HashSet::new();
    for statement in &finishing.statements {
        for row in txn.query_all_raw(statement.clone()).await? {
            recorded.insert(row.try_get::<i64>("", "id")?);
        }
    }
    let counted = count_into_jobs(txn, &finishing.transitions, &recorded).await?;
    Ok((recorded, counted))
}

/// Task ids by attempt number and run: one statement each.
fn by_attempt(attempts: &[(i64, i32, i32)]) -> BTreeMap<(i32, i32), Vec<i64>> {
    let mut by_attempt: BTreeMap<(i32, i32), Vec<i64>> = BTreeMap::new();
    for &(task_id, attempt, run) in attempts {
        by_attempt.entry((attempt, run)).or_default().push(task_id);
    }
    by_attempt
}

/// One claim statement per attempt number and run; returns the ids claimed.
async fn claim_by_attempt<C: ConnectionTrait>(
    db: &C,
    by_attempt: &BTreeMap<(i32, i32), Vec<i64>>,
    token: &str,
    lease: Duration,
) -> Result<HashSet<i64>, StoreError> {
    let mut claimed = HashSet::new();
    for (&(attempt, run), ids) in by_attempt {
        let mut update = claiming(attempt, Expr::value(1), token, lease)
            .filter(one_of(
                db.get_database_backend(),
                task::Column::Id,
                ids.clone(),
            ))
            .filter(task::Column::Run.lte(run))
            .filter(
                task::Column::Status
                    .is_in([TaskStatus::Pending.as_str(), TaskStatus::Retrying.as_str()]),
            )
            .filter(task::Column::Attempts.eq(attempt - 1))
            .into_query();
        update.returning(Query::returning().column(task::Column::Id));
        for row in db.query_all(&update).await? {
            claimed.insert(row.try_get::<i64>("", "id")?);
        }
    }
    Ok(claimed)
}

/// The SET part of a claim: attempt `attempt` runs for `token` under a fresh lease.
///
/// It leaves `updated_at` alone: a running task's liveness is its lease, and no
/// column a claim changes is indexed, so PostgreSQL can write the new row version on
/// its page (a HOT update) without a new entry in any index. Setting `updated_at`,
/// the key of the sweeper's index, cost a claim 1.6 times as much.
fn claiming(
    attempt: i32,
    starts: SimpleExpr,
    token: &str,
    lease: Duration,
) -> sea_orm::UpdateMany<task::Entity> {
    task::Entity::update_many()
        .col_expr(
            task::Column::Status,
            Expr::value(TaskStatus::Running.as_str()),
        )
        .col_expr(task::Column::Attempts, Expr::value(attempt))
        .col_expr(task::Column::Deliveries, starts)
        .col_expr(task::Column::ClaimedBy, Expr::value(token))
        .col_expr(task::Column::LeaseUntil, Expr::value(lease_deadline(lease)))
        .col_expr(
            task::Column::Version,
            Expr::col(task::Column::Version).add(1),
        )
}

/// One UPDATE moving a group of attempts (same outcome kind, same attempt number and
/// run), running or run without a claim, to `status`, each with its own result or
/// error, returning the ids moved.
fn finish_statement(
    status: TaskStatus,
    (attempt, run): (i32, i32),
    group: &[&Transition],
    now: chrono::DateTime<Utc>,
) -> UpdateStatement {
    let per_task = |column: task::Column, value: fn(&TaskOutcome) -> SimpleExpr| {
        let case = group.iter().fold(CaseStatement::new(), |case, transition| {
            case.case(
                task::Column::Id.eq(transition.task_id),
                value(&transition.outcome),
            )
        });
        let value: SimpleExpr = case.finally(Expr::col(column)).into();
        (column, value)
    };
    let (column, value) = match status {
        TaskStatus::Done => per_task(task::Column::Result, |outcome| match outcome {
            TaskOutcome::Done(result) => Expr::value(result.clone()),
            _ => unreachable!("grouped by status"),
        }),
        _ => per_task(task::Column::Info, |outcome| match outcome {
            TaskOutcome::Failed(info) | TaskOutcome::Retrying(info) => Expr::value(info.clone()),
            TaskOutcome::Done(_) => unreachable!("grouped by status"),
        }),
    };
    let finished_at = if status.is_terminal() {
        Some(now)
    } else {
        None
    };
    let mut update =
        task::Entity::update_many()
            .col_expr(task::Column::Status, Expr::value(status.as_str()))
            .col_expr(column, value)
            .col_expr(task::Column::FinishedAt, Expr::value(finished_at))
            .col_expr(
                task::Column::LeaseUntil,
                Expr::value(Option::<chrono::DateTime<Utc>>::None),
            )
            .col_expr(
                task::Column::Version,
                Expr::col(task::Column::Version).add(1),
            )
            .col_expr(task::Column::UpdatedAt, Expr::value(now))
            .col_expr(task::Column::Attempts, Expr::value(attempt))
            .col_expr(
                task::Column::Deliveries,
                CaseStatement::new()
                    .case(
                        task::Column::Status.eq(TaskStatus::Running.as_str()),
                        Expr::col(task::Column::Deliveries),
                    )
                    .finally(Expr::value(1))
                    .into(),
            )
            .filter(task::Column::Id.is_in(group.iter().map(|t| t.task_id)))
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(task::Column::Status.eq(TaskStatus::Running.as_str()))
                            .add(task::Column::Attempts.eq(attempt)),
                    )
                    .add(
                        Condition::all()
                            .add(task::Column::Status.is_in([
                                TaskStatus::Pending.as_str(),
                                TaskStatus::Retrying.as_str(),
                            ]))
                            .add(task::Column::Attempts.eq(attempt - 1)),
                    ),
            )
            .filter(task::Column::Run.lte(run))
            .into_query();
    update.returning(Query::returning().column(task::Column::Id));
    update
}

/// Locks the rows of the jobs among `job_ids` that are forming or running (the jobs
/// whose counters a batch may change), in one statement: in id order, as every
/// transaction that changes a job takes its lock first, so that the counters' one
/// UPDATE for the batch cannot take them in another order.
pub(super) async fn lock_live_jobs<C: ConnectionTrait>(
    txn: &C,
    job_ids: &[String],
) -> Result<(), StoreError> {
    // A forming job keeps its `updated_at`: its formation is quiet while no part
    // arrives, whatever its first tasks do meanwhile (the sweeper's formation timeout).
    let touched = CaseStatement::new()
        .case(
            job::Column::Stage.eq(JobStage::Running.as_str()),
            Expr::value(Utc::now()),
        )
        .finally(Expr::col(job::Column::UpdatedAt));
    job::Entity::update_many()
        .col_expr(job::Column::UpdatedAt, touched.into())
        .filter(one_of(
            txn.get_database_backend(),
            job::Column::Id,
            job_ids.to_vec(),
        ))
        .filter(
            job::Column::Stage.is_in([JobStage::Formation.as_str(), JobStage::Running.as_str()]),
        )
        .exec(txn)
        .await?;
    Ok(())
}

/// Adds the recorded terminal outcomes to their jobs' counters; a job's first error
/// is the error of its lowest-numbered failed task among the first failures seen.
/// Returns the rows of the jobs it changed, as changed.
async fn count_into_jobs<C: ConnectionTrait>(
    txn: &C,
    transitions: &[Transition],
    recorded: &HashSet<i64>,
) -> Result<Vec<job::Model>, StoreError> {
    let tallies: Vec<(&str, Tally)> = tally(transitions, recorded)
        .into_iter()
        .filter(|(_, tally)| tally.done + tally.failed > 0)
        .collect();
    if tallies.is_empty() {
        return Ok(Vec::new());
    }
    if txn.get_database_backend() == DatabaseBackend::Postgres {
        let rows: Vec<(&str, i64, i64, Option<&str>)> = tallies
            .iter()
            .map(|(job_id, tally)| {
                let first_error = tally.first_error.map(|(_, info)| info);
                (*job_id, tally.done, tally.failed, first_error)
            })
            .collect();
        let changed = txn
            .query_all_raw(pg_batch::count_into_jobs(&rows))
            .await?
            .iter()
            .map(|row| job::Model::from_query_result(row, ""))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(changed);
    }
    let mut counted = Vec::new();
    for (job_id, tally) in tallies {
        let mut update = job::Entity::update_many()
            .col_expr(
                job::Column::DoneCount,
                Expr::col(job::Column::DoneCount).add(tally.done),
            )
            .col_expr(
                job::Column::FailedCount,
                Expr::col(job::Column::FailedCount).add(tally.failed),
            );
        if let Some((_, info)) = tally.first_error {
            update = update.col_expr(
                job::Column::FirstError,
                Func::coalesce([Expr::col(job::Column::FirstError), Expr::value(info)]).into(),
            );
        }
        let changed = update
            .filter(job::Column::Id.eq(job_id))
            .filter(
                job::Column::Stage
                    .is_in([JobStage::Formation.as_str(), JobStage::Running.as_str()]),
            )
            .exec_with_returning(txn)
            .await?;
        counted.extend(changed);
    }
    Ok(counted)
}

/// What one batch of outcomes adds to one job's counters.
#[derive(Debug, Default, PartialEq)]
struct Tally<'a> {
    done: i64,
    failed: i64,
    /// The lowest-numbered failed task of the batch, and its error.
    first_error: Option<(i64, &'a str)>,
}

/// Counts the terminal outcomes that were recorded (a stale one changed no row and
/// counts nothing), per job.
fn tally<'a>(
    transitions: &'a [Transition],
    recorded: &HashSet<i64>,
) -> BTreeMap<&'a str, Tally<'a>> {
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    for transition in transitions.iter().filter(|t| recorded.contains(&t.task_id)) {
        let tally = tallies.entry(transition.job_id.as_str()).or_default();
        match &transition.outcome {
            TaskOutcome::Done(_) => tally.done += 1,
            TaskOutcome::Failed(info) => {
                tally.failed += 1;
                if tally
                    .first_error
                    .is_none_or(|(id, _)| transition.task_id < id)
                {
                    tally.first_error = Some((transition.task_id, info.as_str()));
                }
            }
            TaskOutcome::Retrying(_) => {}
        }
    }
    tallies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(job_id: &str, task_id: i64, outcome: TaskOutcome) -> Transition {
        Transition {
            job_id: job_id.into(),
            task_id,
            attempt: 1,
            run: 1,
            outcome,
        }
    }

    #[test]
    fn only_recorded_terminal_outcomes_count_and_the_lowest_failed_task_names_the_error() {
        let transitions = [
            transition("a", 1, TaskOutcome::Done(serde_json::Value::Null)),
            transition("a", 7, TaskOutcome::Failed("seven".into())),
            transition("a", 3, TaskOutcome::Failed("three".into())),
            transition("a", 2, TaskOutcome::Retrying("later".into())),
            transition("b", 4, TaskOutcome::Done(serde_json::Value::Null)),
            // Stale: its UPDATE changed nothing, so it counts nothing.
            transition("b", 5, TaskOutcome::Failed("stale".into())),
            transition("c", 6, TaskOutcome::Retrying("later".into())),
        ];
        let recorded: HashSet<i64> = [1, 2, 3, 4, 6, 7].into();
        let tallies = tally(&transitions, &recorded);
        assert_eq!(
            tallies["a"],
            Tally {
                done: 1,
                failed: 2,
                first_error: Some((3, "three")),
            }
        );
        assert_eq!(
            tallies["b"],
            Tally {
                done: 1,
                failed: 0,
                first_error: None,
            }
        );
        assert_eq!(tallies["c"], Tally::default());
    }
}
