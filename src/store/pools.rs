//! What the store knows of worker pools: which were ever served (registered by the
//! pods consuming them, refreshed while they do), and which running jobs wait on a
//! pool nobody has consumed lately.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::error::StoreError;
use super::handle::Store;
use crate::state::JobStage;
use entity::job;
use entity::pool;

/// A pool that running jobs wait on but that no pod has consumed since the cut-off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SilentPool {
    /// The pool's name.
    pub name: String,
    /// When a pod last consumed it; `None` if none ever did.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Running jobs that wait on it.
    pub running_jobs: u64,
}

impl Store {
    /// Marks `pools` as consumed now.
    pub async fn register_pools(&self, pools: &[String]) -> Result<(), StoreError> {
        if pools.is_empty() {
            return Ok(());
        }
        self.retrying("register pools", || async {
            let now = Utc::now();
            pool::Entity::insert_many(pools.iter().map(|name| pool::ActiveModel {
                name: Set(name.clone()),
                last_seen_at: Set(now),
            }))
            .on_conflict(
                OnConflict::column(pool::Column::Name)
                    .update_column(pool::Column::LastSeenAt)
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
            Ok(())
        })
        .await
    }

    /// Every pool a pod ever served, by name.
    pub async fn pools(&self) -> Result<Vec<pool::Model>, StoreError> {
        self.retrying("list pools", || async {
            Ok(pool::Entity::find()
                .order_by_asc(pool::Column::Name)
                .all(&self.db)
                .await?)
        })
        .await
    }

    /// The pool's registration, if a pod ever served it.
    pub async fn pool(&self, name: &str) -> Result<Option<pool::Model>, StoreError> {
        self.retrying("read pool", || async {
            Ok(pool::Entity::find_by_id(name.to_owned())
                .one(&self.db)
                .await?)
        })
        .await
    }

    /// Pools with running jobs that no pod has consumed since `seen_since`.
    pub async fn silent_pools(
        &self,
        seen_since: DateTime<Utc>,
    ) -> Result<Vec<SilentPool>, StoreError> {
        self.retrying("find silent pools", || async {
            let waiting: Vec<(String, i64)> = job::Entity::find()
                .select_only()
                .column(job::Column::Queue)
                .column_as(job::Column::Id.count(), "running_jobs")
                .filter(job::Column::Stage.eq(JobStage::Running.as_str()))
                .group_by(job::Column::Queue)
                .into_tuple()
                .all(&self.db)
                .await?;
            if waiting.is_empty() {
                return Ok(Vec::new());
            }
            let seen: BTreeMap<String, DateTime<Utc>> = pool::Entity::find()
                .filter(pool::Column::Name.is_in(waiting.iter().map(|(name, _)| name.clone())))
                .all(&self.db)
                .await?
                .into_iter()
                .map(|pool| (pool.name, pool.last_seen_at))
                .collect();
            Ok(waiting
                .into_iter()
                .filter_map(|(name, running_jobs)| {
                    let last_seen_at = seen.get(&name).copied();
                    let silent = last_seen_at.is_none_or(|at| at < seen_since);
                    silent.then_some(SilentPool {
                        name,
                        last_seen_at,
                        running_jobs: running_jobs as u64,
                    })
                })
                .collect())
        })
        .await
    }
}
