//! Jobs sent in parts: a part claims its number and place (under the job's row lock)
//! before its task rows go in and is marked stored after them; the seal says how many
//! parts and tasks there are; a job whose parts are all stored can start.
//!
//! Claiming the number first makes a part idempotent across a crash: the redelivered
//! request finds its own claim (same digest) and stores the rest of its rows, while a
//! different part under the same number, or one overlapping another part's tasks, is
//! refused before any of its rows go in.

use std::collections::BTreeSet;

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

use super::error::StoreError;
use super::handle::Store;
use super::job_ends::lock_job;
use crate::protocol::{Part, Seal};
use crate::state::JobStage;
use entity::{job, job_part};

/// What [`Store::claim_part`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartClaim {
    /// Store the part's rows (first time, or resuming after a crash), then call
    /// [`Store::part_stored`].
    Store,
    /// The part is in already: a copy of a request that was answered.
    AlreadyStored,
    /// The part cannot go into the job; why.
    Refused(String),
}

/// Whether a job sent in parts has all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartsState {
    /// The job left formation already: nothing to start.
    Started,
    /// Not sealed yet, or parts missing.
    Waiting,
    /// Sealed, and every part stored: start the job with this many tasks.
    Complete(i64),
    /// Sealed, every part stored, and still not the job the seal describes.
    Never(String),
}

impl Store {
    /// Claims part `part.number` of the forming job `job_id` for tasks
    /// `part.offset .. part.offset + tasks`, identified by `digest`.
    pub async fn claim_part(
        &self,
        job_id: &str,
        part: Part,
        tasks: i64,
        digest: &str,
    ) -> Result<PartClaim, StoreError> {
        self.retrying("claim a part", || async {
            let (job_id, digest) = (job_id.to_owned(), digest.to_owned());
            self.transact(move |txn| {
                Box::pin(async move { claim_part_in(txn, &job_id, part, tasks, &digest).await })
            })
            .await
        })
        .await
    }

    /// Marks part `number` of `job_id` stored: every one of its rows is in.
    pub async fn part_stored(&self, job_id: &str, number: u32) -> Result<(), StoreError> {
        self.retrying("mark a part stored", || async {
            job_part::Entity::update_many()
                .col_expr(job_part::Column::Stored, Expr::value(true))
                .filter(job_part::Column::JobId.eq(job_id))
                .filter(job_part::Column::Number.eq(number as i32))
                .exec(&self.db)
                .await?;
            Ok(())
        })
        .await
    }

    /// Seals the forming job `job_id`: it has `seal.parts` parts and `seal.tasks`
    /// tasks. Sealing again with the same counts is harmless; with others, or counts
    /// that the parts already in contradict, it is refused (`Some(reason)`).
    pub async fn seal_job(&self, job_id: &str, seal: Seal) -> Result<Option<String>, StoreError> {
        self.retrying("seal a job", || async {
            let job_id = job_id.to_owned();
            self.transact(move |txn| Box::pin(async move { seal_in(txn, &job_id, seal).await }))
                .await
        })
        .await
    }

    /// Whether the forming job `job_id`, sent in parts, has all of them.
    pub async fn parts_state(&self, job_id: &str) -> Result<PartsState, StoreError> {
        self.retrying("check a job's parts", || async {
            let Some(job) = job::Entity::find_by_id(job_id.to_owned())
                .one(&self.db)
                .await?
            else {
                return Err(StoreError::JobNotFound(job_id.to_owned()));
            };
            if job.stage != JobStage::Formation.as_str() {
                return Ok(PartsState::Started);
            }
            let (Some(sealed_parts), Some(sealed_tasks)) = (job.sealed_parts, job.sealed_tasks)
            else {
                return Ok(PartsState::Waiting);
            };
            let stored: Option<(i64, Option<i64>)> = job_part::Entity::find()
                .select_only()
                .column_as(Expr::col(job_part::Column::Number).count(), "parts")
                .column_as(
                    Expr::col(job_part::Column::TaskCount)
                        .sum()
                        .cast_as("bigint"),
                    "tasks",
                )
                .filter(job_part::Column::JobId.eq(job_id))
                .filter(job_part::Column::Stored.eq(true))
                .into_tuple()
                .one(&self.db)
                .await?;
            let (parts, held) = stored.map_or((0, 0), |(parts, tasks)| (parts, tasks.unwrap_or(0)));
            if parts < i64::from(sealed_parts) {
                return Ok(PartsState::Waiting);
            }
            // Parts never overlap and lie within the seal's tasks (both checked when
            // they are claimed): if their tasks add up, they cover the job.
            Ok(if held == sealed_tasks {
                PartsState::Complete(sealed_tasks)
            } else {
                PartsState::Never(format!(
                    "its {sealed_parts} parts hold {held} tasks, but it was sealed with \
                     {sealed_tasks}"
                ))
            })
        })
        .await
    }

    /// The parts of a job sent in parts, by number (none for any other job).
    pub async fn parts(&self, job_id: &str) -> Result<Vec<job_part::Model>, StoreError> {
        self.retrying("list a job's parts", || async {
            Ok(parts_of(&self.db, job_id).await?)
        })
        .await
    }

    /// Why a job sent in parts has not finished forming, for the failure that ends
    /// its wait; `None` for a job not sent in parts.
    pub async fn missing_parts(&self, job: &job::Model) -> Result<Option<String>, StoreError> {
        let parts = self.parts(&job.id).await?;
        if parts.is_empty() && job.sealed_parts.is_none() {
            return Ok(None);
        }
        let stored: BTreeSet<i32> = parts
            .iter()
            .filter(|part| part.stored)
            .map(|part| part.number)
            .collect();
        let Some(sealed_parts) = job.sealed_parts else {
            return Ok(Some(format!(
                "it was never sealed ({} part(s) stored: {})",
                stored.len(),
                listed(stored.iter().copied())
            )));
        };
        let missing: Vec<i32> = (1..=sealed_parts)
            .filter(|number| !stored.contains(number))
            .collect();
        Ok(Some(format!(
            "sealed with {sealed_parts} parts, it is missing part(s) {}",
            listed(missing.into_iter())
        )))
    }
}

async fn claim_part_in<C: ConnectionTrait>(
    txn: &C,
    job_id: &str,
    part: Part,
    tasks: i64,
    digest: &str,
) -> Result<PartClaim, StoreError> {
    let first = part.offset as i64;
    let end = first + tasks;
    let number = part.number as i32;
    // The lock first: on SQLite a transaction that reads before it writes fails at its
    // first write if another one wrote meanwhile.
    let forming = lock_job(txn, job_id, JobStage::Formation).await?;
    let existing = job_part::Entity::find_by_id((job_id.to_owned(), number))
        .one(txn)
        .await?;
    let same = existing.as_ref().filter(|claimed| claimed.digest == digest);
    if existing.is_some() && same.is_none() {
        return Ok(PartClaim::Refused(format!(
            "part {number} of job {job_id:?} was sent before with other tasks"
        )));
    }
    let Some(job) = forming else {
        if same.is_some_and(|claimed| claimed.stored) {
            return Ok(PartClaim::AlreadyStored);
        }
        let stage = job::Entity::find_by_id(job_id.to_owned())
            .one(txn)
            .await?
            .map_or_else(|| "gone".to_owned(), |job| job.stage);
        return Ok(PartClaim::Refused(format!(
            "part {number} arrived after job {job_id:?} stopped forming (it is {stage})"
        )));
    };
    if let Some(claimed) = same {
        return Ok(if claimed.stored {
            PartClaim::AlreadyStored
        } else {
            PartClaim::Store
        });
    }
    if let (Some(parts), Some(sealed)) = (job.sealed_parts, job.sealed_tasks) {
        if number > parts || end > sealed {
            return Ok(PartClaim::Refused(format!(
                "part {number} (tasks {first}..{end}) lies outside the seal of job {job_id:?}: \
                 {parts} parts, {sealed} tasks"
            )));
        }
    }
    let overlapping = job_part::Entity::find()
        .filter(job_part::Column::JobId.eq(job_id))
        .filter(job_part::Column::FirstOrdinal.lt(end))
        .filter(
            Expr::col(job_part::Column::FirstOrdinal)
                .add(Expr::col(job_part::Column::TaskCount))
                .gt(first),
        )
        .one(txn)
        .await?;
    if let Some(other) = overlapping {
        return Ok(PartClaim::Refused(format!(
            "part {number} (tasks {first}..{end}) overlaps part {} (tasks {}..{}) of job {job_id:?}",
            other.number,
            other.first_ordinal,
            other.first_ordinal + other.task_count
        )));
    }
    job_part::Entity::insert(job_part::ActiveModel {
        job_id: Set(job_id.to_owned()),
        number: Set(number),
        first_ordinal: Set(first),
        task_count: Set(tasks),
        digest: Set(digest.to_owned()),
        stored: Set(false),
        created_at: Set(Utc::now()),
    })
    .exec_without_returning(txn)
    .await?;
    Ok(PartClaim::Store)
}

async fn seal_in<C: ConnectionTrait>(
    txn: &C,
    job_id: &str,
    seal: Seal,
) -> Result<Option<String>, StoreError> {
    let (parts, tasks) = (seal.parts as i32, seal.tasks as i64);
    let job = match lock_job(txn, job_id, JobStage::Formation).await? {
        Some(job) => job,
        None => {
            let job = job::Entity::find_by_id(job_id.to_owned())
                .one(txn)
                .await?
                .ok_or_else(|| StoreError::JobNotFound(job_id.to_owned()))?;
            return Ok(match (job.sealed_parts, job.sealed_tasks) {
                (Some(p), Some(t)) if (p, t) == (parts, tasks) => None,
                _ => Some(format!(
                    "the seal arrived after job {job_id:?} stopped forming (it is {})",
                    job.stage
                )),
            });
        }
    };
    match (job.sealed_parts, job.sealed_tasks) {
        (Some(p), Some(t)) if (p, t) == (parts, tasks) => return Ok(None),
        (Some(p), Some(t)) => {
            return Ok(Some(format!(
                "job {job_id:?} was sealed before with {p} parts and {t} tasks, not {parts} and \
                 {tasks}"
            )))
        }
        _ => {}
    }
    let outside = job_part::Entity::find()
        .filter(job_part::Column::JobId.eq(job_id))
        .filter(
            Condition::any()
                .add(job_part::Column::Number.gt(parts))
                .add(
                    Expr::col(job_part::Column::FirstOrdinal)
                        .add(Expr::col(job_part::Column::TaskCount))
                        .gt(tasks),
                ),
        )
        .one(txn)
        .await?;
    if let Some(outside) = outside {
        return Ok(Some(format!(
            "job {job_id:?} sealed with {parts} parts and {tasks} tasks, but its part {} holds \
             tasks {}..{}",
            outside.number,
            outside.first_ordinal,
            outside.first_ordinal + outside.task_count
        )));
    }
    job::Entity::update_many()
        .col_expr(job::Column::SealedParts, Expr::value(parts))
        .col_expr(job::Column::SealedTasks, Expr::value(tasks))
        .filter(job::Column::Id.eq(job_id))
        .exec(txn)
        .await?;
    Ok(None)
}

async fn parts_of<C: ConnectionTrait>(
    db: &C,
    job_id: &str,
) -> Result<Vec<job_part::Model>, sea_orm::DbErr> {
    job_part::Entity::find()
        .filter(job_part::Column::JobId.eq(job_id))
        .order_by_asc(job_part::Column::Number)
        .all(db)
        .await
}

/// `1, 2, 5` — or `none`; long lists are cut after 20.
fn listed(numbers: impl Iterator<Item = i32>) -> String {
    let numbers: Vec<String> = numbers.map(|n| n.to_string()).collect();
    match numbers.len() {
        0 => "none".to_owned(),
        n if n > 20 => format!("{} and {} more", numbers[..20].join(", "), n - 20),
        _ => numbers.join(", "),
    }
}
