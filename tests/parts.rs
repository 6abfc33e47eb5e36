//! Jobs sent in parts: parts out of order and sent twice, a part resent with other
//! tasks or overlapping another, a sealed job missing a part, an intake that stopped
//! between parts or in the middle of one, and `Client::submit` of a job larger than a
//! part.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use taskmill::protocol::{Part, Seal};
use taskmill::store::NewTask;
use taskmill::{builtin, JobRequest};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    parts_out_of_order_and_twice_make_one_job,
    a_part_resent_with_other_tasks_fails_the_job,
    overlapping_parts_fail_the_job,
    a_sealed_job_missing_a_part_fails_naming_it,
    an_intake_stopped_between_and_within_parts_resumes,
    a_large_submit_goes_in_parts,
    unsealed_jobs_rest_until_their_next_part,
    a_job_still_receiving_its_parts_can_be_cancelled,
);

/// Part `number` of job `job_id`: echo tasks `offset .. offset + count`, each payload
/// its ordinal (`tag` added, to make another part of the same place).
fn part(job_id: &str, number: u32, offset: u64, count: u64, tag: &str) -> JobRequest {
    let tasks = (offset..offset + count)
        .map(|n| json!({ "n": n, "tag": tag }))
        .collect();
    let mut request = JobRequest::new(builtin::ECHO, tasks);
    request.job_id = Some(job_id.to_owned());
    request.part = Some(Part { number, offset });
    request
}

fn seal(job_id: &str, parts: u32, tasks: u64) -> JobRequest {
    let mut request = JobRequest::new(builtin::ECHO, Vec::new());
    request.tasks = None;
    request.job_id = Some(job_id.to_owned());
    request.seal = Some(Seal { parts, tasks });
    request
}

/// Publishes a request as any AMQP producer would: its JSON to the jobs exchange.
async fn send(env: &TestEnv, request: &JobRequest) {
    env.publish_raw(
        &env.topology().jobs_exchange(),
        &request.job_type,
        &serde_json::to_vec(request).unwrap(),
        Some("application/json"),
    )
    .await;
}

fn new_job_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Waits until part `number` of the job is stored.
async fn wait_stored(env: &TestEnv, job_id: &str, number: i32) {
    common::wait_until(LONG, || async {
        let parts = env.store.parts(job_id).await.unwrap();
        parts
            .iter()
            .any(|part| part.number == number && part.stored)
    })
    .await;
}

/// Every task of the job ran once and echoed the payload of its place.
async fn assert_each_task_once(env: &TestEnv, job_id: &str, tasks: u64) {
    let rows = env.store.tasks_of_job(job_id).await.unwrap();
    assert_eq!(rows.len() as u64, tasks);
    let by_ordinal: BTreeMap<i32, &taskmill::store::task::Model> =
        rows.iter().map(|row| (row.ordinal, row)).collect();
    assert_eq!(by_ordinal.len() as u64, tasks, "one row per ordinal");
    for (ordinal, row) in by_ordinal {
        assert_eq!(row.status, "done");
        assert_eq!(row.attempts, 1, "task {ordinal} ran once");
        assert_eq!(
            row.payload["n"],
            json!(ordinal),
            "task {ordinal} in its place"
        );
        assert_eq!(row.result.as_ref(), Some(&row.payload));
    }
}

async fn parts_out_of_order_and_twice_make_one_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod());
    let job_id = new_job_id();
    // The seal first, then the parts out of order, part 3 twice.
    send(&env, &seal(&job_id, 3, 1_500)).await;
    send(&env, &part(&job_id, 3, 1_000, 500, "a")).await;
    send(&env, &part(&job_id, 1, 0, 600, "a")).await;
    send(&env, &part(&job_id, 3, 1_000, 500, "a")).await;
    send(&env, &part(&job_id, 2, 600, 400, "a")).await;

    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!((job.stage.as_str(), job.task_count), ("done", 1_500));
    assert_each_task_once(&env, &job_id, 1_500).await;
    let parts = env.store.parts(&job_id).await.unwrap();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|part| part.stored));
    // A part sent again after the job ran changes nothing and parks nothing. Once
    // both copies have left the intake queue, stopping the pod waits for their
    // handling to end: whatever they caused is in the log and the parking lot then.
    send(&env, &part(&job_id, 2, 600, 400, "a")).await;
    send(&env, &seal(&job_id, 3, 1_500)).await;
    let intake = env.topology().intake_queue();
    common::wait_until(LONG, || async { env.message_count(&intake).await == 0 }).await;
    pod.stop().await;
    // A copy still being handled when the pod's grace ran out (a loaded machine) is
    // back in the queue: the next pod settles it.
    if env.message_count(&intake).await > 0 {
        let again = env.start(env.pod());
        common::wait_until(LONG, || async { env.message_count(&intake).await == 0 }).await;
        again.stop().await;
    }
    assert_eq!(env.message_count(&intake).await, 0, "both copies settled");
    let all = events.wait_for(1, LONG).await;
    assert_eq!(all.len(), 1, "one event: {all:?}");
    let parked = env.drain_queue(&env.topology().parking_queue()).await;
    let reasons: Vec<_> = parked.into_iter().map(|(_, reason)| reason).collect();
    assert!(reasons.is_empty(), "parked: {reasons:?}");
}

/// Part 1 (100 tasks, tag `a`) stored, then `second`: the job fails, its first error
/// containing every piece of `reason`, and the second part is parked. Returns the
/// job's task rows.
async fn second_part_is_refused(
    env: &TestEnv,
    second: impl Fn(&str) -> JobRequest,
    reason: &[&str],
) -> Vec<taskmill::store::task::Model> {
    let pod = env.start(env.pod());
    let job_id = new_job_id();
    send(env, &part(&job_id, 1, 0, 100, "a")).await;
    wait_stored(env, &job_id, 1).await;
    send(env, &second(&job_id)).await;
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!(job.stage, "failed");
    let error = job.first_error.unwrap_or_default();
    assert!(reason.iter().all(|piece| error.contains(piece)), "{error}");
    assert_eq!(env.message_count(&env.topology().parking_queue()).await, 1);
    pod.stop().await;
    env.store.tasks_of_job(&job_id).await.unwrap()
}

async fn a_part_resent_with_other_tasks_fails_the_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let rows = second_part_is_refused(
        &env,
        |job_id| part(job_id, 1, 0, 100, "b"),
        &["part 1 of job", "was sent before with other tasks"],
    )
    .await;
    assert!(
        rows.iter().all(|row| row.payload["tag"] == "a"),
        "the first part stands"
    );
    assert!(
        rows.iter()
            .all(|row| ["done", "cancelled"].contains(&row.status.as_str())),
        "every task terminal"
    );
}

async fn overlapping_parts_fail_the_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let rows = second_part_is_refused(
        &env,
        |job_id| part(job_id, 2, 50, 100, "a"),
        &["part 2 (tasks 50..150) overlaps part 1 (tasks 0..100)"],
    )
    .await;
    assert_eq!(rows.len(), 100, "the overlapping part stored nothing");
}

async fn a_sealed_job_missing_a_part_fails_naming_it(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut config = env.config.clone();
    config.formation_timeout = Duration::from_secs(2);
    config.sweep_interval = Duration::from_millis(300);
    let events = env.event_log().await;
    let pod = env.start(env.pod().config(config));
    let job_id = new_job_id();
    send(&env, &part(&job_id, 1, 0, 200, "a")).await;
    send(&env, &part(&job_id, 3, 400, 200, "a")).await;
    send(&env, &seal(&job_id, 3, 600)).await;

    let event = events.wait_for(1, LONG).await.remove(0);
    assert_eq!(event.stage, "failed");
    let error = event.first_error.clone().unwrap_or_default();
    assert!(error.contains("missing part(s) 2"), "{error}");
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert_eq!(rows.len(), 400, "parts 1 and 3 were stored");
    let count = |status: &str| rows.iter().filter(|row| row.status == status).count() as i64;
    assert_eq!(
        count("done") + count("cancelled"),
        400,
        "every task terminal"
    );
    assert_eq!(
        (job.done_count, job.cancelled_count),
        (count("done"), count("cancelled"))
    );
    assert!(
        rows.iter()
            .filter(|row| row.ordinal >= 400)
            .all(|row| row.status == "cancelled"),
        "part 3, behind the gap, was never fed"
    );
    pod.stop().await;
}

async fn an_intake_stopped_between_and_within_parts_resumes(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let job_id = new_job_id();
    let intake = env.start(env.pod().roles(common::INTAKE_ONLY));
    send(&env, &part(&job_id, 1, 0, 300, "a")).await;
    wait_stored(&env, &job_id, 1).await;
    intake.stop().await;

    // Part 2 as an intake leaves it when it dies in the middle of storing it: its
    // number claimed, some of its rows in, not marked stored, its request unacked.
    let part_2 = part(&job_id, 2, 300, 300, "a");
    let claim = env
        .store
        .claim_part(
            &job_id,
            part_2.part.unwrap(),
            300,
            &taskmill::protocol::part_digest(&part_2),
        )
        .await
        .unwrap();
    assert_eq!(claim, taskmill::store::PartClaim::Store);
    let first_half: Vec<NewTask> = part_2.tasks.as_ref().unwrap()[..150]
        .iter()
        .zip(300..)
        .map(|(payload, ordinal)| NewTask {
            ordinal,
            task_type: builtin::ECHO.into(),
            payload: payload.clone(),
        })
        .collect();
    assert!(env.store.insert_tasks(&job_id, &first_half).await.unwrap());
    // The broker redelivers it; part 3 and the seal arrive while no pod runs.
    send(&env, &part_2).await;
    send(&env, &part(&job_id, 3, 600, 300, "a")).await;
    send(&env, &seal(&job_id, 3, 900)).await;

    let pod = env.start(env.pod());
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!((job.stage.as_str(), job.task_count), ("done", 900));
    assert_each_task_once(&env, &job_id, 900).await;
    pod.stop().await;
}

async fn a_large_submit_goes_in_parts(backend: Backend) {
    let tasks = taskmill::client::PART_TASKS as u64 + 1;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let payloads: Vec<Value> = (0..tasks).map(|n| json!({ "n": n })).collect();
    let job_id = client
        .submit(JobRequest::new(builtin::ECHO, payloads))
        .await
        .unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!(
        (event.stage.as_str(), event.task_count),
        ("done", tasks as i64)
    );
    let parts = env.store.parts(&job_id).await.unwrap();
    assert_eq!(
        parts
            .iter()
            .map(|part| (part.number, part.first_ordinal, part.task_count))
            .collect::<Vec<_>>(),
        [(1, 0, tasks as i64 - 1), (2, tasks as i64 - 1, 1)]
    );
    assert_each_task_once(&env, &job_id, tasks).await;
    client.close().await.unwrap();
    pod.stop().await;
}

/// Jobs whose first part ran and whose next part has not come cost nothing while they
/// wait: their feeders rest (no feed lease is held), and the next part and the seal
/// start a feeder again.
async fn unsealed_jobs_rest_until_their_next_part(backend: Backend) {
    const JOBS: usize = 20;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let jobs: Vec<String> = (0..JOBS).map(|_| new_job_id()).collect();
    for job_id in &jobs {
        send(&env, &part(job_id, 1, 0, 10, "")).await;
    }
    for job_id in &jobs {
        common::wait_until(LONG, || async {
            let status = env.store.job_status(job_id).await.unwrap();
            status.is_some_and(|s| s.tasks_by_status.get("done") == Some(&10))
        })
        .await;
    }
    common::wait_until(Duration::from_secs(30), || async {
        env.live_leases("feed:").await == 0
    })
    .await;
    for job_id in &jobs {
        send(&env, &part(job_id, 2, 10, 10, "")).await;
        send(&env, &seal(job_id, 2, 20)).await;
    }
    for job_id in &jobs {
        let job = env.wait_for_end(job_id, LONG).await;
        assert_eq!(job.stage, "done");
        assert_each_task_once(&env, job_id, 20).await;
    }
    pod.stop().await;
}

/// A job in parts runs its first parts' tasks before its seal; it can be cancelled
/// then, and parts sent after the cancel add nothing.
async fn a_job_still_receiving_its_parts_can_be_cancelled(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let job_id = new_job_id();
    send(&env, &part(&job_id, 1, 0, 10, "")).await;
    common::wait_until(LONG, || async {
        let status = env.store.job_status(&job_id).await.unwrap();
        status.is_some_and(|s| s.tasks_by_status.get("done") == Some(&10))
    })
    .await;
    let event = client.cancel(&job_id).await.unwrap().expect("cancelled");
    assert_eq!((event.event.as_str(), event.done), ("job.cancelled", 10));
    send(&env, &part(&job_id, 2, 10, 10, "")).await;
    send(&env, &seal(&job_id, 2, 20)).await;
    let intake = env.topology().intake_queue();
    common::wait_until(LONG, || async { env.message_count(&intake).await == 0 }).await;
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert_eq!(job.stage, "cancelled");
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert_eq!(rows.len(), 10, "no part goes into a cancelled job");
    pod.stop().await;
}
