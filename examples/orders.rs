//! An order and the job that ships it, saved in one database transaction.
//!
//! The service writes its `orders` row and submits the `ship` job with
//! `taskmill::submit_in` on the same transaction: if the transaction rolls back,
//! there is no job; once it commits, the job runs even if this process dies the next
//! instant (any pod's request relay publishes it). The example runs a pod with the
//! `ship` handler beside it, places one order, and waits for the order to be shipped.
//!
//! ```sh
//! cargo run --example orders            # SQLite file taskmill.db, broker on localhost
//! DATABASE_URL=postgres://localhost/test cargo run --example orders
//! ```

use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use serde_json::{json, Value};
use taskmill::{CancellationToken, Client, Config, JobRequest, Pod, Store, TaskContext, TaskError};

/// Marks the order in the payload shipped; shipping it twice changes nothing.
async fn ship(db: DatabaseConnection, ctx: TaskContext) -> Result<Value, TaskError> {
    let order = ctx.payload["order"]
        .as_i64()
        .ok_or_else(|| TaskError::permanent("no order id in the payload"))?;
    db.execute_unprepared(&format!("UPDATE orders SET shipped = 1 WHERE id = {order}"))
        .await
        .map_err(|err| TaskError::retryable(format!("order {order} not marked shipped: {err}")))?;
    Ok(json!({ "shipped": order }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let config = Config::from_env()?;
    let store = Store::connect(&config.database_url, 4).await?;
    store.migrate().await?;
    let db = Database::connect(&config.database_url).await?;
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS orders (
             id BIGINT PRIMARY KEY, item TEXT NOT NULL, shipped INTEGER NOT NULL DEFAULT 0)",
    )
    .await?;

    let shutdown = CancellationToken::new();
    let pod = Pod::builder()
        .config(config.clone())
        .store(store.clone())
        .handler("ship", {
            let db = db.clone();
            move |ctx| ship(db.clone(), ctx)
        })
        .build();
    let running = tokio::spawn(pod.run(shutdown.clone()));

    let order_id = chrono::Utc::now().timestamp_micros();
    let txn = db.begin().await?;
    txn.execute_unprepared(&format!(
        "INSERT INTO orders (id, item) VALUES ({order_id}, 'a teapot')"
    ))
    .await?;
    let mut request = JobRequest::new("ship", vec![json!({ "order": order_id })]);
    request.job_id = Some(format!("ship-order-{order_id}"));
    let job_id = taskmill::submit_in(&txn, request).await?;
    txn.commit().await?;
    println!("order {order_id} saved; job {job_id} submitted with it");

    let client = Client::connect(&config).await?.with_store(store);
    let event = tokio::time::timeout(Duration::from_secs(60), client.wait(&job_id)).await??;
    println!("job {job_id} ended {}", event.stage);
    client.close().await?;
    shutdown.cancel();
    running.await??;
    Ok(())
}
