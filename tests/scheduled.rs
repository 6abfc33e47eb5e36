//! Delayed jobs: a request with a `run_at` is stored at once as a `scheduled` job (no
//! task row, its request waiting in the outbox of requests) and forms when its time
//! comes, in whichever pod holds the request relay then; it can be cancelled while it
//! waits. A scheduled job whose pod is killed -9 is in the fault suite.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{Database, TransactionTrait};
use serde_json::json;
use taskmill::{builtin, JobRequest};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    a_delayed_job_waits_then_runs,
    a_scheduled_job_outlives_the_pod_that_took_it,
    a_scheduled_job_can_be_cancelled,
    the_same_scheduled_request_twice_is_one_job,
    a_delayed_job_in_parts_waits_whole,
    run_at_beyond_the_bound_is_rejected,
);

fn echo(job_id: &str, tasks: usize, run_at: DateTime<Utc>) -> JobRequest {
    let mut request = JobRequest::new(builtin::ECHO, (0..tasks).map(|n| json!(n)).collect());
    request.job_id = Some(job_id.to_owned());
    request.run_at = Some(run_at);
    request
}

/// Waits until the job is stored `scheduled`, and checks it waits as nothing but its
/// row and its request's.
async fn wait_until_scheduled(env: &TestEnv, job_id: &str) -> taskmill::store::job::Model {
    let job = common::wait_for_value(LONG, || async {
        env.store
            .job(job_id)
            .await
            .unwrap()
            .filter(|job| job.stage == "scheduled")
    })
    .await;
    assert_eq!(
        env.rows_of_job(job_id).await,
        [1, 0, 0, 0],
        "no task row yet"
    );
    let waiting = format!("SELECT COUNT(*) AS n FROM job_requests WHERE job_id = '{job_id}'");
    assert!(env.count(&waiting).await >= 1, "its request waits");
    job
}

async fn a_delayed_job_waits_then_runs(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let run_at = Utc::now() + chrono::TimeDelta::seconds(3);
    let job_id = client.submit(echo("later", 5, run_at)).await.unwrap();
    let scheduled = wait_until_scheduled(&env, &job_id).await;
    assert_eq!(
        scheduled.run_at.map(|at| at.timestamp_millis()),
        Some(run_at.timestamp_millis())
    );
    assert!(env.cli(&["status", &job_id]).contains("scheduled"));
    let stages = env.store.unfinished_jobs_by_stage().await.unwrap();
    assert!(
        stages.contains(&(taskmill::JobStage::Scheduled, 1)),
        "the jobs gauge counts it: {stages:?}"
    );

    let ended = env.wait_for_end(&job_id, LONG).await;
    assert_eq!(ended.stage, "done");
    let started = ended.started_at.expect("it started");
    assert!(
        started >= run_at,
        "not before its time: {started} < {run_at}"
    );
    eprintln!(
        "started {} ms after its run_at",
        (started - run_at).num_milliseconds()
    );
    assert_eq!(env.rows_of_job(&job_id).await[1], 5);
    assert_eq!(env.count("SELECT COUNT(*) AS n FROM job_requests").await, 0);
    client.close().await.unwrap();
    pod.stop().await;
}

/// The pod that stored the job stops before its time; another pod, started after
/// the time has passed, runs it.
async fn a_scheduled_job_outlives_the_pod_that_took_it(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let first = env.start(env.pod());
    let client = env.client().await;
    let run_at = Utc::now() + chrono::TimeDelta::seconds(2);
    let job_id = client.submit(echo("outlives", 3, run_at)).await.unwrap();
    wait_until_scheduled(&env, &job_id).await;
    first.stop().await;
    // Its time passes while no pod runs: nothing runs it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.store.job(&job_id).await.unwrap().unwrap().stage,
        "scheduled"
    );

    let second = env.start(env.pod());
    assert_eq!(env.wait_for_end(&job_id, LONG).await.stage, "done");
    client.close().await.unwrap();
    second.stop().await;
}

async fn a_scheduled_job_can_be_cancelled(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let run_at = Utc::now() + chrono::TimeDelta::seconds(2);
    let job_id = client.submit(echo("never", 3, run_at)).await.unwrap();
    wait_until_scheduled(&env, &job_id).await;
    let event = client.cancel(&job_id).await.unwrap().expect("cancelled");
    assert_eq!(event.stage, "cancelled");
    assert_eq!(env.count("SELECT COUNT(*) AS n FROM job_requests").await, 0);

    // Past its time, it stays cancelled, with no task, and one event.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert_eq!(job.stage, "cancelled");
    assert_eq!(env.rows_of_job(&job_id).await[1], 0);
    let events = events.wait_for(1, LONG).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(client.cancel(&job_id).await.unwrap().is_none());
    client.close().await.unwrap();
    pod.stop().await;
}

/// Submitted twice (once in a producer's transaction, once published), the same
/// scheduled request is one job with one waiting request; another request under its
/// id is parked.
async fn the_same_scheduled_request_twice_is_one_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let run_at = Utc::now() + chrono::TimeDelta::seconds(3);
    let db = Database::connect(&env.config.database_url).await.unwrap();
    let txn = db.begin().await.unwrap();
    taskmill::submit_in(&txn, echo("twice", 2, run_at))
        .await
        .unwrap();
    txn.commit().await.unwrap();
    wait_until_scheduled(&env, "twice").await;
    client.submit(echo("twice", 2, run_at)).await.unwrap();
    client.submit(echo("twice", 3, run_at)).await.unwrap();

    let parking = env.topology().parking_queue();
    common::wait_until(LONG, || async { env.message_count(&parking).await == 1 }).await;
    let parked = env.drain_queue(&parking).await;
    let reason = parked[0].1.as_deref().unwrap_or_default();
    assert!(
        reason.contains("reused with a different request"),
        "{reason}"
    );
    let waiting = "SELECT COUNT(*) AS n FROM job_requests WHERE job_id = 'twice'";
    assert_eq!(env.count(waiting).await, 1);
    assert_eq!(env.wait_for_end("twice", LONG).await.stage, "done");
    assert_eq!(env.rows_of_job("twice").await, [1, 2, 1, 0]);
    db.close().await.unwrap();
    client.close().await.unwrap();
    pod.stop().await;
}

/// A job too large for one request, delayed: its parts and seal wait in the outbox
/// and, once due, form the job whole.
async fn a_delayed_job_in_parts_waits_whole(backend: Backend) {
    let tasks = taskmill::client::PART_TASKS + 5;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let run_at = Utc::now() + chrono::TimeDelta::seconds(4);
    let job_id = client
        .submit(echo("in-parts", tasks, run_at))
        .await
        .unwrap();
    wait_until_scheduled(&env, &job_id).await;
    let waiting = "SELECT COUNT(*) AS n FROM job_requests WHERE job_id = 'in-parts'";
    common::wait_until(LONG, || async { env.count(waiting).await == 3 }).await;
    assert_eq!(env.rows_of_job(&job_id).await[1], 0);

    let ended = env.wait_for_end(&job_id, LONG).await;
    assert_eq!(ended.stage, "done");
    assert!(ended.started_at.unwrap() >= run_at);
    assert_eq!(env.rows_of_job(&job_id).await[1], tasks as i64);
    client.close().await.unwrap();
    pod.stop().await;
}

async fn run_at_beyond_the_bound_is_rejected(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let too_far = Utc::now() + chrono::TimeDelta::days(400);
    assert!(client.submit(echo("too-far", 1, too_far)).await.is_err());

    // Published by a producer that does not check: parked, and answered.
    let watch = client.watch("too-far").await.unwrap();
    let body = serde_json::to_vec(&json!({
        "version": 1, "job_id": "too-far", "job_type": builtin::ECHO,
        "tasks": [1], "run_at": too_far.to_rfc3339(),
    }))
    .unwrap();
    let exchange = env.topology().jobs_exchange();
    env.publish_raw(&exchange, builtin::ECHO, &body, Some("application/json"))
        .await;
    match tokio::time::timeout(LONG, watch.event()).await.unwrap() {
        Err(taskmill::Error::Rejected { reason, .. }) => {
            assert!(reason.contains("days ahead"), "{reason}")
        }
        other => panic!("a rejection, not {other:?}"),
    }
    assert!(env.store.job("too-far").await.unwrap().is_none());
    client.close().await.unwrap();
    pod.stop().await;
}
