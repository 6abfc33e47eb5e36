//! External tasks against a real HTTP backend (an axum service in the test process),
//! real RabbitMQ and a real database: the hand-off, the syncer's rules for update ids,
//! per-item errors, wrong counts, slow answers, no progress, and failures — and
//! backends that refuse (answers the database cannot store), hang, lie (late and
//! stale answers) and repeat themselves, lost hand-off answers, and a stale run's
//! message after `retry`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use taskmill::external::HttpBackend;
use taskmill::protocol::TaskMessage;
use taskmill::store::{Seen, SyncChange, SyncWrite, TaskOutcome};
use taskmill::{JobRequest, TaskStatus};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    external_tasks_finish_through_the_syncer,
    bad_answers_leave_tasks_due,
    no_progress_fails_the_attempt_and_it_is_handed_off_again,
    a_refused_write_holds_back_only_its_task,
    a_refused_answer_fails_only_its_task,
    failing_and_repeating_backends_time_out,
    a_hung_backend_holds_back_only_its_own_tasks,
    a_pod_that_loses_the_syncer_lease_writes_nothing,
    a_lost_hand_off_answer_is_retried_under_its_key,
    a_stale_run_copy_after_retry_claims_nothing,
    late_answers_change_nothing,
);

/// How the test service treats one external task.
#[derive(Clone, Debug, Default)]
struct Job {
    key: String,
    payload: Value,
    /// States reported so far; the task is done after `steps` of them.
    update_id: i64,
}

/// What the test service does, scenario by scenario.
#[derive(Default)]
struct Service {
    /// External id by idempotency key.
    by_key: HashMap<String, String>,
    jobs: HashMap<String, Job>,
    /// Hand-off calls, with repeats.
    hand_offs: usize,
    /// Hand-offs recorded but answered with a 500, as if the answer were lost.
    lost_hand_offs: usize,
    fetches: usize,
    /// Fetches answered with one state missing.
    wrong_counts: usize,
    /// Fetches answered only after this long (once each).
    slow_answers: usize,
    /// Task payloads whose states never move (their update id repeats).
    stuck: Vec<Value>,
    /// Task payloads that end failed.
    failing: Vec<Value>,
    /// Task payloads that end failed unless handed off in a later run of their job.
    failing_in_run_1: Vec<Value>,
    /// Task payloads whose result holds a NUL, which PostgreSQL's jsonb refuses.
    nul_results: Vec<Value>,
    /// `/slow-states`: how long its first call hangs, and its calls now and at most.
    hang: Duration,
    slow_calls: usize,
    slow_in_flight: usize,
    slow_max_in_flight: usize,
}

type Shared = Arc<Mutex<Service>>;

/// Every third fetch of a task first reports a per-item error, then a stale update id,
/// then its state moves on; a task is done at update id 3.
async fn fetch(State(service): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let slow = {
        let mut s = service.lock().unwrap();
        s.fetches += 1;
        if s.slow_answers > 0 {
            s.slow_answers -= 1;
            true
        } else {
            false
        }
    };
    if slow {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Json(answer(&mut service.lock().unwrap(), &body))
}

fn answer(s: &mut Service, body: &Value) -> Value {
    let fetch_no = s.fetches;
    let ids: Vec<String> = serde_json::from_value(body["ids"].clone()).unwrap();
    let mut states = Vec::new();
    let (stuck, failing) = (s.stuck.clone(), s.failing.clone());
    let (failing_in_run_1, nul_results) = (s.failing_in_run_1.clone(), s.nul_results.clone());
    for id in &ids {
        let job = s.jobs.get_mut(id).expect("a known id");
        let fails = failing.contains(&job.payload)
            || (failing_in_run_1.contains(&job.payload) && !job.key.contains(":r"));
        let state = match fetch_no % 3 {
            0 => json!({ "id": id, "error": "try again" }),
            1 if job.update_id > 0 => {
                json!({ "id": id, "update_id": job.update_id - 1, "state": "running" })
            }
            _ if stuck.contains(&job.payload) => {
                json!({ "id": id, "update_id": job.update_id, "state": "running" })
            }
            _ => {
                // A finished task stays finished: its last state is reported again.
                job.update_id = (job.update_id + 1).min(3);
                match job.update_id {
                    3 if fails => {
                        json!({ "id": id, "update_id": 3, "state": "failed", "message": "the build broke" })
                    }
                    3 if nul_results.contains(&job.payload) => {
                        json!({ "id": id, "update_id": 3, "state": "done", "result": { "log": "a\u{0}b" } })
                    }
                    3 => {
                        json!({ "id": id, "update_id": 3, "state": "done", "result": { "built": job.key, "payload": job.payload } })
                    }
                    n => json!({ "id": id, "update_id": n, "state": "running" }),
                }
            }
        };
        states.push(state);
    }
    if s.wrong_counts > 0 {
        s.wrong_counts -= 1;
        states.pop();
    }
    json!({ "states": states })
}

/// A backend whose first call hangs for `hang`; its calls are counted as they overlap.
async fn slow_fetch(State(service): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let hang = {
        let mut s = service.lock().unwrap();
        s.slow_calls += 1;
        s.slow_in_flight += 1;
        s.slow_max_in_flight = s.slow_max_in_flight.max(s.slow_in_flight);
        if s.slow_calls == 1 {
            s.hang
        } else {
            Duration::ZERO
        }
    };
    tokio::time::sleep(hang).await;
    let mut s = service.lock().unwrap();
    s.slow_in_flight -= 1;
    s.fetches += 1;
    Json(answer(&mut s, &body))
}

/// A backend that fails every status call.
async fn failing_fetch() -> StatusCode {
    StatusCode::INTERNAL_SERVER_ERROR
}

/// A backend that repeats itself: the first state asked, once per id asked.
async fn repeating_fetch(Json(body): Json<Value>) -> Json<Value> {
    let ids = body["ids"].as_array().unwrap();
    let first = json!({ "id": ids[0], "update_id": 1, "state": "running" });
    Json(json!({ "states": vec![first; ids.len() + 1] }))
}

async fn hand_off(
    State(service): State<Shared>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    let mut s = service.lock().unwrap();
    s.hand_offs += 1;
    let key = body["key"].as_str().unwrap().to_owned();
    let next = format!("ext-{}", s.by_key.len() + 1);
    let id = s.by_key.entry(key.clone()).or_insert(next).clone();
    s.jobs.entry(id.clone()).or_insert(Job {
        key,
        payload: body["payload"].clone(),
        update_id: 0,
    });
    if s.lost_hand_offs > 0 {
        s.lost_hand_offs -= 1;
        return Err(StatusCode::INTERNAL_SERVER_ERROR);
    }
    Ok(Json(json!({ "id": id })))
}

/// Starts the service; returns its state and base URL.
async fn start_service(service: Service) -> (Shared, String) {
    let shared: Shared = Arc::new(Mutex::new(service));
    let app = Router::new()
        .route("/hand-off", post(hand_off))
        .route("/states", post(fetch))
        .route("/slow-states", post(slow_fetch))
        .route("/failing-states", post(failing_fetch))
        .route("/repeating-states", post(repeating_fetch))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (shared, format!("http://{addr}"))
}

fn backend(base: &str) -> HttpBackend {
    backend_at(base, "states")
}

/// A backend whose status calls go to `base/<states>`.
fn backend_at(base: &str, states: &str) -> HttpBackend {
    HttpBackend::new(format!("{base}/hand-off"), format!("{base}/{states}"))
        .poll_every(Duration::from_millis(100))
        .timeout(Duration::from_secs(1))
}

async fn external_tasks_finish_through_the_syncer(backend_kind: Backend) {
    const TASKS: i64 = 20;
    let env = TestEnv::new(backend_kind).await;
    let (service, base) = start_service(Service::default()).await;
    let pod = env.start(env.pod().backend("build", backend(&base)));
    let client = env.client().await;
    let mut request = JobRequest::new("build", (0..TASKS).map(|n| json!(n)).collect());
    request.results_in_event = true;
    let job_id = client.submit(request).await.unwrap();

    // Copies of every first attempt, as a redelivery or a sweeper would send them: the
    // claims find the tasks handed off already, and no second external task is made.
    common::wait_until(LONG, || async {
        let rows = env.store.tasks_of_job(&job_id).await.unwrap();
        rows.len() == TASKS as usize && rows.iter().all(|row| row.external_id.is_some())
    })
    .await;
    for row in env.store.tasks_of_job(&job_id).await.unwrap() {
        let message = TaskMessage {
            version: 1,
            job_id: job_id.clone(),
            task_id: row.id,
            task_type: row.task_type.clone(),
            attempt: 1,
            max_retries: 3,
            retry_delay_ms: 5_000,
            task_timeout_ms: None,
            run: 1,
            payload: row.payload.clone(),
        };
        env.publish_raw(
            "",
            &env.topology().work_queue("default"),
            &serde_json::to_vec(&message).unwrap(),
            None,
        )
        .await;
    }

    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((event.event.as_str(), event.done), ("job.done", TASKS));
    let results = event.results.unwrap();
    for (n, result) in (0..TASKS).zip(&results) {
        assert_eq!(result.attempts, 1);
        let built = result.result.as_ref().unwrap();
        assert_eq!(built["payload"], json!(n));
        assert_eq!(built["built"], json!(format!("{}:1", result.task_id)));
    }
    {
        let s = service.lock().unwrap();
        assert_eq!(s.by_key.len(), TASKS as usize, "one external task per task");
        assert_eq!(s.hand_offs, TASKS as usize, "no second hand-off");
    }
    for row in env.store.tasks_of_job(&job_id).await.unwrap() {
        assert_eq!(
            row.external_update_id,
            Some(3),
            "the stale and errored reports were not applied"
        );
        assert_eq!(
            row.next_sync_at, None,
            "a finished task leaves the syncer's scan"
        );
        assert!(row.last_poll_at.is_some() && row.last_progress_at.is_some());
    }
    pod.stop().await;
}

/// A backend that answers with a state missing, and one too slow for its timeout: the
/// batch is an error, its tasks stay due and finish later. A failed external state is a
/// failed attempt: retried, and with no retries left, a failed job.
async fn bad_answers_leave_tasks_due(backend_kind: Backend) {
    let env = TestEnv::new(backend_kind).await;
    let (service, base) = start_service(Service {
        wrong_counts: 3,
        slow_answers: 2,
        failing: vec![json!("breaks")],
        ..Service::default()
    })
    .await;
    let pod = env.start(env.pod().backend("build", backend(&base)));
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new("build", (0..5).map(|n| json!(n)).collect()))
        .await
        .unwrap();
    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((event.event.as_str(), event.done), ("job.done", 5));
    {
        let s = service.lock().unwrap();
        assert_eq!(
            (s.wrong_counts, s.slow_answers),
            (0, 0),
            "every bad answer was given"
        );
    }

    let mut request = JobRequest::new("build", vec![json!("breaks")]);
    request.max_retries = 1;
    request.retry_delay_ms = 50;
    let failing = client.submit(request).await.unwrap();
    let event = tokio::time::timeout(LONG, client.wait(&failing))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "job.failed");
    assert_eq!(event.first_error.as_deref(), Some("the build broke"));
    let row = env.store.tasks_of_job(&failing).await.unwrap().remove(0);
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 2));
    assert_eq!(
        row.external_attempt,
        Some(2),
        "each attempt handed off anew"
    );
    pod.stop().await;
}

/// A task whose backend keeps answering without moving fails its attempt after the
/// no-progress timeout — polls are not progress — and is handed off again.
async fn no_progress_fails_the_attempt_and_it_is_handed_off_again(backend_kind: Backend) {
    let env = TestEnv::new(backend_kind).await;
    let (service, base) = start_service(Service {
        stuck: vec![json!("stuck")],
        ..Service::default()
    })
    .await;
    let pod = env.start(env.pod().backend(
        "build",
        backend(&base).no_progress_after(Duration::from_secs(2)),
    ));
    let client = env.client().await;
    let mut request = JobRequest::new("build", vec![json!("stuck")]);
    request.max_retries = 2;
    request.retry_delay_ms = 50;
    let job_id = client.submit(request).await.unwrap();
    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "job.failed");
    let error = event.first_error.unwrap();
    assert!(error.contains("made no progress for 2s"), "{error}");
    let row = env.store.tasks_of_job(&job_id).await.unwrap().remove(0);
    assert_eq!(row.attempts, 3);
    {
        let s = service.lock().unwrap();
        let mut keys: Vec<&String> = s.by_key.keys().collect();
        keys.sort();
        let expected: Vec<String> = (1..=3).map(|n| format!("{}:{n}", row.id)).collect();
        assert_eq!(keys, expected.iter().collect::<Vec<_>>());
        assert!(s.fetches >= 6, "it was polled while it stood still");
    }
    let status: TaskStatus = row.status.parse().unwrap();
    assert_eq!(status, TaskStatus::Failed);
    pod.stop().await;
}

/// A write the database refuses (a trigger refuses every sync of task 0, its failure
/// too) holds back that task only: the 29 others, its batch's included, finish
/// meanwhile, and once the database takes its writes again, so does it.
async fn a_refused_write_holds_back_only_its_task(backend_kind: Backend) {
    const TASKS: i64 = 30;
    let env = TestEnv::new(backend_kind).await;
    let (_service, base) = start_service(Service::default()).await;
    let refuse = match backend_kind {
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_sync BEFORE UPDATE ON tasks \
             WHEN NEW.ordinal = 0 AND NEW.last_poll_at IS NOT NULL \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        ],
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse_sync() RETURNS trigger AS $$ BEGIN \
             IF NEW.ordinal = 0 AND NEW.last_poll_at IS NOT NULL THEN \
             RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_sync BEFORE UPDATE ON tasks \
             FOR EACH ROW EXECUTE FUNCTION refuse_sync()",
        ],
    };
    env.execute_sql(&refuse).await;
    let pod = env.start(env.pod().backend("build", backend(&base)));
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new(
            "build",
            (0..TASKS).map(|n| json!(n)).collect(),
        ))
        .await
        .unwrap();
    common::wait_until(LONG, || async {
        let rows = env.store.tasks_of_job(&job_id).await.unwrap();
        rows.iter().filter(|row| row.status == "done").count() == TASKS as usize - 1
    })
    .await;
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    let first = rows.iter().find(|row| row.ordinal == 0).unwrap();
    assert_eq!(first.status, "running");
    assert_eq!(first.last_poll_at, None, "none of its syncs was written");

    let allow: &[&str] = match backend_kind {
        Backend::Sqlite => &["DROP TRIGGER refuse_sync"],
        Backend::Postgres => &["DROP TRIGGER refuse_sync ON tasks"],
    };
    env.execute_sql(allow).await;
    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((event.event.as_str(), event.done), ("job.done", TASKS));
    pod.stop().await;
}

/// A backend whose answer the database refuses to store (a result holding a NUL:
/// PostgreSQL's jsonb takes none; on SQLite a trigger refuses the same) fails that
/// task alone, with the database's reason; the 29 others of its batch finish.
async fn a_refused_answer_fails_only_its_task(backend_kind: Backend) {
    const TASKS: i64 = 30;
    let env = TestEnv::new(backend_kind).await;
    if backend_kind == Backend::Sqlite {
        env.execute_sql(&["CREATE TRIGGER refuse_nul BEFORE UPDATE ON tasks \
             WHEN instr(NEW.result, '\\u0000') > 0 \
             BEGIN SELECT RAISE(ABORT, 'unsupported Unicode escape sequence'); END"])
            .await;
    }
    let (_service, base) = start_service(Service {
        nul_results: vec![json!(7)],
        ..Service::default()
    })
    .await;
    let pod = env.start(env.pod().backend("build", backend(&base)));
    let client = env.client().await;
    let mut request = JobRequest::new("build", (0..TASKS).map(|n| json!(n)).collect());
    request.on_failure = taskmill::protocol::FailurePolicy::Continue;
    let job_id = client.submit(request).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(60), client.wait(&job_id))
        .await
        .expect("the job ends: the refused write does not hold back its batch")
        .unwrap();
    assert_eq!(
        (event.event.as_str(), event.done, event.failed),
        ("job.failed", TASKS - 1, 1)
    );
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    let refused = rows.iter().find(|row| row.payload == json!(7)).unwrap();
    assert_eq!(refused.status, "failed");
    let info = refused.info.as_deref().unwrap();
    assert!(
        info.contains("could not record the backend's answer") && info.contains("Unicode"),
        "{info}"
    );
    pod.stop().await;
}

/// Backends that answer with an error status, or repeat themselves (a state for one
/// id, over and over, one more than asked): each call fails as a whole, the backend
/// backs off, and since failed calls are no progress, the task fails its attempt once
/// the no-progress timeout has passed.
async fn failing_and_repeating_backends_time_out(backend_kind: Backend) {
    let env = TestEnv::new(backend_kind).await;
    let (service, base) = start_service(Service::default()).await;
    let no_progress = Duration::from_secs(2);
    let pod = env.start(
        env.pod()
            .backend(
                "failing",
                backend_at(&base, "failing-states").no_progress_after(no_progress),
            )
            .backend(
                "repeating",
                backend_at(&base, "repeating-states").no_progress_after(no_progress),
            ),
    );
    let client = env.client().await;
    for backend in ["failing", "repeating"] {
        let mut request = JobRequest::new(backend, vec![json!(1)]);
        request.max_retries = 0;
        let job_id = client.submit(request).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(30), client.wait(&job_id))
            .await
            .expect("failed calls count toward the no-progress timeout")
            .unwrap();
        assert_eq!(event.event, "job.failed", "{backend}");
        let error = event.first_error.unwrap();
        assert!(error.contains("made no progress for 2s"), "{error}");
    }
    assert_eq!(
        service.lock().unwrap().hand_offs,
        2,
        "one hand-off per task"
    );
    pod.stop().await;
}

/// One backend's call hangs (13 s, longer than the syncer's 10 s lease): another
/// backend's tasks are polled and end meanwhile, and the pod holding the lease keeps
/// it, so a second pod never calls the hung backend beside it.
async fn a_hung_backend_holds_back_only_its_own_tasks(backend_kind: Backend) {
    let env = TestEnv::new(backend_kind).await;
    let (service, base) = start_service(Service {
        hang: Duration::from_secs(13),
        ..Service::default()
    })
    .await;
    let pod_with = || {
        env.pod().backend("build", backend(&base)).backend(
            "slow",
            backend_at(&base, "slow-states").timeout(Duration::from_secs(30)),
        )
    };
    let pods = [env.start(pod_with()), env.start(pod_with())];
    let client = env.client().await;
    let slow = client
        .submit(JobRequest::new("slow", vec![json!("slow")]))
        .await
        .unwrap();
    common::wait_until(LONG, || async {
        service.lock().unwrap().slow_in_flight == 1
    })
    .await;
    let quick = client
        .submit(JobRequest::new("build", (0..5).map(|n| json!(n)).collect()))
        .await
        .unwrap();
    let event = tokio::time::timeout(LONG, client.wait(&quick))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((event.event.as_str(), event.done), ("job.done", 5));
    assert_eq!(
        service.lock().unwrap().slow_in_flight,
        1,
        "the other backend's job ended while the hung call was still running"
    );
    let event = tokio::time::timeout(LONG, client.wait(&slow))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "job.done");
    assert_eq!(
        service.lock().unwrap().slow_max_in_flight,
        1,
        "no second call while the first one hung: the lease was renewed meanwhile"
    );
    for pod in pods {
        pod.stop().await;
    }
}

/// A pod whose syncer lease is taken from it while its call hangs drops the answer
/// when it comes: nothing is written by a pod that no longer holds the lease. Once the
/// lease is free again, the pod takes it back and the job ends.
async fn a_pod_that_loses_the_syncer_lease_writes_nothing(backend_kind: Backend) {
    let env = TestEnv::new(backend_kind).await;
    let (service, base) = start_service(Service {
        hang: Duration::from_secs(5),
        ..Service::default()
    })
    .await;
    let pod = env.start(env.pod().backend(
        "slow",
        backend_at(&base, "slow-states").timeout(Duration::from_secs(30)),
    ));
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new("slow", vec![json!("slow")]))
        .await
        .unwrap();
    common::wait_until(LONG, || async {
        service.lock().unwrap().slow_in_flight == 1
    })
    .await;
    env.execute_sql(&["UPDATE leases SET holder = 'another pod' WHERE name = 'syncer'"])
        .await;
    common::wait_until(LONG, || async {
        service.lock().unwrap().slow_in_flight == 0
    })
    .await;
    // The hung call has returned: time for the pod to (wrongly) write its answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let row = env.store.tasks_of_job(&job_id).await.unwrap().remove(0);
    assert_eq!(
        (row.last_poll_at, row.external_update_id),
        (None, None),
        "the answer that came after the lease was lost was not written"
    );
    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "job.done");
    pod.stop().await;
}

/// A backend that takes a hand-off but whose answer is lost (a 500) is asked again
/// under the same key: it answers with the task it made, and the attempt goes on —
/// no second external task under another key.
async fn a_lost_hand_off_answer_is_retried_under_its_key(backend_kind: Backend) {
    const TASKS: usize = 3;
    let env = TestEnv::new(backend_kind).await;
    let (service, base) = start_service(Service {
        lost_hand_offs: TASKS,
        ..Service::default()
    })
    .await;
    let pod = env.start(env.pod().backend("build", backend(&base)));
    let client = env.client().await;
    let mut request = JobRequest::new("build", (0..TASKS).map(|n| json!(n)).collect());
    request.retry_delay_ms = 50;
    let job_id = client.submit(request).await.unwrap();
    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (event.event.as_str(), event.done),
        ("job.done", TASKS as i64)
    );
    {
        let s = service.lock().unwrap();
        assert_eq!(s.by_key.len(), TASKS, "one external task per task");
        assert_eq!(s.hand_offs, 2 * TASKS, "each lost answer asked again once");
    }
    for row in env.store.tasks_of_job(&job_id).await.unwrap() {
        assert_eq!(row.attempts, 1, "the lost answer did not fail the attempt");
    }
    pod.stop().await;
}

/// After `retry` starts run 2 (attempts from 1 again), a copy of run 1's task message
/// arrives first: it claims nothing — it would hand off under run 1's key and get run
/// 1's failed external task back — and is counted; run 2's own message runs the task.
async fn a_stale_run_copy_after_retry_claims_nothing(backend_kind: Backend) {
    let env = TestEnv::new(backend_kind).await;
    let (service, base) = start_service(Service {
        failing_in_run_1: vec![json!("flaky")],
        ..Service::default()
    })
    .await;
    let pod = env.start(env.pod().backend("build", backend(&base)));
    let client = env.client().await;
    let mut request = JobRequest::new("build", vec![json!("flaky")]);
    request.max_retries = 0;
    let job_id = client.submit(request).await.unwrap();
    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((event.event.as_str(), event.run), ("job.failed", 1));
    pod.stop().await;

    assert_eq!(client.retry(&job_id).await.unwrap(), 1);
    let queue = env.topology().work_queue("default");
    let run_2 = env.drain_queue(&queue).await;
    let row = env.store.tasks_of_job(&job_id).await.unwrap().remove(0);
    let run_1_copy = TaskMessage {
        version: 1,
        job_id: job_id.clone(),
        task_id: row.id,
        task_type: row.task_type.clone(),
        attempt: 1,
        max_retries: 0,
        retry_delay_ms: 5_000,
        task_timeout_ms: None,
        run: 1,
        payload: row.payload.clone(),
    };
    env.publish_raw("", &queue, &serde_json::to_vec(&run_1_copy).unwrap(), None)
        .await;
    for (body, _) in &run_2 {
        env.publish_raw("", &queue, body, None).await;
    }
    let (config, http) = env.config_with_http();
    let pod = env.start(env.pod().config(config).backend("build", backend(&base)));
    common::wait_until(LONG, || async {
        let job = env.store.job(&job_id).await.unwrap().unwrap();
        job.run == 2 && job.stage != "running"
    })
    .await;
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert_eq!(job.stage, "done", "run 2 ran its own attempt");
    let mut keys: Vec<String> = service.lock().unwrap().by_key.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, [format!("{}:1", row.id), format!("{}:1:r2", row.id)]);
    let metrics = tokio::task::spawn_blocking(move || {
        ureq::get(&format!("{http}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        metrics.contains("taskmill_stale_run_messages_total{pool=\"default\"}"),
        "{metrics}"
    );
    pod.stop().await;
}

/// The syncer writes an answer only if the task's row is still as it read it before
/// the call, so a late answer — from a syncer that lost its lease meanwhile, or about a
/// hand-off that a retry replaced — cannot write a lower update id, apply a previous
/// hand-off's state, or end the attempt of a later run.
async fn late_answers_change_nothing(backend_kind: Backend) {
    let env = TestEnv::new(backend_kind).await;
    let (_service, base) = start_service(Service {
        stuck: vec![json!("stuck")],
        ..Service::default()
    })
    .await;
    let pod = env.start(env.pod().backend("build", backend(&base)));
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new("build", vec![json!("stuck")]))
        .await
        .unwrap();
    let row = || async { env.store.tasks_of_job(&job_id).await.unwrap().remove(0) };
    common::wait_until(LONG, || async {
        let rows = env.store.tasks_of_job(&job_id).await.unwrap();
        rows.first()
            .is_some_and(|row| row.external_update_id == Some(0))
    })
    .await;
    pod.stop().await;
    let read = row().await;
    let task_id = read.id;
    // Meanwhile another syncer applied update 5.
    env.execute_sql(&[&format!(
        "UPDATE tasks SET external_update_id = 5 WHERE id = {task_id}"
    )])
    .await;
    let next_sync_at = chrono::Utc::now();
    let write = |seen: Seen, change| SyncWrite { seen, change };
    let done = |update_id| SyncChange::Ended {
        outcome: TaskOutcome::Done(json!("stale")),
        update_id: Some(update_id),
    };
    let lies = [
        write(
            Seen::of(&read),
            SyncChange::Progressed {
                update_id: 4,
                next_sync_at,
            },
        ),
        write(
            Seen {
                external_id: "a previous hand-off".into(),
                ..Seen::of(&row().await)
            },
            done(9),
        ),
    ];
    assert!(env.store.apply_sync(&lies).await.unwrap().is_empty());
    let after = row().await;
    assert_eq!(
        (after.status.as_str(), after.external_update_id),
        ("running", Some(5))
    );
    let fresh = write(
        Seen::of(&after),
        SyncChange::Progressed {
            update_id: 6,
            next_sync_at,
        },
    );
    env.store.apply_sync(&[fresh]).await.unwrap();
    assert_eq!(
        row().await.external_update_id,
        Some(6),
        "a true answer applies"
    );

    // `retry` reset the task into run 2, whose attempt 1 was handed off under the same
    // external id (a backend may reuse ids): run 1's answer ends nothing.
    let run_1 = Seen::of(&row().await);
    env.execute_sql(&[&format!("UPDATE tasks SET run = 2 WHERE id = {task_id}")])
        .await;
    let ended = env
        .store
        .apply_sync(&[write(run_1, done(7))])
        .await
        .unwrap();
    assert!(ended.is_empty());
    let after = row().await;
    assert_eq!(
        (after.status.as_str(), after.external_update_id),
        ("running", Some(6))
    );
}
