//! The core pipeline against real RabbitMQ and a real database, on SQLite and
//! PostgreSQL: submit → split → work → retry → complete.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use taskmill::protocol::{FinishedTask, TaskMessage, TasksFinished, SCHEMA_VERSION};
use taskmill::{builtin, JobRequest, TaskContext, TaskError};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    thousand_task_job_completes,
    failing_twice_then_succeeding_waits_linearly,
    always_failing_task_fails_the_job,
    continue_policy_finishes_every_task,
    duplicate_task_messages_count_once,
    racing_completion_consumers_send_one_event_per_job,
    resubmitting_a_job_id_makes_one_job,
    bad_input_is_parked_and_the_pod_keeps_serving,
    panicking_handler_is_a_failed_attempt,
    job_without_tasks_completes_at_once,
    splitter_makes_tasks_from_params,
    duplicates_inside_one_batch_run_once,
    a_refused_result_fails_only_its_task,
    coalesced_acks_never_cover_a_running_task,
    cancelling_a_job_cancels_what_is_left,
    slow_handlers_leave_their_messages_in_the_queue,
    a_large_job_is_fed_as_its_pool_drains,
    jobs_end_with_their_last_task,
);

/// A job of one stage ends in the transaction that records its last task's outcome,
/// whichever way it ends, and its event goes out from that worker: no finished event
/// and no completion role are needed (none runs here).
async fn jobs_end_with_their_last_task(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod().roles(common::INTAKE_AND_WORKER));
    let client = env.client().await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let tasks = (0..n % 4 + 1).map(|k| json!({ "k": k })).collect();
        ids.push(
            client
                .submit(JobRequest::new(builtin::ECHO, tasks))
                .await
                .unwrap(),
        );
    }
    let mut failing = JobRequest::new(
        builtin::FAIL,
        vec![json!({ "times": 9, "permanent": true })],
    );
    failing.max_retries = 0;
    ids.push(client.submit(failing).await.unwrap());
    let all = events.wait_for(ids.len(), LONG).await;
    assert_eq!(all.len(), ids.len(), "one event per job");
    for event in &all {
        let expected = if Some(&event.job_id) == ids.last() {
            "job.failed"
        } else {
            "job.done"
        };
        assert_eq!(event.event, expected, "{event:?}");
    }
    assert_eq!(
        env.message_count(&env.topology().completion_queue()).await,
        0,
        "no finished event was sent"
    );
    pod.stop().await;
}

async fn thousand_task_job_completes(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let tasks = (0..1000).map(|n| json!({ "n": n })).collect();
    let job_id = client
        .submit(JobRequest::new(builtin::ECHO, tasks))
        .await
        .unwrap();

    let event = client.wait(&job_id).await.unwrap();
    assert_eq!(event.event, "job.done");
    assert_eq!(
        (event.task_count, event.done, event.failed),
        (1000, 1000, 0)
    );
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert_eq!(job.stage, "done");
    assert_eq!(job.task_count, 1000);
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert_eq!(rows.len(), 1000);
    for row in &rows {
        assert_eq!(row.status, "done");
        assert_eq!(row.attempts, 1);
        assert_eq!(
            row.result.as_ref(),
            Some(&row.payload),
            "echo returns the payload"
        );
    }
    assert_eq!(
        events.wait_for(1, LONG).await.len(),
        1,
        "exactly one job event"
    );
    pod.stop().await;
}

async fn failing_twice_then_succeeding_waits_linearly(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let log = seen.clone();
    let pod = env.start(env.pod().handler("flaky", move |ctx: TaskContext| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(Instant::now());
            if ctx.attempt <= 2 {
                Err(TaskError::retryable(format!(
                    "flaky attempt {}",
                    ctx.attempt
                )))
            } else {
                Ok(json!("finally"))
            }
        }
    }));
    let client = env.client().await;
    let mut request = JobRequest::new("flaky", vec![json!({})]);
    request.retry_delay_ms = 400;
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();

    assert_eq!(event.event, "job.done");
    let task = &env.store.tasks_of_job(&job_id).await.unwrap()[0];
    assert_eq!((task.status.as_str(), task.attempts), ("done", 3));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    let first_wait = seen[1] - seen[0];
    let second_wait = seen[2] - seen[1];
    assert!(
        first_wait >= Duration::from_millis(350),
        "first wait {first_wait:?} is about 1 × 400 ms"
    );
    let ratio = second_wait.as_secs_f64() / first_wait.as_secs_f64();
    assert!(
        (1.4..=3.0).contains(&ratio),
        "second wait {second_wait:?} is about twice the first {first_wait:?}"
    );
    pod.stop().await;
}

async fn always_failing_task_fails_the_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let mut request = JobRequest::new(builtin::FAIL, vec![json!({ "times": 1000 })]);
    request.max_retries = 2;
    request.retry_delay_ms = 50;
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();

    assert_eq!(event.event, "job.failed");
    assert_eq!(event.stage, "failed");
    let error = event.first_error.clone().unwrap();
    assert!(
        error.contains("planned failures"),
        "the job carries the task's error: {error}"
    );
    let task = &env.store.tasks_of_job(&job_id).await.unwrap()[0];
    assert_eq!(task.status, "failed");
    assert_eq!(task.attempts, 3, "max_retries + 1 attempts");
    assert_eq!(task.info.as_deref(), Some(error.as_str()));
    assert_eq!(event.failed_task_ids, vec![task.id]);
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert_eq!(job.first_error.as_deref(), Some(error.as_str()));
    let all = events.wait_for(1, LONG).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].event, "job.failed");
    pod.stop().await;
}

async fn continue_policy_finishes_every_task(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let tasks = (0..20)
        .map(|n| json!({ "times": if n % 5 == 0 { 100 } else { 0 }, "permanent": true }))
        .collect();
    let mut request = JobRequest::new(builtin::FAIL, tasks);
    request.on_failure = taskmill::FailurePolicy::Continue;
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();

    assert_eq!(event.event, "job.failed");
    assert_eq!((event.done, event.failed, event.cancelled), (16, 4, 0));
    assert_eq!(event.failed_task_ids.len(), 4);
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert!(rows
        .iter()
        .all(|row| row.status == "done" || row.status == "failed"));
    assert!(
        rows.iter().all(|row| row.attempts == 1),
        "permanent errors are not retried"
    );
    pod.stop().await;
}

async fn duplicate_task_messages_count_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let (job_id, rows) = form_job_without_workers(&env, 50).await;
    publish_copies(&env, &job_id, &rows).await;
    let topology = env.topology();
    let runs: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let worker = env.start(
        env.pod()
            .roles(common::WORKER_AND_COMPLETION)
            .handler("count", counting_handler(&runs)),
    );
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!((job.stage.as_str(), job.done_count), ("done", 50));
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert!(
        rows.iter()
            .all(|row| row.attempts == 1 && row.status == "done"),
        "attempts not double-counted"
    );
    // A finished event sent twice is counted once too.
    for row in &rows {
        let finished = TasksFinished::new(vec![FinishedTask {
            job_id: job_id.clone(),
            task_id: row.id,
            status: "done".into(),
            attempt: 1,
        }]);
        env.publish_raw(
            "",
            &topology.completion_queue(),
            &serde_json::to_vec(&finished).unwrap(),
            None,
        )
        .await;
    }
    assert_eq!(
        events.wait_for(1, LONG).await.len(),
        1,
        "exactly one job event"
    );
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert_eq!(job.done_count, 50);
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 50);
    // The claim of attempt 1 succeeds once; a copy finds the task running or done.
    assert!(
        runs.values().all(|&n| n == 1),
        "each task ran once: {runs:?}"
    );
    worker.stop().await;
}

async fn racing_completion_consumers_send_one_event_per_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let producer_side = env.start(env.pod().roles(common::INTAKE_AND_WORKER));
    let completions: Vec<_> = (0..3)
        .map(|_| env.start(env.pod().roles(common::COMPLETION_ONLY)))
        .collect();
    let client = env.client().await;
    let mut job_ids = Vec::new();
    for j in 0..20 {
        let tasks = (0..40)
            .map(|n| json!({ "times": u8::from(j % 4 == 0 && n == 7) }))
            .collect();
        let mut request = JobRequest::new(builtin::FAIL, tasks);
        request.retry_delay_ms = 20;
        request.max_retries = if j % 8 == 0 { 0 } else { 3 };
        job_ids.push(client.submit(request).await.unwrap());
    }
    for job_id in &job_ids {
        env.wait_for_end(job_id, LONG).await;
    }
    // Replay every finished event to all consumers at once: more racing, no new events.
    let topology = env.topology();
    for job_id in &job_ids {
        for row in env.store.tasks_of_job(job_id).await.unwrap() {
            if row.status == "done" || row.status == "failed" {
                let finished = TasksFinished::new(vec![FinishedTask {
                    job_id: job_id.clone(),
                    task_id: row.id,
                    status: row.status.clone(),
                    attempt: row.attempts,
                }]);
                env.publish_raw(
                    "",
                    &topology.completion_queue(),
                    &serde_json::to_vec(&finished).unwrap(),
                    None,
                )
                .await;
            }
        }
    }
    let all = events.wait_for(job_ids.len(), LONG).await;
    for job_id in &job_ids {
        let mine: Vec<_> = all.iter().filter(|e| &e.job_id == job_id).collect();
        assert_eq!(mine.len(), 1, "job {job_id} has exactly one event");
        let job = env.store.job(job_id).await.unwrap().unwrap();
        assert_eq!(mine[0].stage, job.stage);
        assert_eq!(job.done_count + job.failed_count + job.cancelled_count, 40);
    }
    assert_eq!(all.len(), job_ids.len());
    for pod in completions {
        pod.stop().await;
    }
    producer_side.stop().await;
}

async fn resubmitting_a_job_id_makes_one_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let mut request = JobRequest::new(builtin::ECHO, (0..30).map(|n| json!(n)).collect());
    request.job_id = Some("order-42".into());
    client.submit(request.clone()).await.unwrap();
    client.submit(request.clone()).await.unwrap();
    let event = client.wait("order-42").await.unwrap();
    assert_eq!(event.task_count, 30);
    // Once more after it ended: nothing new, but the resubmission's own on_complete
    // target gets the stored event, so a producer that lost its confirm still hears back.
    let reply = env.declare_queue("reply").await;
    request.on_complete = Some(taskmill::Target {
        exchange: String::new(),
        routing_key: reply.clone(),
    });
    client.submit(request).await.unwrap();
    assert_eq!(events.wait_for(1, LONG).await.len(), 1);
    let answered = wait_for_messages(&env, &reply, 1).await;
    let answer: taskmill::JobEvent = serde_json::from_slice(&answered[0].0).unwrap();
    assert_eq!(answer, event);
    assert_eq!(env.store.count_jobs().await.unwrap(), 1);
    assert_eq!(env.store.tasks_of_job("order-42").await.unwrap().len(), 30);
    assert_eq!(events.all().await.len(), 1);
    pod.stop().await;
}

async fn bad_input_is_parked_and_the_pod_keeps_serving(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut config = env.config.clone();
    config.max_request_bytes = 2048;
    let pod = env.start(env.pod().config(config));
    let client = env.client().await;
    let topology = env.topology();
    let jobs = topology.jobs_exchange();
    let json = Some("application/json");
    let oversize = format!(
        r#"{{"version":1,"job_type":"taskmill.echo","tasks":["{}"]}}"#,
        "x".repeat(4096)
    );
    let bad: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        (jobs.as_str(), b"{not json".to_vec(), json, "malformed JSON"),
        (
            jobs.as_str(),
            br#"{"version":1,"tasks":[]}"#.to_vec(),
            json,
            "malformed JSON: missing field `job_type`",
        ),
        (
            jobs.as_str(),
            br#"{"version":1,"job_type":"no.such.type","tasks":[1]}"#.to_vec(),
            json,
            "unknown task type",
        ),
        (
            jobs.as_str(),
            br#"{"version":1,"job_type":"no.splitter"}"#.to_vec(),
            json,
            "unknown task type",
        ),
        (jobs.as_str(), oversize.into_bytes(), json, "over the limit"),
        (
            jobs.as_str(),
            br#"{"version":1,"job_type":"taskmill.echo","tasks":[1]}"#.to_vec(),
            Some("text/plain"),
            "content type",
        ),
        ("", b"\x00\x01garbage".to_vec(), None, "malformed JSON"),
    ];
    let work_queue = topology.work_queue("default");
    for (exchange, body, content_type, _) in &bad {
        let routing_key = if exchange.is_empty() {
            work_queue.as_str()
        } else {
            "bad"
        };
        env.publish_raw(exchange, routing_key, body, *content_type)
            .await;
    }
    let job_id = client
        .submit(JobRequest::new(builtin::ECHO, vec![json!(1), json!(2)]))
        .await
        .unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!(event.event, "job.done", "other jobs are unaffected");

    let parked = wait_for_messages(&env, &topology.parking_queue(), bad.len()).await;
    assert_eq!(
        parked.len(),
        bad.len(),
        "every bad message is parked: {parked:?}"
    );
    let mut reasons: Vec<String> = parked
        .iter()
        .map(|(_, reason)| reason.clone().expect("a reason header"))
        .collect();
    for (_, body, _, expected) in &bad {
        let position = parked
            .iter()
            .position(|(parked_body, _)| parked_body == body)
            .expect("original body kept");
        let reason = &parked[position].1.clone().unwrap();
        assert!(
            reason.contains(expected),
            "reason {reason:?} mentions {expected:?}"
        );
        reasons.retain(|r| r != reason);
    }
    assert!(!pod.handle.is_finished(), "the pod keeps serving");
    pod.stop().await;
}

async fn panicking_handler_is_a_failed_attempt(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(
        env.pod()
            .handler("explosive", |ctx: TaskContext| async move {
                if ctx.attempt == 1 {
                    panic!("boom on attempt {}", ctx.attempt);
                }
                Ok(json!("survived"))
            }),
    );
    let client = env.client().await;
    let mut request = JobRequest::new("explosive", vec![json!(1), json!(2), json!(3)]);
    request.retry_delay_ms = 50;
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!(event.event, "job.done");
    for row in env.store.tasks_of_job(&job_id).await.unwrap() {
        assert_eq!((row.status.as_str(), row.attempts), ("done", 2));
        assert!(row
            .info
            .unwrap()
            .contains("handler panicked: boom on attempt 1"));
    }
    // The pod still serves a second job.
    let second = client
        .submit(JobRequest::new(builtin::ECHO, vec![json!(1)]))
        .await
        .unwrap();
    assert_eq!(client.wait(&second).await.unwrap().event, "job.done");
    pod.stop().await;
}

async fn job_without_tasks_completes_at_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new(builtin::ECHO, vec![]))
        .await
        .unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!((event.event.as_str(), event.task_count), ("job.done", 0));
    pod.stop().await;
}

async fn splitter_makes_tasks_from_params(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let pod = env.start(
        env.pod()
            .splitter("range", |params| {
                let n = params
                    .get("n")
                    .and_then(|v| v.as_u64())
                    .ok_or("params need n")?;
                Ok((0..n).map(|i| json!(i)).collect())
            })
            .handler("range", move |_ctx: TaskContext| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Ok(json!(null)) }
            }),
    );
    let client = env.client().await;
    let mut request = JobRequest::new("range", vec![]);
    request.tasks = None;
    request.params = json!({ "n": 7 });
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!((event.event.as_str(), event.done), ("job.done", 7));
    assert_eq!(runs.load(Ordering::SeqCst), 7);
    pod.stop().await;
}

async fn duplicates_inside_one_batch_run_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // Each task message once in the queue, then a copy of each: one worker with a
    // large prefetch takes them in batches that mix originals and copies.
    let (job_id, rows) = form_job_without_workers(&env, 100).await;
    publish_copies(&env, &job_id, &rows).await;
    let runs: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let worker = env.start(
        env.pod()
            .concurrency(256)
            .handler("count", counting_handler(&runs)),
    );
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!((job.stage.as_str(), job.done_count), ("done", 100));
    let runs = runs.lock().unwrap().clone();
    assert!(
        runs.len() == 100 && runs.values().all(|&n| n == 1),
        "each task ran once: {runs:?}"
    );
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert!(rows
        .iter()
        .all(|row| row.attempts == 1 && row.deliveries == 1));
    worker.stop().await;
}

/// Acks are coalesced into `multiple` acks, which must never cover a delivery whose
/// task is still running. Of 60 tasks taken in one batch, task 30 holds its handler
/// past the grace period while the others finish and are acked around it (those
/// before it by one `multiple` ack, those after it one by one): at the stop, exactly
/// its message goes back to the queue, and a second worker finishes it.
async fn coalesced_acks_never_cover_a_running_task(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let (job_id, rows) = form_job_without_workers(&env, 60).await;
    let held = rows.iter().find(|row| row.payload == json!(30)).unwrap().id;
    let mut config = env.config.clone();
    config.grace_period = Duration::from_millis(500);
    let first = env.start(env.pod().config(config).concurrency(64).handler(
        "count",
        |ctx: TaskContext| async move {
            if ctx.payload == json!(30) {
                std::future::pending::<()>().await;
            }
            Ok(json!(null))
        },
    ));
    // The held handler shows as running once it has run unclaimed for a second.
    common::wait_until(LONG, || async {
        let rows = env.store.tasks_of_job(&job_id).await.unwrap();
        let done = rows.iter().filter(|row| row.status == "done").count();
        done == 59
            && rows
                .iter()
                .any(|row| row.id == held && row.status == "running")
    })
    .await;
    first.stop().await;
    let queue = env.topology().work_queue("default");
    assert_eq!(
        env.message_count(&queue).await,
        1,
        "only the running task's message returns to the queue"
    );
    let held_row = env.store.task(held).await.unwrap().unwrap();
    assert_eq!(held_row.status, "running");

    let second = env.start(
        env.pod()
            .handler("count", |_ctx: TaskContext| async { Ok(json!(null)) }),
    );
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!((job.stage.as_str(), job.done_count), ("done", 60));
    for row in env.store.tasks_of_job(&job_id).await.unwrap() {
        let deliveries = if row.id == held { 2 } else { 1 };
        assert_eq!(
            (row.attempts, row.deliveries),
            (1, deliveries),
            "task {}",
            row.id
        );
    }
    second.stop().await;
}

/// PostgreSQL refuses a NUL character in JSONB, so a batch holding such a result fails
/// half-way through its transaction: nothing of it may be acked, the neighbours must
/// still be recorded, and the refused task fails with the reason (SQLite stores it).
async fn a_refused_result_fails_only_its_task(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(
        env.pod()
            .concurrency(64)
            .handler("nul", |ctx: TaskContext| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if ctx.payload == json!(7) {
                    Ok(json!({ "text": "a\u{0000}b" }))
                } else {
                    Ok(ctx.payload)
                }
            }),
    );
    let client = env.client().await;
    let mut request = JobRequest::new("nul", (0..40).map(|n| json!(n)).collect());
    request.on_failure = taskmill::FailurePolicy::Continue;
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert!(
        rows.iter().all(|row| row.attempts == 1),
        "no attempt recorded twice"
    );
    match backend {
        Backend::Postgres => {
            assert_eq!((event.done, event.failed), (39, 1));
            let refused = rows.iter().find(|row| row.payload == json!(7)).unwrap();
            assert_eq!(refused.status, "failed");
            assert!(refused
                .info
                .as_deref()
                .unwrap()
                .contains("could not record the result"));
        }
        Backend::Sqlite => assert_eq!((event.done, event.failed), (40, 0)),
    }
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert_eq!(
        (job.done_count, job.failed_count),
        (event.done, event.failed),
        "counted once each"
    );
    pod.stop().await;
}

async fn cancelling_a_job_cancels_what_is_left(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod().concurrency(2));
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new(
            builtin::SLEEP,
            (0..20).map(|_| json!({ "ms": 200 })).collect(),
        ))
        .await
        .unwrap();
    common::wait_until(LONG, || async {
        env.store
            .job_status(&job_id)
            .await
            .unwrap()
            .is_some_and(|s| s.tasks_by_status.get("done").copied().unwrap_or(0) >= 2)
    })
    .await;
    let event = client
        .cancel(&job_id)
        .await
        .unwrap()
        .expect("the job was running");
    assert_eq!(
        (event.event.as_str(), event.stage.as_str()),
        ("job.cancelled", "cancelled")
    );
    assert!(event.cancelled > 0 && event.done >= 2);
    assert!(
        client.cancel(&job_id).await.unwrap().is_none(),
        "cancelling twice does nothing"
    );
    // Stopping the pod lets the handlers that were running finish and try to record
    // their outcomes: they must change nothing, the rows stay cancelled.
    pod.stop().await;
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    let count = |status: &str| rows.iter().filter(|row| row.status == status).count() as i64;
    assert_eq!(
        (count("done"), count("cancelled")),
        (event.done, event.cancelled)
    );
    assert_eq!(count("done") + count("cancelled"), 20);
    let all = events.wait_for(1, LONG).await;
    assert_eq!((all.len(), all[0].event.as_str()), (1, "job.cancelled"));
}

/// Forms a job of `count` "count" tasks with no worker running: its task messages
/// wait in the work queue. Returns the job id and its rows.
async fn form_job_without_workers(
    env: &TestEnv,
    count: usize,
) -> (String, Vec<taskmill::store::task::Model>) {
    // The intake must know the task type to accept the job.
    let intake = env.start(
        env.pod()
            .roles(common::INTAKE_ONLY)
            .handler("count", |_ctx: TaskContext| async { Ok(json!(null)) }),
    );
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new(
            "count",
            (0..count).map(|n| json!(n)).collect(),
        ))
        .await
        .unwrap();
    let rows = wait_for_rows(env, &job_id, count).await;
    intake.stop().await;
    (job_id, rows)
}

/// Publishes a second copy of attempt 1 of every task, as a sweeper or a retried
/// publish would.
async fn publish_copies(env: &TestEnv, job_id: &str, rows: &[taskmill::store::task::Model]) {
    let queue = env.topology().work_queue("default");
    for row in rows {
        let message = TaskMessage {
            version: SCHEMA_VERSION,
            job_id: job_id.to_owned(),
            task_id: row.id,
            task_type: "count".into(),
            attempt: 1,
            max_retries: 3,
            retry_delay_ms: 100,
            task_timeout_ms: None,
            run: 1,
            payload: row.payload.clone(),
        };
        env.publish_raw("", &queue, &serde_json::to_vec(&message).unwrap(), None)
            .await;
    }
}

/// A "count" handler that records how often each task ran.
fn counting_handler(
    runs: &Arc<Mutex<HashMap<i64, usize>>>,
) -> impl Fn(
    TaskContext,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = taskmill::registry::HandlerResult> + Send>,
> + Send
       + Sync
       + 'static {
    let runs = runs.clone();
    move |ctx: TaskContext| {
        let runs = runs.clone();
        Box::pin(async move {
            *runs.lock().unwrap().entry(ctx.task_id).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(json!(null))
        })
    }
}

async fn wait_for_messages(
    env: &TestEnv,
    queue: &str,
    count: usize,
) -> Vec<(Vec<u8>, Option<String>)> {
    // Each look drains the queue: what it took is kept across looks.
    let got = Mutex::new(Vec::new());
    common::wait_until(LONG, || async {
        let drained = env.drain_queue(queue).await;
        let mut got = got.lock().unwrap();
        got.extend(drained);
        got.len() >= count
    })
    .await;
    got.into_inner().unwrap()
}

async fn wait_for_rows(
    env: &TestEnv,
    job_id: &str,
    count: usize,
) -> Vec<taskmill::store::task::Model> {
    common::wait_for_value(LONG, || async {
        let job = env.store.job(job_id).await.unwrap()?;
        if !job.tasks_published {
            return None;
        }
        let rows = env.store.tasks_of_job(job_id).await.unwrap();
        assert_eq!(rows.len(), count);
        Some(rows)
    })
    .await
}

/// Past `concurrency`, a worker holds messages only as many as its handlers run in
/// about a second: slow handlers must not pile deliveries up in the pod, where they
/// would wait toward the broker's consumer_timeout instead of going to another pod.
async fn slow_handlers_leave_their_messages_in_the_queue(backend: Backend) {
    const TASKS: usize = 40;
    let env = TestEnv::new(backend).await;
    let pod = env.start(
        env.pod()
            .concurrency(2)
            .handler("slow", |ctx: TaskContext| async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok(ctx.payload)
            }),
    );
    let client = env.client().await;
    let tasks = (0..TASKS).map(|n| json!({ "n": n })).collect();
    let job_id = client.submit(JobRequest::new("slow", tasks)).await.unwrap();
    let queue = env.topology().work_queue("default");
    // Two handlers of 400 ms run five more messages a second: the pod holds 7.
    let most_held = 2 + 5;
    let mut samples = 0;
    let deadline = Instant::now() + LONG;
    loop {
        assert!(
            Instant::now() < deadline,
            "the slow job did not end within {LONG:?}"
        );
        // Once the job says so, every task message is published and confirmed: asked
        // first, so that the queue's count read next is of the published messages (read
        // before, it may predate the publish and count all 40 as held).
        let job = env.store.job(&job_id).await.unwrap();
        let published = job.is_some_and(|job| job.tasks_published);
        // The pod declares its queue as it starts, maybe after the submit.
        let Some(ready) = env.message_count_if_declared(&queue).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ready = ready as usize;
        // Read last: tasks finishing meanwhile only lower the count of held messages.
        let rows = env.store.tasks_of_job(&job_id).await.unwrap();
        let finished = rows.iter().filter(|r| r.status == "done").count();
        if rows.len() == TASKS && finished == TASKS {
            break;
        }
        if published && finished < TASKS {
            let held = TASKS - finished - ready;
            assert!(
                held <= most_held + 3,
                "the pod holds {held} messages of slow tasks ({ready} ready, {finished} done)"
            );
            samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        samples >= 10,
        "the job was watched while it ran ({samples} samples)"
    );
    assert_eq!(client.wait(&job_id).await.unwrap().event, "job.done");
    pod.stop().await;
}

/// A job larger than the feed depth: with no worker, its feeder publishes at most
/// `FEED_DEPTH` messages and waits; once a worker drains the queue it feeds the rest,
/// and each task runs once.
async fn a_large_job_is_fed_as_its_pool_drains(backend: Backend) {
    const TASKS: usize = 5_000;
    let env = TestEnv::new(backend).await;
    let intake = env.start(env.pod().roles(common::INTAKE_ONLY));
    let client = env.client().await;
    let tasks = (0..TASKS).map(|n| json!(n)).collect();
    let job_id = client
        .submit(JobRequest::new(builtin::ECHO, tasks))
        .await
        .unwrap();
    let queue = env.topology().work_queue("default");
    env.wait_for_feeding(&job_id, LONG).await;
    // The feeder keeps looking at the queue, and tops it up only as it drains: after
    // its last top-up, the count stays. That top-up is done once the queue holds every
    // message the job records as fed, and too little room is left for another
    // (`FEED_CHUNK` in src/roles/feed.rs).
    const FEED_CHUNK: u32 = 512;
    let ready = common::wait_for_value(LONG, || async {
        let job = env.store.job(&job_id).await.unwrap().unwrap();
        let ready = env.message_count(&queue).await;
        (i64::from(ready) == job.fed_through + 1
            && ready > taskmill::roles::FEED_DEPTH - FEED_CHUNK)
            .then_some(ready)
    })
    .await;
    // Nothing drains the queue: for a second, the feeder publishes nothing more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.message_count(&queue).await, ready);
    assert!(
        ready <= taskmill::roles::FEED_DEPTH,
        "{ready} messages ready"
    );
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert!(
        !job.tasks_published,
        "the feeder has not published every task yet"
    );

    let worker = env.start(env.pod());
    assert_eq!(client.wait(&job_id).await.unwrap().event, "job.done");
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert_eq!(rows.len(), TASKS);
    assert!(rows
        .iter()
        .all(|row| row.status == "done" && row.attempts == 1));
    assert!(
        env.store
            .job(&job_id)
            .await
            .unwrap()
            .unwrap()
            .tasks_published
    );
    worker.stop().await;
    intake.stop().await;
}
