//! Periodic jobs' rows: a schedule's definition written (kept as it is when unchanged,
//! so its ticks go on), the due ones read, and a tick fired: its request written to
//! the outbox of requests and the schedule moved on by a compare-and-set on its next
//! tick, in one transaction.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::error::StoreError;
use super::handle::Store;
use super::requests::{write_requests, NewRequest};
use entity::schedule;

/// Schedules listed at most: they are an operator's, not a producer's.
const LISTED: u64 = 1_000;

/// A schedule's definition, and its first tick from now.
#[derive(Clone, Debug)]
pub struct NewSchedule {
    /// The schedule's name, its key.
    pub name: String,
    /// The cron pattern.
    pub cron: String,
    /// The IANA time zone it is read in.
    pub timezone: String,
    /// The request each tick submits, as JSON.
    pub request: String,
    /// `skip` or `all`.
    pub catch_up: String,
    /// The first tick, should the definition be new or changed.
    pub next_tick: DateTime<Utc>,
}

/// A due schedule's ticks fired: the next tick expected (the compare-and-set), the
/// last tick fired and its job (none: the schedule is only put off), the tick after
/// it, and the ticks' requests.
#[derive(Clone, Debug)]
pub struct Fired {
    /// The schedule.
    pub name: String,
    /// Its next tick as read: fired only if it is still that.
    pub expected: DateTime<Utc>,
    /// The last tick fired, and its job's id.
    pub last: Option<(DateTime<Utc>, String)>,
    /// The tick after the last one fired.
    pub next_tick: DateTime<Utc>,
    /// The requests of the ticks fired, oldest first.
    pub requests: Vec<NewRequest>,
}

impl Store {
    /// Writes a schedule; `false` when the same definition was there (its ticks go
    /// on from where they were), `true` when it was new or changed (it starts at
    /// `next_tick`).
    pub async fn put_schedule(&self, new: &NewSchedule) -> Result<bool, StoreError> {
        self.retrying("put schedule", || {
            let new = new.clone();
            self.transact(move |txn| {
                Box::pin(async move {
                    let existing = schedule::Entity::find_by_id(new.name.clone())
                        .lock_exclusive()
                        .one(txn)
                        .await?;
                    let same = existing.as_ref().is_some_and(|row| {
                        (&row.cron, &row.timezone, &row.request, &row.catch_up)
                            == (&new.cron, &new.timezone, &new.request, &new.catch_up)
                    });
                    if same {
                        return Ok(false);
                    }
                    if existing.is_some() {
                        schedule::Entity::update_many()
                            .col_expr(schedule::Column::Cron, Expr::value(new.cron))
                            .col_expr(schedule::Column::Timezone, Expr::value(new.timezone))
                            .col_expr(schedule::Column::Request, Expr::value(new.request))
                            .col_expr(schedule::Column::CatchUp, Expr::value(new.catch_up))
                            .col_expr(schedule::Column::NextTick, Expr::value(new.next_tick))
                            .col_expr(schedule::Column::UpdatedAt, Expr::value(Utc::now()))
                            .filter(schedule::Column::Name.eq(new.name.as_str()))
                            .exec(txn)
                            .await?;
                        return Ok(true);
                    }
                    // Pods starting together with the same schedule: the first writes it.
                    let inserted = schedule::Entity::insert(schedule::ActiveModel {
                        name: Set(new.name.clone()),
                        cron: Set(new.cron),
                        timezone: Set(new.timezone),
                        request: Set(new.request),
                        catch_up: Set(new.catch_up),
                        next_tick: Set(new.next_tick),
                        last_tick: Set(None),
                        last_job_id: Set(None),
                        updated_at: Set(Utc::now()),
                    })
                    .on_conflict(
                        OnConflict::column(schedule::Column::Name)
                            .do_nothing()
                            .to_owned(),
                    )
                    .exec_without_returning(txn)
                    .await?;
                    Ok(inserted == 1)
                })
            })
        })
        .await
    }

    /// Removes a schedule; `false` if there was none of that name.
    pub async fn remove_schedule(&self, name: &str) -> Result<bool, StoreError> {
        self.retrying("remove schedule", || async {
            let removed = schedule::Entity::delete_by_id(name.to_owned())
                .exec(&self.db)
                .await?;
            Ok(removed.rows_affected == 1)
        })
        .await
    }

    /// The schedules, by name (the first thousand).
    pub async fn schedules(&self) -> Result<Vec<schedule::Model>, StoreError> {
        self.retrying("list schedules", || async {
            Ok(schedule::Entity::find()
                .order_by_asc(schedule::Column::Name)
                .limit(LISTED)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// The schedules whose next tick has come, soonest first, `limit` at most.
    pub async fn due_schedules(
        &self,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<schedule::Model>, StoreError> {
        self.retrying("list due schedules", || async {
            Ok(schedule::Entity::find()
                .filter(schedule::Column::NextTick.lte(now))
                .order_by_asc(schedule::Column::NextTick)
                .limit(limit)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// Fires ticks: moves the schedule on if its next tick is still the one expected,
    /// and writes their requests, in one transaction; `false` (nothing written) if
    /// another pod fired them first or the schedule changed meanwhile.
    pub async fn fire_ticks(&self, fired: &Fired) -> Result<bool, StoreError> {
        self.retrying("fire ticks", || {
            let fired = fired.clone();
            self.transact(move |txn| {
                Box::pin(async move {
                    let mut update = schedule::Entity::update_many()
                        .col_expr(schedule::Column::NextTick, Expr::value(fired.next_tick))
                        .col_expr(schedule::Column::UpdatedAt, Expr::value(Utc::now()));
                    if let Some((tick, job_id)) = &fired.last {
                        update = update
                            .col_expr(schedule::Column::LastTick, Expr::value(*tick))
                            .col_expr(schedule::Column::LastJobId, Expr::value(job_id.clone()));
                    }
                    let moved = update
                        .filter(schedule::Column::Name.eq(fired.name.as_str()))
                        .filter(schedule::Column::NextTick.eq(fired.expected))
                        .exec(txn)
                        .await?;
                    if moved.rows_affected != 1 {
                        return Ok(false);
                    }
                    write_requests(txn, fired.requests).await?;
                    Ok(true)
                })
            })
        })
        .await
    }
}
