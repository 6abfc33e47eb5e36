//! Untrusted producers: requests that are well-formed under the protocol but try its
//! edges, sent with a plain AMQP publish as any producer would. After each, a normal
//! job still completes within seconds, the intake queue is empty, the parking lot holds
//! exactly what was meant to be parked (with reasons), and the broker holds no more
//! queues than the documented bound.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use taskmill::amqp::topology::Topology;
use taskmill::{builtin, JobRequest};

use common::{Backend, FreezableProxy, TestEnv};

const SOON: Duration = Duration::from_secs(30);

/// The ladder's timing is measured with the machine quiet: the other scenarios of this
/// file take the lock shared, the measurement takes it alone.
static QUIET: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

on_both_backends!(
    on_complete_to_a_missing_exchange_stalls_nothing,
    params_the_database_refuses_are_decided_at_once,
    one_refused_request_fails_none_of_its_group,
    two_hundred_delays_share_one_ladder,
    a_wait_above_the_ttl_limit_is_parked,
    an_unknown_task_type_is_answered_with_a_rejection,
    a_reused_job_id_with_another_request_is_refused,
    a_restarted_worker_role_leaves_no_channel_behind,
    hung_tasks_time_out_and_free_their_slots,
    requests_for_pools_nobody_serves_are_refused,
    a_job_waiting_on_a_pool_nobody_consumes_says_so,
    a_queue_declared_with_other_arguments_parks_the_request,
    a_deleted_delay_queue_is_declared_again,
    a_job_failed_while_forming_stops_its_intake_and_its_tasks,
    a_job_that_cannot_end_fails_alone,
    a_word_count_too_large_for_its_shards_fails_saying_so,
    unsealed_jobs_in_parts_cost_nothing_while_they_wait,
);

mod any_backend {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_is_bounded_when_the_broker_stops_answering() {
        super::shutdown_is_bounded_when_the_broker_stops_answering().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ladder_waits_exactly() {
        super::the_ladder_waits_exactly().await
    }
}

// ---------------------------------------------------------------- scenarios

async fn shutdown_is_bounded_when_the_broker_stops_answering() {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let proxy = FreezableProxy::start("127.0.0.1:5672").await;
    let mut config = env.config.clone();
    config.amqp_url = proxy.amqp_url(&env.name);
    let grace = config.grace_period;
    let pod = env.start(env.pod().config(config));
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new(
            builtin::SLEEP,
            (0..400).map(|_| json!({ "ms": 100 })).collect(),
        ))
        .await
        .unwrap();
    common::wait_until(SOON, || async {
        env.store
            .job_status(&job_id)
            .await
            .unwrap()
            .is_some_and(|s| s.tasks_by_status.get("done").copied().unwrap_or(0) >= 50)
    })
    .await;

    proxy.freeze();
    let stopping = Instant::now();
    pod.token.cancel();
    let stopped = tokio::time::timeout(grace + Duration::from_secs(5), pod.handle).await;
    assert!(
        stopped.is_ok(),
        "a pod whose broker stopped answering exits within grace + 5 s (waited {:?})",
        stopping.elapsed()
    );
    client.close().await.unwrap();
}

async fn on_complete_to_a_missing_exchange_stalls_nothing(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let events = env.event_log().await;
    let mut request = echo_request("missing-target", 3);
    request["on_complete"] = json!({"exchange": "no-such-exchange", "routing_key": "x"});
    publish_request(&env, &request).await;

    let job = env.wait_for_end("missing-target", SOON).await;
    assert_eq!(job.stage, "done");
    // The event still reaches the events exchange; the target's failure is recorded.
    events.wait_for(1, SOON).await;
    let outbox = common::wait_for_value(SOON, || async {
        let row = env.store.job_event("missing-target").await.unwrap()?;
        row.target_error.is_some().then_some(row)
    })
    .await;
    assert!(
        outbox
            .target_error
            .as_deref()
            .unwrap()
            .contains("no-such-exchange"),
        "the recorded failure names the target: {:?}",
        outbox.target_error
    );
    // Later requests go through as before: nothing stalled behind the closed channel.
    for n in 0..3 {
        assert_still_serving(&env, &client, &format!("after-{n}")).await;
    }
    assert_parked(&env, &[]).await;
    pod.stop().await;
}

async fn params_the_database_refuses_are_decided_at_once(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let mut request = echo_request("nul-params", 2);
    request["params"] = json!({ "name": "a\u{0}b" });
    publish_request(&env, &request).await;

    match backend {
        // PostgreSQL's jsonb refuses the NUL character: parked with its reason.
        Backend::Postgres => {
            let parked = wait_for_parked(&env, 1).await;
            assert!(
                parked[0].to_lowercase().contains("unicode") || parked[0].contains("\\u0000"),
                "the reason is the database's: {}",
                parked[0]
            );
            assert!(env.store.job("nul-params").await.unwrap().is_none());
        }
        // SQLite keeps JSON as text: the job simply runs.
        Backend::Sqlite => {
            assert_eq!(env.wait_for_end("nul-params", SOON).await.stage, "done");
        }
    }
    assert_still_serving(&env, &client, "after-nul").await;
    pod.stop().await;
}

/// Small jobs that arrive together are made in one transaction. A request in such a
/// group that the database refuses, and two requests sharing one job id, are decided
/// alone: every other job of the burst runs.
async fn one_refused_request_fails_none_of_its_group(backend: Backend) {
    const JOBS: usize = 30;
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let client = env.client().await;
    // The burst waits in the intake queue (declared by a first pod) for a pod that
    // takes it all at once.
    let first = env.start(env.pod());
    assert_still_serving(&env, &client, "before-burst").await;
    first.stop().await;
    let mut bad = echo_request("burst-nul", 1);
    bad["params"] = json!({ "name": "a\u{0}b" });
    for n in 0..JOBS {
        publish_request(&env, &echo_request(&format!("burst-{n}"), 3)).await;
        if n == JOBS / 2 {
            publish_request(&env, &bad).await;
            publish_request(&env, &echo_request("burst-shared", 2)).await;
            publish_request(&env, &echo_request("burst-shared", 5)).await;
        }
    }
    let pod = env.start(env.pod());
    for n in 0..JOBS {
        let job = env.wait_for_end(&format!("burst-{n}"), SOON).await;
        assert_eq!(
            (job.stage.as_str(), job.done_count),
            ("done", 3),
            "burst-{n}"
        );
    }
    // Requests are taken concurrently: either of the two may make the job.
    let shared = env.wait_for_end("burst-shared", SOON).await;
    let rows = env.store.tasks_of_job("burst-shared").await.unwrap();
    assert!(
        shared.stage == "done"
            && [2, 5].contains(&shared.task_count)
            && rows.len() as i64 == shared.task_count,
        "one request's tasks only: {} rows, task count {}",
        rows.len(),
        shared.task_count
    );
    let parked = wait_for_parked(&env, if backend == Backend::Postgres { 2 } else { 1 }).await;
    assert!(
        parked
            .iter()
            .any(|reason| reason.contains("reused with a different request")),
        "{parked:?}"
    );
    match backend {
        Backend::Postgres => {
            assert!(
                parked
                    .iter()
                    .any(|reason| reason.to_lowercase().contains("unicode")
                        || reason.contains("\\u0000")),
                "the database's reason: {parked:?}"
            );
            assert!(env.store.job("burst-nul").await.unwrap().is_none());
        }
        Backend::Sqlite => {
            assert_eq!(env.wait_for_end("burst-nul", SOON).await.stage, "done");
        }
    }
    assert_still_serving(&env, &client, "after-burst").await;
    pod.stop().await;
}

async fn two_hundred_delays_share_one_ladder(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let ids: Vec<String> = (0..200).map(|n| format!("delay-{n}")).collect();
    for (n, id) in ids.iter().enumerate() {
        let mut request = json!({
            "version": 1,
            "job_id": id,
            "job_type": builtin::FAIL,
            "tasks": [{ "times": 2 }],
            "retry_delay_ms": 20 + 7 * n,
        });
        if n % 2 == 0 {
            request["max_retries"] = json!(2);
        }
        publish_request(&env, &request).await;
    }
    for id in &ids {
        assert_eq!(
            env.wait_for_end(id, Duration::from_secs(60)).await.stage,
            "done"
        );
    }
    assert_still_serving(&env, &client, "after-delays").await;
    pod.stop().await;
}

async fn a_wait_above_the_ttl_limit_is_parked(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let mut request = echo_request("too-long", 1);
    request["max_retries"] = json!(100);
    request["retry_delay_ms"] = json!(86_400_000);
    publish_request(&env, &request).await;
    let parked = wait_for_parked(&env, 1).await;
    assert!(parked[0].contains("limit"), "reason: {}", parked[0]);
    assert_still_serving(&env, &client, "after-ttl").await;
    assert!(env.store.job("too-long").await.unwrap().is_none());
    pod.stop().await;
}

async fn an_unknown_task_type_is_answered_with_a_rejection(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let reply = env.declare_queue("reply").await;
    let watch = client.watch("typo").await.unwrap();
    let mut request = echo_request("typo", 2);
    request["task_type"] = json!("no.such.handler");
    request["on_complete"] = json!({ "routing_key": reply });
    publish_request(&env, &request).await;

    let answer = tokio::time::timeout(SOON, watch.event()).await.unwrap();
    match answer {
        Err(taskmill::Error::Rejected { job_id, reason }) => {
            assert_eq!(job_id, "typo");
            assert!(reason.contains("unknown task type"), "{reason}");
        }
        other => panic!("a rejection, not {other:?}"),
    }
    let replies = common::wait_for_value(SOON, || async {
        let got = env.drain_queue(&reply).await;
        (!got.is_empty()).then_some(got)
    })
    .await;
    let event: taskmill::JobEvent = serde_json::from_slice(&replies[0].0).unwrap();
    assert!(event.is_rejected(), "{event:?}");
    assert_eq!(wait_for_parked(&env, 1).await.len(), 1);
    assert!(env.store.job("typo").await.unwrap().is_none());
    assert_still_serving(&env, &client, "after-typo").await;
    pod.stop().await;
}

async fn a_reused_job_id_with_another_request_is_refused(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let mut replies = Vec::new();
    for (name, tasks) in [("first", 300), ("second", 7)] {
        let reply = env.declare_queue(&format!("reply.{name}")).await;
        let mut request = echo_request("shared-id", tasks);
        request["on_complete"] = json!({ "routing_key": reply });
        publish_request(&env, &request).await;
        replies.push(reply);
    }
    let job = env.wait_for_end("shared-id", SOON).await;
    assert_eq!(job.stage, "done");
    let rows = env.store.tasks_of_job("shared-id").await.unwrap();
    assert!(
        [300, 7].contains(&job.task_count) && rows.len() as i64 == job.task_count,
        "one request's tasks only: {} rows, task count {}",
        rows.len(),
        job.task_count
    );
    let parked = wait_for_parked(&env, 1).await;
    assert!(
        parked[0].contains("reused with a different request"),
        "{}",
        parked[0]
    );
    // Each producer hears back on its own target: one done, one rejected.
    let mut kinds = Vec::new();
    for reply in &replies {
        let got = common::wait_for_value(SOON, || async {
            let got = env.drain_queue(reply).await;
            (!got.is_empty()).then_some(got)
        })
        .await;
        let event: taskmill::JobEvent = serde_json::from_slice(&got[0].0).unwrap();
        kinds.push(event.event);
    }
    kinds.sort();
    assert_eq!(kinds, ["job.done", "job.rejected"]);
    assert_still_serving(&env, &client, "after-reuse").await;
    pod.stop().await;
}

/// A worker role whose consumer the broker cancels (its queue deleted) starts again and
/// lets go of what the failed run opened; before, each restart kept its publishing
/// channel open for good. (Counts come from the management API and include the
/// test's own short-lived channels, hence "no more than before".)
async fn a_restarted_worker_role_leaves_no_channel_behind(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let queue = env.topology().work_queue("default");
    let serving = || async { env.consumers_if_declared(&queue).await == Some(1) };
    common::wait_until(SOON, serving).await;
    assert_still_serving(&env, &client, "before-restarts").await;
    // The management API's figures lag: wait until they count every open channel.
    env.wait_for_current_channel_list().await;
    let before = env.channel_count();
    for _ in 0..6 {
        let connection = env.connection().await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .unwrap();
        connection.close(200, "done".into()).await.unwrap();
        common::wait_until(SOON, serving).await;
    }
    assert_still_serving(&env, &client, "after-restarts").await;
    let settled = Instant::now() + Duration::from_secs(20);
    while env.channel_count() > before && Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = env.channel_count();
    assert!(
        after <= before,
        "{after} channels open after 6 restarts, {before} before"
    );
    pod.stop().await;
}

/// Forty tasks that never return, on a pod of 32 slots: each attempt ends at its
/// timeout (the handler ignores its stop token, so it is dropped), and the pod serves
/// other jobs as soon as those slots are free.
async fn hung_tasks_time_out_and_free_their_slots(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod().handler("hang", |_ctx| async {
        std::future::pending::<()>().await;
        Ok(json!("never"))
    }));
    let client = env.client().await;
    let request = json!({
        "version": 1,
        "job_id": "hung",
        "job_type": "hang",
        "tasks": vec![json!({}); 40],
        "task_timeout_ms": 2000,
        "max_retries": 1,
        "retry_delay_ms": 50,
        "on_failure": "continue",
    });
    publish_request(&env, &request).await;
    let job = env.wait_for_end("hung", Duration::from_secs(60)).await;
    assert_eq!((job.stage.as_str(), job.failed_count), ("failed", 40));
    assert!(
        job.first_error
            .as_deref()
            .unwrap_or_default()
            .contains("timed out after 2s"),
        "{:?}",
        job.first_error
    );
    let rows = env.store.tasks_of_job("hung").await.unwrap();
    assert!(
        rows.iter().all(|row| row.attempts == 2),
        "every task tried twice"
    );
    assert_still_serving(&env, &client, "after-hung").await;
    pod.stop().await;
}

/// The ladder alone: messages published into it with waits from 1 ms to 5 s arrive
/// in their work queue after their wait, within ±1% or ±20 ms. Each goes out at the
/// same moment as a control message with no wait, on a connection of its own (so
/// neither waits behind the other in a socket buffer), and its wait is measured from
/// the control's arrival: what the client and the broker add on the way, the same for
/// both, cancels out, and what is left is the ladder's own.
async fn the_ladder_waits_exactly() {
    let _quiet = QUIET.write().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let topology = env.topology();
    let delayed_connection = env.connection().await;
    let control_connection = env.connection().await;
    let delayed = taskmill::amqp::broker::Publisher::open(&delayed_connection)
        .await
        .unwrap();
    let control = taskmill::amqp::broker::Publisher::open(&control_connection)
        .await
        .unwrap();
    let channel = delayed.channel().await.unwrap();
    topology.declare_core(&channel).await.unwrap();
    topology
        .declare_work_queue(&channel, "ladder")
        .await
        .unwrap();
    topology.declare_delay_ladder(&channel).await.unwrap();
    let queue = topology.work_queue("ladder");
    let listener = env.connection().await;
    let mut consumer = listener
        .create_channel()
        .await
        .unwrap()
        .basic_consume(
            queue.as_str().into(),
            "ladder-test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let waits: [u64; 10] = [1, 2, 7, 100, 333, 1000, 1023, 2500, 4097, 5000];
    let send = |publisher: &taskmill::amqp::broker::Publisher, delay: u64, body: String| {
        let publisher = publisher.clone();
        let route = topology.delay_route(delay, "ladder");
        async move {
            publisher
                .publish(taskmill::amqp::broker::Outgoing {
                    exchange: &route.exchange,
                    routing_key: &route.routing_key,
                    body: body.as_bytes(),
                    mandatory: true,
                    headers: None,
                })
                .await
                .unwrap()
        }
    };
    // ±1% or ±20 ms, and 10 ms for the measurement itself (two connections, one
    // consumer). The machine is shared: a wait counts as exact if one of three rounds
    // measured it so; a ladder that is wrong is wrong every round.
    let tolerance = |wait: u64| Duration::from_millis((wait / 100).max(20) + 10);
    let mut best: std::collections::HashMap<u64, Duration> = Default::default();
    for round in 0..3 {
        let arrivals = tokio::spawn(async move {
            let mut arrived: std::collections::HashMap<String, Instant> = Default::default();
            while let Some(Ok(delivery)) = consumer.next().await {
                let name = String::from_utf8_lossy(&delivery.data).into_owned();
                arrived.insert(name, Instant::now());
                if arrived.len() == 2 * waits.len() {
                    break;
                }
            }
            (consumer, arrived)
        });
        for wait in waits {
            futures::join!(
                send(&delayed, wait, format!("{round} {wait}")),
                send(&control, 0, format!("{round} control {wait}")),
            );
        }
        let (returned, arrived) = tokio::time::timeout(Duration::from_secs(20), arrivals)
            .await
            .expect("every message comes out of the ladder")
            .unwrap();
        consumer = returned;
        let mut measured = Vec::new();
        for wait in waits {
            let took = arrived[&format!("{round} {wait}")]
                .saturating_duration_since(arrived[&format!("{round} control {wait}")]);
            measured.push((wait, took));
            let error = took.abs_diff(Duration::from_millis(wait));
            let kept = best.entry(wait).or_insert(error);
            *kept = (*kept).min(error);
        }
        eprintln!("ladder waits, round {round} (wanted ms, measured): {measured:?}");
        if waits.iter().all(|wait| best[wait] <= tolerance(*wait)) {
            return;
        }
    }
    for wait in waits {
        assert!(
            best[&wait] <= tolerance(wait),
            "a {wait} ms wait was off by {:?} at best",
            best[&wait]
        );
    }
}

/// Fifty requests naming fifty pools no pod serves: each is refused with its reason
/// and answered, and no work queue is declared for any of them. A pool a pod serves
/// is accepted, even when that pod runs no intake.
async fn requests_for_pools_nobody_serves_are_refused(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let gpu = env.start(env.pod().roles(common::WORKER_ONLY).pool("gpu"));
    let client = env.client().await;
    let watch = client.watch("pool-0").await.unwrap();
    for n in 0..50 {
        let mut request = echo_request(&format!("pool-{n}"), 2);
        request["queue"] = json!(format!("nobody-{n}"));
        publish_request(&env, &request).await;
    }
    let parked = wait_for_parked(&env, 50).await;
    assert!(
        parked.iter().all(|reason| reason.contains("unknown pool")),
        "{parked:?}"
    );
    match tokio::time::timeout(SOON, watch.event()).await.unwrap() {
        Err(taskmill::Error::Rejected { reason, .. }) => {
            assert!(reason.contains("unknown pool \"nobody-0\""), "{reason}")
        }
        other => panic!("a rejection, not {other:?}"),
    }
    for n in 0..50 {
        let id = format!("pool-{n}");
        assert!(env.store.job(&id).await.unwrap().is_none(), "{id}");
    }
    let mut request = echo_request("on-gpu", 3);
    request["queue"] = json!("gpu");
    publish_request(&env, &request).await;
    assert_eq!(env.wait_for_end("on-gpu", SOON).await.stage, "done");
    assert_still_serving(&env, &client, "after-pools").await;
    let work_queues: Vec<String> = env
        .queue_names()
        .into_iter()
        .filter(|name| name.starts_with(&format!("{}.work.", env.config.prefix)))
        .collect();
    assert_eq!(
        work_queues.len(),
        2,
        "default and gpu only: {work_queues:?}"
    );
    gpu.stop().await;
    pod.stop().await;
}

/// A job for a configured pool whose pods have not started yet waits, and says so in
/// `taskmill status`; once a pod serves the pool, the job runs and the note is gone.
async fn a_job_waiting_on_a_pool_nobody_consumes_says_so(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let mut config = env.config.clone();
    config.known_pools = vec!["later".to_owned()];
    let pod = env.start(env.pod().config(config));
    let mut request = echo_request("waits", 2);
    request["queue"] = json!("later");
    publish_request(&env, &request).await;
    common::wait_until(SOON, || async {
        env.store
            .job("waits")
            .await
            .unwrap()
            .is_some_and(|job| job.stage == "running")
    })
    .await;
    let silent = env
        .store
        .silent_pools(taskmill::known_pools::silent_since(chrono::Utc::now()))
        .await
        .unwrap();
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(
        (silent[0].name.as_str(), silent[0].last_seen_at),
        ("later", None)
    );
    let status = job_status_text(&env, "waits").await;
    assert!(
        status.contains("waiting  no pod has ever consumed pool \"later\""),
        "{status}"
    );

    let later = env.start(env.pod().roles(common::WORKER_ONLY).pool("later"));
    assert_eq!(env.wait_for_end("waits", SOON).await.stage, "done");
    assert!(!job_status_text(&env, "waits").await.contains("waiting"));
    later.stop().await;
    pod.stop().await;
}

/// Someone declared the pool's work queue with other arguments: the broker refuses
/// taskmill's declare (406 PRECONDITION_FAILED) and closes the channel. The request is
/// parked with the broker's reason, and the intake, on a new channel, goes on.
async fn a_queue_declared_with_other_arguments_parks_the_request(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let odd = env.topology().work_queue("odd");
    let connection = env.connection().await;
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = lapin::types::FieldTable::default();
    arguments.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(10));
    channel
        .queue_declare(
            odd.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    let mut config = env.config.clone();
    config.known_pools = vec!["odd".to_owned()];
    let pod = env.start(env.pod().config(config));
    let client = env.client().await;
    let mut request = echo_request("odd-queue", 2);
    request["queue"] = json!("odd");
    publish_request(&env, &request).await;
    let parked = wait_for_parked(&env, 1).await;
    assert!(
        parked[0].contains("PRECONDITION_FAILED") || parked[0].contains("inequivalent"),
        "the broker's reason: {}",
        parked[0]
    );
    let connection = env.connection().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(odd.as_str().into(), Default::default())
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    assert_still_serving(&env, &client, "after-odd").await;
    pod.stop().await;
}

/// The delay ladder's queues deleted under a running pod: a failing task's retry comes
/// back unroutable once, the ladder is declared again, and the retry goes through
/// instead of bouncing between the worker and its queue for ever.
async fn a_deleted_delay_queue_is_declared_again(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    assert_still_serving(&env, &client, "before-delete").await;
    let connection = env.connection().await;
    let channel = connection.create_channel().await.unwrap();
    for queue in env.topology().delay_queues() {
        channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    connection.close(200, "done".into()).await.unwrap();
    let request = json!({
        "version": 1,
        "job_id": "retried-after-delete",
        "job_type": builtin::FAIL,
        "tasks": [{ "times": 1 }],
        "retry_delay_ms": 100,
    });
    publish_request(&env, &request).await;
    let job = env.wait_for_end("retried-after-delete", SOON).await;
    assert_eq!((job.stage.as_str(), job.done_count), ("done", 1));
    assert_still_serving(&env, &client, "after-delete").await;
    pod.stop().await;
}

/// The job leaves `formation` while its intake is still storing it (the sweeper's
/// formation timeout; here a trigger fails it as task 100 is stored): the batch that
/// found it so is not stored, the intake stops and parks the request, the job ends
/// `failed`, and no task of it is left to run: each is done (it ran while the job was
/// forming, and is counted) or cancelled.
async fn a_job_failed_while_forming_stops_its_intake_and_its_tasks(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let trigger = match backend {
        Backend::Sqlite => vec![
            "CREATE TRIGGER formation_timeout AFTER INSERT ON tasks WHEN NEW.ordinal = 100 \
             BEGIN UPDATE jobs SET stage = 'failed' WHERE id = NEW.job_id; END",
        ],
        Backend::Postgres => vec![
            "CREATE FUNCTION formation_timeout() RETURNS trigger AS $$ BEGIN \
             IF NEW.ordinal = 100 THEN UPDATE jobs SET stage = 'failed' WHERE id = NEW.job_id; \
             END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER formation_timeout AFTER INSERT ON tasks \
             FOR EACH ROW EXECUTE FUNCTION formation_timeout()",
        ],
    };
    env.execute_sql(&trigger).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    publish_request(&env, &echo_request("cut-short", 2000)).await;
    let parked = wait_for_parked(&env, 1).await;
    assert!(parked[0].contains("left formation"), "{}", parked[0]);
    env.wait_for_end("cut-short", SOON).await;
    // What was published before the job failed reaches the workers and is not run.
    let queue = env.topology().work_queue("default");
    common::wait_until(SOON, || async { env.message_count(&queue).await == 0 }).await;
    let rows = env.store.tasks_of_job("cut-short").await.unwrap();
    assert!(
        !rows.is_empty() && rows.len() < 2000,
        "the intake stopped storing: {} rows",
        rows.len()
    );
    assert!(
        rows.iter().all(|row| row.ordinal < 100),
        "the batch that found the job failed stored nothing"
    );
    let done = rows.iter().filter(|row| row.status == "done").count() as i64;
    assert!(
        rows.iter()
            .all(|row| row.status == "done" || row.status == "cancelled"),
        "no task of the failed job is left to run"
    );
    let job = env.store.job("cut-short").await.unwrap().unwrap();
    assert_eq!(
        (job.stage.as_str(), job.done_count, job.failed_count),
        ("failed", done, 0)
    );
    assert_still_serving(&env, &client, "after-cut").await;
    pod.stop().await;
}

/// A job whose end the database refuses for good (here a trigger; in life a value
/// past a column's limit) fails with the database's reason, and the jobs whose
/// finished events share its completion batch end as they should.
async fn a_job_that_cannot_end_fails_alone(backend: Backend) {
    const JOBS: usize = 20;
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let refuse = match backend {
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse_done() RETURNS trigger AS $$ BEGIN \
             RAISE EXCEPTION 'refused by the test''s trigger'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_done BEFORE UPDATE ON jobs FOR EACH ROW \
             WHEN (NEW.id = 'cannot-end' AND NEW.stage = 'done') EXECUTE FUNCTION refuse_done()",
        ],
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_done BEFORE UPDATE ON jobs \
             WHEN NEW.id = 'cannot-end' AND NEW.stage = 'done' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test''s trigger'); END",
        ],
    };
    env.execute_sql(&refuse).await;
    let events = env.event_log().await;
    let client = env.client().await;
    // The burst waits for a pod that takes it all at once, so that the refused job's
    // finished event shares its batch with others.
    let first = env.start(env.pod());
    assert_still_serving(&env, &client, "before-burst").await;
    first.stop().await;
    for n in 0..JOBS {
        publish_request(&env, &echo_request(&format!("ends-{n}"), 2)).await;
        if n == JOBS / 2 {
            publish_request(&env, &echo_request("cannot-end", 2)).await;
        }
    }
    let pod = env.start(env.pod());
    for n in 0..JOBS {
        let job = env.wait_for_end(&format!("ends-{n}"), SOON).await;
        assert_eq!(job.stage, "done", "ends-{n}");
    }
    let refused = env.wait_for_end("cannot-end", SOON).await;
    assert_eq!(refused.stage, "failed");
    let reason = refused.first_error.unwrap_or_default();
    assert!(
        reason.contains("refused by the test's trigger"),
        "the database's reason: {reason}"
    );
    let all = events.wait_for(JOBS + 2, SOON).await;
    let failed: Vec<_> = all.iter().filter(|e| e.job_id == "cannot-end").collect();
    assert_eq!(failed.len(), 1, "one event for the refused job: {failed:?}");
    assert_eq!(failed[0].event, "job.failed");
    assert!(failed[0]
        .first_error
        .as_deref()
        .is_some_and(|error| error.contains("refused by the test's trigger")));
    assert_still_serving(&env, &client, "after-burst").await;
    pod.stop().await;
}

/// A plain AMQP producer's word count whose distinct words make a reduce input over
/// the payload cap (a few thousand words, one reduce shard, a cap of 64 KiB): the job
/// fails naming the reduce task and its size; nothing is parked or re-sent.
async fn a_word_count_too_large_for_its_shards_fails_saying_so(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let mut config = env.config.clone();
    config.max_payload_bytes = 64 * 1024;
    let pod = env.start(env.pod().config(config));
    let client = env.client().await;
    let texts: Vec<Value> = (0..40)
        .map(|file| {
            let words: Vec<String> = (0..400).map(|n| format!("word{file}x{n}")).collect();
            json!({ "text": words.join(" ") })
        })
        .collect();
    let request = json!({
        "version": 1,
        "job_id": "too-many-words",
        "job_type": builtin::WORDCOUNT,
        "tasks": texts,
        "reduce_shards": 1,
    });
    publish_request(&env, &request).await;
    let job = env.wait_for_end("too-many-words", SOON).await;
    assert_eq!(job.stage, "failed");
    let error = job.first_error.unwrap_or_default();
    assert!(
        error.contains("the input of reduce task 40 (shard 0 of 1)")
            && error.contains("over the cap of 65536 bytes"),
        "{error}"
    );
    assert_parked(&env, &[]).await;
    assert_still_serving(&env, &client, "after-words").await;
    pod.stop().await;
}

/// Jobs in parts whose producer sends a first part and never seals them: their tasks
/// run, then their feeders rest (no feed lease held), and other jobs go on.
async fn unsealed_jobs_in_parts_cost_nothing_while_they_wait(backend: Backend) {
    let _quiet = QUIET.read().await;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    for n in 0..50 {
        let request = json!({
            "version": 1,
            "job_id": format!("unsealed-{n}"),
            "job_type": builtin::ECHO,
            "part": { "number": 1, "offset": 0 },
            "tasks": [{ "n": n }],
        });
        publish_request(&env, &request).await;
    }
    common::wait_until(SOON, || async {
        let mut ran = 0;
        for n in 0..50 {
            let status = env
                .store
                .job_status(&format!("unsealed-{n}"))
                .await
                .unwrap();
            ran += usize::from(status.is_some_and(|s| s.tasks_by_status.get("done") == Some(&1)));
        }
        ran == 50
    })
    .await;
    common::wait_until(SOON, || async { env.live_leases("feed:").await == 0 }).await;
    assert_still_serving(&env, &client, "after-unsealed").await;
    pod.stop().await;
}

// ---------------------------------------------------------------- helpers

fn echo_request(job_id: &str, tasks: usize) -> Value {
    json!({
        "version": 1,
        "job_id": job_id,
        "job_type": builtin::ECHO,
        "tasks": (0..tasks).map(|n| json!({ "n": n })).collect::<Vec<_>>(),
    })
}

/// Publishes a request as any AMQP producer would: JSON to the jobs exchange.
async fn publish_request(env: &TestEnv, request: &Value) {
    let routing_key = request["job_type"].as_str().unwrap_or("x").to_owned();
    env.publish_raw(
        &env.topology().jobs_exchange(),
        &routing_key,
        &serde_json::to_vec(request).unwrap(),
        Some("application/json"),
    )
    .await;
}

/// A normal job completes within seconds and the intake queue drains.
async fn assert_still_serving(env: &TestEnv, client: &taskmill::Client, job_id: &str) {
    let mut request = JobRequest::new(builtin::ECHO, vec![json!(1), json!(2)]);
    request.job_id = Some(job_id.to_owned());
    let started = Instant::now();
    let watch = client.watch(job_id).await.unwrap();
    client.submit(request).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), watch.event())
        .await
        .unwrap_or_else(|_| panic!("job {job_id} did not complete within 10 s"))
        .unwrap();
    assert_eq!(event.event, "job.done", "{job_id}");
    eprintln!("{job_id} completed in {:?}", started.elapsed());
    let intake = env.topology().intake_queue();
    common::wait_until(SOON, || async { env.message_count(&intake).await == 0 }).await;
    assert_queue_bound(env).await;
}

/// Waits for `count` parked messages; returns their reasons.
async fn wait_for_parked(env: &TestEnv, count: usize) -> Vec<String> {
    let parking = env.topology().parking_queue();
    common::wait_until(SOON, || async {
        env.message_count(&parking).await >= count as u32
    })
    .await;
    let parked = env.drain_queue(&parking).await;
    assert_eq!(parked.len(), count, "exactly {count} parked");
    parked
        .into_iter()
        .map(|(_, reason)| reason.expect("a parked message has a reason"))
        .collect()
}

async fn assert_parked(env: &TestEnv, reasons: &[&str]) {
    let parked = env.drain_queue(&env.topology().parking_queue()).await;
    assert_eq!(parked.len(), reasons.len(), "parked: {parked:?}");
}

/// The queues a deployment holds: the core three and the delay ladder, one work queue
/// per pool served (`default`, or one a pod registered), and the watch queues of
/// waiting clients — nothing a producer named.
async fn assert_queue_bound(env: &TestEnv) {
    let prefix = env.config.prefix.clone();
    let mut fixed = Vec::new();
    for name in env.queue_names() {
        if let Some(pool) = name.strip_prefix(&format!("{prefix}.work.")) {
            let served = pool == "default" || env.store.pool(pool).await.unwrap().is_some();
            assert!(served, "a work queue for a pool nobody serves: {name}");
        } else if name.starts_with(&format!("{prefix}."))
            && !name.starts_with(&format!("{prefix}.watch."))
        {
            fixed.push(name);
        }
    }
    // The intake, completion and parking queues, and the delay ladder.
    let bound = Topology::new(&prefix, env.config.queue_type)
        .fixed_queues()
        .len();
    assert!(
        fixed.len() <= bound,
        "{} queues, more than the bound of {bound}: {fixed:?}",
        fixed.len()
    );
}

/// What `taskmill status` prints for a job.
async fn job_status_text(env: &TestEnv, job_id: &str) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmill"))
        .args(["status", job_id])
        .env("DATABASE_URL", &env.config.database_url)
        .output()
        .await
        .expect("taskmill status runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}
