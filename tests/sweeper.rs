//! The sweeper and the parking-lot tools, in-process, on SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use lapin::options::QueuePurgeOptions;
use serde_json::json;
use taskmill::amqp::parking;
use taskmill::store::{NewTask, StartOutcome, Store, TaskOutcome, Transition};
use taskmill::{builtin, FailurePolicy, JobEvent, JobRequest, TaskContext};

use common::{echo_job, echo_tasks, Backend, TestEnv, LONG};

on_both_backends!(
    purged_task_messages_are_swept_back,
    lost_finished_events_are_swept_back,
    stale_formation_fails_the_job,
    a_job_that_cannot_end_holds_back_no_sweep,
    an_orphan_behind_a_hundred_fed_jobs_is_found,
    parking_lot_lists_replays_and_purges,
    tasks_finished_while_forming_end_the_job_at_start,
    two_outcomes_of_one_attempt_in_a_batch_count_once,
    a_batch_claim_that_fails_claims_nothing,
    a_lost_retry_is_resent_into_a_backlog,
);

/// Inserts the rows of a forming job; their `(id, ordinal)` in ordinal order.
async fn insert_rows(store: &Store, job_id: &str, tasks: &[NewTask]) -> Vec<(i64, i32)> {
    assert!(store.insert_tasks(job_id, tasks).await.unwrap());
    let mut rows: Vec<(i64, i32)> = store
        .tasks_of_job(job_id)
        .await
        .unwrap()
        .iter()
        .map(|row| (row.id, row.ordinal))
        .collect();
    rows.sort_by_key(|&(_, ordinal)| ordinal);
    rows
}

/// A config whose sweeper runs often and calls work stuck quickly.
fn eager_sweeper(env: &TestEnv) -> taskmill::Config {
    let mut config = env.config.clone();
    config.sweep_interval = Duration::from_millis(300);
    config.stuck_after = Duration::from_secs(1);
    config
}

async fn purge(env: &TestEnv, queue: &str) -> u32 {
    let connection = env.connection().await;
    let channel = connection.create_channel().await.unwrap();
    let purged = channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    purged
}

async fn purged_task_messages_are_swept_back(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let intake = env.start(env.pod().roles(common::INTAKE_ONLY));
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new(
            builtin::ECHO,
            (0..200).map(|n| json!(n)).collect(),
        ))
        .await
        .unwrap();
    common::wait_until(LONG, || async {
        env.store
            .job(&job_id)
            .await
            .unwrap()
            .is_some_and(|j| j.tasks_published)
    })
    .await;
    // An operator's purge: every task message is gone, the rows say pending.
    let purged = purge(&env, &env.topology().work_queue("default")).await;
    assert_eq!(purged, 200);
    let rest = env.start(
        env.pod()
            .config(eager_sweeper(&env))
            .roles(common::NO_INTAKE),
    );
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!((job.stage.as_str(), job.done_count), ("done", 200));
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert!(
        rows.iter().all(|row| row.attempts == 1),
        "a re-published task is still attempt 1"
    );
    intake.stop().await;
    rest.stop().await;
}

/// A job of one stage ends in the transaction that records its last task, so its
/// tasks send no finished event; a multi-stage job whose phase is over needs one, for
/// the completion role makes its next phase. Those events lost, the sweeper's check of
/// quiet jobs moves the job on.
async fn lost_finished_events_are_swept_back(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let first = env.start(env.pod().roles(common::INTAKE_AND_WORKER));
    let client = env.client().await;
    let mut request = JobRequest::new(builtin::WORDCOUNT, vec![]);
    request.tasks = None;
    let texts: Vec<String> = (0..50).map(|n| format!("word{} common", n % 7)).collect();
    request.params = json!({ "texts": texts });
    let job_id = client.submit(request).await.unwrap();
    common::wait_until(LONG, || async {
        env.store
            .job_status(&job_id)
            .await
            .unwrap()
            .is_some_and(|s| s.tasks_by_status.get("done") == Some(&50))
    })
    .await;
    let purged = purge(&env, &env.topology().completion_queue()).await;
    assert!(
        purged > 0,
        "the map phase's finished events (one message per batch of tasks) were purged"
    );
    let rest = env.start(
        env.pod()
            .config(eager_sweeper(&env))
            .roles(common::COMPLETION_AND_SWEEPER),
    );
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!(job.stage.as_str(), "done");
    let result = job.result.expect("the word count's result");
    assert_eq!(result["counts"]["common"], json!(50), "{result}");
    let ended: Vec<JobEvent> = events
        .wait_for(1, LONG)
        .await
        .into_iter()
        .filter(|event| event.event != "job.stage")
        .collect();
    assert_eq!(ended.len(), 1);
    first.stop().await;
    rest.stop().await;
}

async fn stale_formation_fails_the_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    // An intake that died mid-formation, its request lost: a job row and no more.
    let new = echo_job("half-formed", FailurePolicy::Continue);
    assert!(env.store.create_job(&new).await.unwrap().is_none());
    let mut config = eager_sweeper(&env);
    config.formation_timeout = Duration::from_millis(500);
    let pod = env.start(env.pod().config(config).roles(common::SWEEPER_ONLY));
    let job = env.wait_for_end("half-formed", LONG).await;
    assert_eq!(job.stage, "failed");
    assert!(job.first_error.unwrap().contains("did not finish forming"));
    let all = events.wait_for(1, LONG).await;
    assert_eq!((all.len(), all[0].event.as_str()), (1, "job.failed"));
    pod.stop().await;
}

/// A quiet job whose end the database refuses for good, failed or done alike, is
/// left for a later sweep: the rest of the sweep (here a stale formation) goes on.
async fn a_job_that_cannot_end_holds_back_no_sweep(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = &env.store;
    store
        .create_job(&echo_job("cannot-end", FailurePolicy::FailFast))
        .await
        .unwrap();
    let tasks = echo_tasks(0, 1);
    insert_rows(store, "cannot-end", &tasks).await;
    assert!(matches!(
        store.start_job("cannot-end", 1).await.unwrap(),
        StartOutcome::Running(_)
    ));
    let refuse = match backend {
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse_end() RETURNS trigger AS $$ BEGIN \
             RAISE EXCEPTION 'refused by the test''s trigger'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_end BEFORE UPDATE ON jobs FOR EACH ROW \
             WHEN (NEW.id = 'cannot-end' AND NEW.stage <> 'running') EXECUTE FUNCTION refuse_end()",
        ],
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_end BEFORE UPDATE ON jobs \
             WHEN NEW.id = 'cannot-end' AND NEW.stage <> 'running' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test''s trigger'); END",
        ],
    };
    env.execute_sql(&refuse).await;
    let task_id = store.tasks_of_job("cannot-end").await.unwrap()[0].id;
    let claimed = store
        .claim_tasks(&[(task_id, 1, 1)], "token", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let done = Transition {
        job_id: "cannot-end".into(),
        task_id,
        attempt: 1,
        run: 1,
        outcome: TaskOutcome::Done(json!("ok")),
    };
    assert_eq!(store.finish_tasks(&[done]).await.unwrap().ids.len(), 1);
    // Its finished event lost, the job is the sweeper's; so is a stale formation.
    assert!(store
        .create_job(&echo_job("half-formed", FailurePolicy::Continue))
        .await
        .unwrap()
        .is_none());
    let mut config = eager_sweeper(&env);
    config.formation_timeout = Duration::from_millis(500);
    // Both are due at the first sweep.
    tokio::time::sleep(config.stuck_after + Duration::from_millis(100)).await;
    let pod = env.start(env.pod().config(config).roles(common::SWEEPER_ONLY));
    let job = env.wait_for_end("half-formed", LONG).await;
    assert_eq!(job.stage, "failed");
    let stuck = store.job("cannot-end").await.unwrap().unwrap();
    assert_eq!(stuck.stage, "running", "its end is still refused");
    pod.stop().await;
}

/// The orphan scan looks at 100 jobs at a time: a hundred jobs whose feeders are alive
/// elsewhere (their leases live) hide no orphan behind them.
async fn an_orphan_behind_a_hundred_fed_jobs_is_found(backend: Backend) {
    const FED: usize = 100;
    let env = TestEnv::new(backend).await;
    let store = &env.store;
    let tasks = echo_tasks(0, 1);
    for n in 0..=FED {
        let job_id = format!("job-{n:03}");
        store
            .create_job(&echo_job(&job_id, FailurePolicy::FailFast))
            .await
            .unwrap();
        insert_rows(store, &job_id, &tasks).await;
        assert!(matches!(
            store.start_job(&job_id, 1).await.unwrap(),
            StartOutcome::Running(_)
        ));
        if n < FED {
            let lease = format!("feed:{job_id}");
            assert!(store
                .acquire_lease(&lease, "a feeder elsewhere", LONG * 10)
                .await
                .unwrap());
        }
    }
    // The scan leaves a job alone for its first 5 s (its own former may feed it).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let pod = env.start(env.pod());
    let orphan = format!("job-{FED:03}");
    let job = env.wait_for_end(&orphan, LONG).await;
    assert_eq!(job.stage, "done");
    let fed = store.job("job-000").await.unwrap().unwrap();
    assert_eq!(
        (fed.stage.as_str(), fed.tasks_published),
        ("running", false),
        "a job whose feeder lives is left to it"
    );
    pod.stop().await;
}

/// The intake publishes task messages while it still forms a large job, so every task
/// can finish before the job is `running`: their finished events find it not running,
/// and starting the job must end it.
async fn tasks_finished_while_forming_end_the_job_at_start(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = &env.store;
    let new = echo_job("fast-job", FailurePolicy::FailFast);
    store.create_job(&new).await.unwrap();
    let tasks = echo_tasks(0, 3);
    assert!(store.insert_tasks("fast-job", &tasks).await.unwrap());
    assert!(store.insert_tasks("fast-job", &tasks).await.unwrap());
    let inserted: Vec<i64> = store
        .tasks_of_job("fast-job")
        .await
        .unwrap()
        .iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(inserted.len(), 3, "a resumed insert adds nothing");
    let claims: Vec<(i64, i32, i32)> = inserted.iter().map(|&id| (id, 1, 1)).collect();
    assert_eq!(
        store
            .claim_tasks(&claims, "token", Duration::from_secs(60))
            .await
            .unwrap()
            .len(),
        3
    );
    let transitions: Vec<Transition> = inserted
        .iter()
        .map(|&task_id| Transition {
            job_id: "fast-job".into(),
            task_id,
            attempt: 1,
            run: 1,
            outcome: TaskOutcome::Done(json!("ok")),
        })
        .collect();
    assert_eq!(store.finish_tasks(&transitions).await.unwrap().ids.len(), 3);
    assert!(
        store
            .finish_tasks(&transitions)
            .await
            .unwrap()
            .ids
            .is_empty(),
        "a duplicate records nothing"
    );
    assert!(
        store
            .check_jobs(&["fast-job".to_owned()])
            .await
            .unwrap()
            .ended
            .is_empty(),
        "a forming job is not checked"
    );
    match store.start_job("fast-job", 3).await.unwrap() {
        StartOutcome::Ended(event) => assert_eq!(event.kind, "job.done"),
        other => panic!("the job should have ended at start: {other:?}"),
    }
    let job = store.job("fast-job").await.unwrap().unwrap();
    assert_eq!(
        (job.stage.as_str(), job.done_count, job.task_count),
        ("done", 3, 3)
    );
    assert!(
        !store
            .insert_tasks("fast-job", &echo_tasks(0, 4))
            .await
            .unwrap(),
        "no task row goes into a job that left formation"
    );
    assert_eq!(store.tasks_of_job("fast-job").await.unwrap().len(), 3);
}

/// A redelivery can take over an attempt whose first copy is still running, and both
/// copies' outcomes can land in one batch — even different ones. The row moves once,
/// to the first outcome, and the job counts exactly that.
async fn two_outcomes_of_one_attempt_in_a_batch_count_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = &env.store;
    store
        .create_job(&echo_job("twice", FailurePolicy::Continue))
        .await
        .unwrap();
    let tasks = echo_tasks(0, 2);
    let inserted = insert_rows(store, "twice", &tasks).await;
    assert!(matches!(
        store.start_job("twice", 2).await.unwrap(),
        StartOutcome::Running(_)
    ));
    let claims: Vec<(i64, i32, i32)> = inserted.iter().map(|&(id, _)| (id, 1, 1)).collect();
    store
        .claim_tasks(&claims, "token", Duration::from_secs(60))
        .await
        .unwrap();
    let (first, second) = (inserted[0].0, inserted[1].0);
    let outcome = |task_id, outcome| Transition {
        job_id: "twice".into(),
        task_id,
        attempt: 1,
        run: 1,
        outcome,
    };
    let recorded = store
        .finish_tasks(&[
            outcome(first, TaskOutcome::Done(json!("ok"))),
            outcome(first, TaskOutcome::Failed("second copy failed".into())),
            outcome(second, TaskOutcome::Done(json!("ok"))),
        ])
        .await
        .unwrap();
    assert_eq!(recorded.ids.len(), 2);
    let row = store.task(first).await.unwrap().unwrap();
    assert_eq!(row.status, "done");
    let job = store.job("twice").await.unwrap().unwrap();
    assert_eq!((job.done_count, job.failed_count), (2, 0));
}

/// A batch claim spanning two attempt numbers takes two statements. When the second
/// fails, the first must not stay applied: its tasks would look running, claimed by a
/// token nobody holds, until their lease ran out.
async fn a_batch_claim_that_fails_claims_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = &env.store;
    store
        .create_job(&echo_job("split-claim", FailurePolicy::Continue))
        .await
        .unwrap();
    let inserted = insert_rows(store, "split-claim", &echo_tasks(0, 2)).await;
    store.start_job("split-claim", 2).await.unwrap();
    let (fresh, retried) = (inserted[0].0, inserted[1].0);
    let lease = Duration::from_secs(60);
    store
        .claim_tasks(&[(retried, 1, 1)], "first", lease)
        .await
        .unwrap();
    store
        .finish_tasks(&[Transition {
            job_id: "split-claim".into(),
            task_id: retried,
            attempt: 1,
            run: 1,
            outcome: TaskOutcome::Retrying("once more".into()),
        }])
        .await
        .unwrap();
    // The database refuses every claim of a second attempt.
    let trigger = match backend {
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_second BEFORE UPDATE ON tasks WHEN NEW.attempts = 2 \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        ],
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse_second() RETURNS trigger AS $$ BEGIN \
             IF NEW.attempts = 2 THEN RAISE EXCEPTION 'injected failure'; END IF; \
             RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_second BEFORE UPDATE ON tasks \
             FOR EACH ROW EXECUTE FUNCTION refuse_second()",
        ],
    };
    env.execute_sql(&trigger).await;

    let claimed = store
        .claim_tasks(&[(fresh, 1, 1), (retried, 2, 1)], "batch", lease)
        .await;
    assert!(claimed.is_err(), "the second statement fails: {claimed:?}");
    let row = store.task(fresh).await.unwrap().unwrap();
    assert_eq!(
        (row.status.as_str(), row.claimed_by.as_deref()),
        ("pending", None),
        "the first statement's claim was rolled back"
    );
    // The worker then claims one by one, under the same token.
    let claim = store
        .claim_task(fresh, 1, 1, "batch", false, lease)
        .await
        .unwrap()
        .expect("the fresh task is claimable at once");
    assert_eq!((claim.starts, claim.taken_over), (1, false));
}

/// A retry lost in the delay ladder (a deleted queue, at-most-once dead-lettering)
/// leaves a `retrying` row and no message. Once its wait and `stuck_after` are over,
/// the sweeper sends attempt 2 again — even though the pool has a backlog, which would
/// hide a lost pending task but cannot hide a lost retry.
async fn a_lost_retry_is_resent_into_a_backlog(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let store = &env.store;
    store
        .create_job(&echo_job("lost-retry", FailurePolicy::Continue))
        .await
        .unwrap();
    let inserted = insert_rows(store, "lost-retry", &echo_tasks(0, 1)).await;
    store.start_job("lost-retry", 1).await.unwrap();
    let task_id = inserted[0].0;
    store
        .claim_tasks(&[(task_id, 1, 1)], "token", Duration::from_secs(60))
        .await
        .unwrap();
    store
        .finish_tasks(&[Transition {
            job_id: "lost-retry".into(),
            task_id,
            attempt: 1,
            run: 1,
            outcome: TaskOutcome::Retrying("first try failed".into()),
        }])
        .await
        .unwrap();
    let before = store.task(task_id).await.unwrap().unwrap();
    let queue = env.topology().work_queue("default");
    for _ in 0..5 {
        env.publish_raw("", &queue, b"backlog", None).await;
    }
    let sweeper = env.start(
        env.pod()
            .config(eager_sweeper(&env))
            .roles(common::SWEEPER_ONLY),
    );
    common::wait_until(LONG, || async { env.message_count(&queue).await == 6 }).await;
    sweeper.stop().await;
    let messages = env.drain_queue(&queue).await;
    let resent: Vec<taskmill::protocol::TaskMessage> = messages
        .iter()
        .filter_map(|(body, _)| serde_json::from_slice(body).ok())
        .collect();
    assert_eq!(resent.len(), 1, "one retry re-sent behind the backlog");
    assert_eq!((resent[0].task_id, resent[0].attempt), (task_id, 2));
    let after = store.task(task_id).await.unwrap().unwrap();
    assert_eq!(after.status, "retrying");
    assert!(
        after.version > before.version,
        "the re-send was claimed with a compare-and-set on the version"
    );
}

async fn parking_lot_lists_replays_and_purges(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let topology = env.topology();
    // A pod that does not know task type "late" yet: both requests are parked.
    let early = env.start(env.pod());
    let client = env.client().await;
    let first = client
        .submit(JobRequest::new("late", vec![json!(1)]))
        .await
        .unwrap();
    let second = client
        .submit(JobRequest::new("late", vec![json!(2)]))
        .await
        .unwrap();
    let connection = env.connection().await;
    let parked = common::wait_for_value(LONG, || async {
        let parked = parking::list(&connection, &topology, usize::MAX)
            .await
            .unwrap();
        (parked.len() == 2).then_some(parked)
    })
    .await;
    assert!(parked
        .iter()
        .all(|p| p.reason.contains("unknown task type \"late\"") && p.source_queue == "tm.intake"));
    // Listing removed nothing.
    assert_eq!(
        parking::list(&connection, &topology, usize::MAX)
            .await
            .unwrap()
            .len(),
        2
    );
    early.stop().await;

    // Deploy a pod that knows "late", replay one by id, then the rest.
    let late = env.start(
        env.pod()
            .handler("late", |ctx: TaskContext| async move { Ok(ctx.payload) }),
    );
    let first_id = parked
        .iter()
        .find(|p| p.body_preview.contains(&first))
        .unwrap()
        .id
        .clone();
    assert_eq!(
        parking::replay(&connection, &topology, Some(&[first_id]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(client.wait(&first).await.unwrap().event, "job.done");
    assert_eq!(
        parking::list(&connection, &topology, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        parking::replay(&connection, &topology, None).await.unwrap(),
        1
    );
    assert_eq!(client.wait(&second).await.unwrap().event, "job.done");

    // Purge empties it.
    client
        .submit(JobRequest::new("never.known", vec![json!(1)]))
        .await
        .unwrap();
    common::wait_for_value(LONG, || async {
        (parking::list(&connection, &topology, usize::MAX)
            .await
            .unwrap()
            .len()
            == 1)
            .then_some(())
    })
    .await;
    assert_eq!(parking::purge(&connection, &topology).await.unwrap(), 1);
    assert!(parking::list(&connection, &topology, usize::MAX)
        .await
        .unwrap()
        .is_empty());
    late.stop().await;
}
