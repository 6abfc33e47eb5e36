//! [`Store`], the handle on taskmill's tables that a user opens, migrates and hands to
//! a `Pod` or a `Client` so they share one connection pool. It wraps
//! the store layer, whose statements stay inside the crate.

use crate::store::{self, StoreError};

/// taskmill's database: a connection pool to PostgreSQL or SQLite, every statement
/// retried on transient errors. Clones share the pool.
#[derive(Clone, Debug)]
pub struct Store(pub(crate) store::Store);

impl Store {
    /// Connects to `url` with at most `pool_size` connections (at most 4 on SQLite, in
    /// WAL mode), retrying transient failures for up to 90 s. It does not migrate: see
    /// [`Self::migrate`].
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        store::Store::connect(url, pool_size).await.map(Self)
    }

    /// Applies pending migrations. Pods that start at once take turns: an advisory
    /// lock on PostgreSQL, the file lock on SQLite.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.0.migrate().await
    }
}

impl From<store::Store> for Store {
    fn from(store: store::Store) -> Self {
        Self(store)
    }
}
