//! The `leases` table: named leases that let one holder at a time do some work (a
//! periodic role's, or a feeder's on its job), each lapsing unless renewed.

use std::time::Duration;

use chrono::Utc;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, Condition, EntityTrait, QueryFilter};

use super::error::StoreError;
use super::handle::Store;
use crate::clock;
use entity::lease;

impl Store {
    /// Takes or renews the lease `name` for `holder` for `ttl`; `false` while another
    /// holder's lease is live.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.retrying("acquire lease", || async {
            let now = Utc::now();
            let until = clock::after(now, ttl);
            let inserted = lease::Entity::insert(lease::ActiveModel {
                name: Set(name.to_owned()),
                holder: Set(holder.to_owned()),
                until: Set(until),
            })
            .on_conflict(
                OnConflict::column(lease::Column::Name)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
            if inserted == 1 {
                return Ok(true);
            }
            let taken = lease::Entity::update_many()
                .col_expr(lease::Column::Holder, Expr::value(holder))
                .col_expr(lease::Column::Until, Expr::value(until))
                .filter(lease::Column::Name.eq(name))
                .filter(
                    Condition::any()
                        .add(lease::Column::Holder.eq(holder))
                        .add(lease::Column::Until.lt(now)),
                )
                .exec(&self.db)
                .await?;
            Ok(taken.rows_affected == 1)
        })
        .await
    }

    /// Gives up the lease `name` if `holder` holds it, so that the next holder need
    /// not wait for it to expire.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.retrying("release lease", || async {
            lease::Entity::delete_many()
                .filter(lease::Column::Name.eq(name))
                .filter(lease::Column::Holder.eq(holder))
                .exec(&self.db)
                .await?;
            Ok(())
        })
        .await
    }
}
