//! Transactional submit: a job request written in the producer's own transaction
//! (`taskmill::submit_in`) becomes a job if and only if that transaction commits; the
//! intake's relay publishes it after the commit. The relay killed -9 between its
//! publish and its delete is in the fault suite.

mod common;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use serde_json::json;
use taskmill::{builtin, Config, JobRequest};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    a_rolled_back_submit_leaves_nothing,
    a_thousand_transactions_make_a_thousand_jobs,
    a_large_job_is_written_as_parts_in_one_transaction,
    the_outbox_keeps_every_check_and_answer,
);

/// The application's own connection to the database of taskmill's tables, with its
/// `orders` table.
async fn application(env: &TestEnv) -> DatabaseConnection {
    let db = Database::connect(&env.config.database_url).await.unwrap();
    db.execute_unprepared("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)")
        .await
        .unwrap();
    db
}

/// Saves an order and submits its job in one transaction; commits or rolls back.
async fn order(db: &DatabaseConnection, id: i64, commit: bool) -> String {
    let txn = db.begin().await.unwrap();
    txn.execute_unprepared(&format!(
        "INSERT INTO orders (id, item) VALUES ({id}, 'tea')"
    ))
    .await
    .unwrap();
    let mut request = JobRequest::new(builtin::ECHO, vec![json!({ "order": id })]);
    request.job_id = Some(format!("order-{id}"));
    let job_id = taskmill::submit_in(&txn, request).await.unwrap();
    if commit {
        txn.commit().await.unwrap();
    } else {
        txn.rollback().await.unwrap();
    }
    job_id
}

async fn a_rolled_back_submit_leaves_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let db = application(&env).await;
    let pod = env.start(env.pod());
    let rolled_back = order(&db, 1, false).await;
    let committed = order(&db, 2, true).await;
    // The relay publishes in commit order: once the later job ran, the earlier one
    // would have been published too, had it been committed.
    assert_eq!(env.wait_for_end(&committed, LONG).await.stage, "done");
    assert!(env.store.job(&rolled_back).await.unwrap().is_none());
    assert_eq!(env.count("SELECT count(*) AS n FROM orders").await, 1);
    assert_eq!(env.count("SELECT count(*) AS n FROM job_requests").await, 0);
    assert_eq!(env.count("SELECT count(*) AS n FROM jobs").await, 1);
    pod.stop().await;
}

async fn a_thousand_transactions_make_a_thousand_jobs(backend: Backend) {
    const JOBS: i64 = 1_000;
    let env = TestEnv::new(backend).await;
    let db = application(&env).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod());
    for id in 0..JOBS {
        order(&db, id, true).await;
    }
    let events = events.wait_for(JOBS as usize, LONG).await;
    let mut ids: Vec<&str> = events.iter().map(|e| e.job_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), JOBS as usize, "one event per job");
    assert_eq!(events.len(), JOBS as usize, "and no other");
    assert!(events.iter().all(|e| e.stage == "done"));
    assert_eq!(env.count("SELECT count(*) AS n FROM job_requests").await, 0);
    pod.stop().await;
}

async fn a_large_job_is_written_as_parts_in_one_transaction(backend: Backend) {
    let tasks = taskmill::client::PART_TASKS + 5;
    let env = TestEnv::new(backend).await;
    let db = application(&env).await;
    let txn = db.begin().await.unwrap();
    let request = JobRequest::new(builtin::ECHO, (0..tasks).map(|n| json!(n)).collect());
    let job_id = taskmill::submit_in(&txn, request).await.unwrap();
    let rows = txn
        .query_one_raw(sea_orm::Statement::from_string(
            txn.get_database_backend(),
            "SELECT count(*) AS n FROM job_requests",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(rows, 3, "two parts and the seal");
    txn.commit().await.unwrap();

    let pod = env.start(env.pod());
    assert_eq!(env.wait_for_end(&job_id, LONG).await.stage, "done");
    assert_eq!(env.rows_of_job(&job_id).await[1], tasks as i64);
    assert_eq!(env.count("SELECT count(*) AS n FROM job_requests").await, 0);
    pod.stop().await;
}

/// What the outbox holds is a request like any other: a bad one is refused by
/// `submit_in` before anything is written; one written with SQL alone runs; one that
/// is not a request is parked with its reason; one over the intake's limit is never
/// published but answered with `job.rejected`. None stays in the outbox.
async fn the_outbox_keeps_every_check_and_answer(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let db = application(&env).await;
    let config = Config {
        max_request_bytes: 64 * 1024,
        ..env.config.clone()
    };
    let pod = env.start(env.pod().config(config));
    let client = env.client().await;

    let txn = db.begin().await.unwrap();
    let mut bad = JobRequest::new(builtin::ECHO, vec![json!(1)]);
    bad.job_type = "no spaces allowed".into();
    assert!(taskmill::submit_in(&txn, bad).await.is_err());
    txn.rollback().await.unwrap();

    let oversize = client.watch("too-big").await.unwrap();
    let txn = db.begin().await.unwrap();
    let mut big = JobRequest::new(builtin::ECHO, vec![json!(1)]);
    big.job_id = Some("too-big".into());
    big.params = json!("x".repeat(100 * 1024));
    taskmill::submit_in(&txn, big).await.unwrap();
    txn.commit().await.unwrap();
    match tokio::time::timeout(LONG, oversize.event()).await.unwrap() {
        Err(taskmill::Error::Rejected { job_id, reason }) => {
            assert_eq!(job_id, "too-big");
            assert!(reason.contains("over the intake's limit"), "{reason}");
        }
        other => panic!("a rejection, not {other:?}"),
    }

    // A row SQL wrote with a time past the intake's bound would wait for ever: it is
    // answered at once, as the intake answers such a request.
    let far = client.watch("far-ahead").await.unwrap();
    let far_ahead = (chrono::Utc::now() + chrono::TimeDelta::days(400)).to_rfc3339();
    env.execute_sql(&[
        "INSERT INTO job_requests (job_id, job_type, body) VALUES ('not-json', 'taskmill.echo', 'tea')",
        r#"INSERT INTO job_requests (job_id, job_type, body) VALUES ('by-sql', 'taskmill.echo',
           '{"version": 1, "job_id": "by-sql", "job_type": "taskmill.echo", "tasks": [1, 2, 3]}')"#,
        &format!(
            r#"INSERT INTO job_requests (job_id, job_type, body, run_at) VALUES ('far-ahead',
               'taskmill.echo', '{{"version": 1, "job_id": "far-ahead", "job_type": "taskmill.echo",
               "tasks": [1]}}', '{far_ahead}')"#
        ),
    ])
    .await;
    match tokio::time::timeout(LONG, far.event()).await.unwrap() {
        Err(taskmill::Error::Rejected { job_id, reason }) => {
            assert_eq!(job_id, "far-ahead");
            assert!(reason.contains("days ahead"), "{reason}");
        }
        other => panic!("a rejection, not {other:?}"),
    }
    assert!(env.store.job("far-ahead").await.unwrap().is_none());
    assert_eq!(env.wait_for_end("by-sql", LONG).await.stage, "done");
    let parking = env.topology().parking_queue();
    common::wait_until(LONG, || async { env.message_count(&parking).await == 1 }).await;
    let parked = env.drain_queue(&parking).await;
    let reason = parked[0].1.as_deref().unwrap_or_default();
    assert!(
        reason.contains("JSON") || reason.contains("expected"),
        "{reason}"
    );
    assert!(env.store.job("not-json").await.unwrap().is_none());
    assert!(env.store.job("too-big").await.unwrap().is_none());
    assert_eq!(env.count("SELECT count(*) AS n FROM job_requests").await, 0);
    client.close().await.unwrap();
    pod.stop().await;
}
