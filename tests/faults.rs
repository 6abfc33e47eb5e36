//! The fault-injection suite: real `taskmill worker` processes against the real broker
//! and database, faults injected for real (kill -9, broker restart, database restart,
//! rolling SIGTERM, a purged queue, a flood of bad input, an intake killed between the
//! parts of a job, a request relay killed between its publish and its delete, the only pod killed while
//! jobs wait for their time, the pods firing an every-second schedule killed), then the same invariants
//! checked every time:
//!
//! - every job ends in the expected stage, and every task row is terminal;
//! - per-job counts match the rows;
//! - exactly one job event per job reached the events exchange;
//! - the parking lot holds exactly what was sent there on purpose;
//! - no queue is left with messages.
//!
//! The scenarios share the machine's RabbitMQ and PostgreSQL and restart them, so they
//! run one at a time (a lock below), and every service a test stops is started again by
//! a guard, even when the test fails.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::seq::IndexedRandom;
use rand::{Rng, RngCore};
use sea_orm::{Database, TransactionTrait};
use serde_json::json;
use taskmill::{builtin, JobRequest};
use tokio::process::{Child, Command};

use common::{Backend, TestEnv};

/// Fault scenarios restart shared services: never two at once.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

/// The task type of [`poison_pod`]: sleeps `ms`, or aborts the process if `abort`.
const POISON: &str = "test.poison";
/// Set for the child processes that run [`poison_pod`].
const POISON_POD: &str = "TASKMILL_TEST_POISON_POD";

on_both_backends!(
    kill_9_workers_during_a_job,
    rabbitmq_restart_during_a_job,
    rolling_sigterm_runs_nothing_twice,
    purged_work_queue_is_swept_back,
    bad_input_flood_is_parked,
    closed_connections_are_ridden_out,
    a_poison_task_fails_alone,
    a_killed_feeder_is_taken_over,
    an_intake_killed_between_parts,
    a_killed_cleaner_leaves_no_half_removed_job,
    a_relay_killed_between_publish_and_delete,
    scheduled_jobs_outlive_a_killed_pod,
    every_tick_fires_once_across_killed_pods,
);

mod postgres_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_restart_during_a_job() {
        super::postgres_restart_during_a_job(super::Backend::Postgres).await
    }
}

// ---------------------------------------------------------------- scenarios

async fn kill_9_workers_during_a_job(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let (env, audit, mut fleet) = setup(backend, &[]).await;
    let job_id = sleep_job(&env, 3000, 40).await;

    let mut kills = 0;
    let mut rng = rand::rng();
    while !job_ended(&env, &job_id).await {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2000))).await;
        let victim = rng.random_range(0..fleet.len());
        fleet.kill_9(victim).await;
        fleet.restart(victim);
        kills += 1;
    }
    let report = check_invariants(&env, &[(job_id.as_str(), "done")], &audit, 0).await;
    fleet.stop_all().await;
    eprintln!("kill -9: 3000 tasks, {kills} kills, {report}");
    assert!(kills >= 2, "the job ended before the faults could matter");
}

async fn rabbitmq_restart_during_a_job(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let (env, audit, mut fleet) = setup(backend, &[]).await;
    let client = env.client().await;
    let first = client
        .submit(JobRequest::new(
            builtin::SLEEP,
            (0..3000).map(|_| json!({ "ms": 10 })).collect(),
        ))
        .await
        .unwrap();
    wait_for_progress(&env, &first, 600).await;

    let broker = stop_rabbitmq().await;
    // A producer connected before the outage submits during it: it must get through.
    let second = tokio::spawn(async move {
        let id = client
            .submit(JobRequest::new(
                builtin::ECHO,
                (0..500).map(|n| json!(n)).collect(),
            ))
            .await
            .expect("submit retries until the broker is back");
        (client, id)
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.start().await;
    let (client, second) = second.await.unwrap();

    let report = check_invariants(
        &env,
        &[(first.as_str(), "done"), (second.as_str(), "done")],
        &audit,
        0,
    )
    .await;
    assert_eq!(fleet.alive(), 3, "every worker rode out the outage");
    fleet.stop_all().await;
    client.close().await.unwrap();
    eprintln!("RabbitMQ restart: jobs of 3000 + 500 tasks, {report}");
}

async fn postgres_restart_during_a_job(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let (env, audit, mut fleet) = setup(backend, &[]).await;
    let job_id = sleep_job(&env, 3000, 10).await;
    wait_for_progress(&env, &job_id, 600).await;

    let database = stop_postgres().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    database.start().await;

    let report = check_invariants(&env, &[(job_id.as_str(), "done")], &audit, 0).await;
    assert_eq!(fleet.alive(), 3, "every worker rode out the outage");
    fleet.stop_all().await;
    eprintln!("PostgreSQL restart: 3000 tasks, {report}");
}

async fn rolling_sigterm_runs_nothing_twice(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let (env, audit, mut fleet) = setup(backend, &[]).await;
    let job_id = sleep_job(&env, 2000, 20).await;
    wait_for_progress(&env, &job_id, 100).await;

    for pod in 0..fleet.len() {
        let status = fleet.sigterm(pod).await;
        assert!(status.success(), "pod {pod} exits 0 on SIGTERM: {status}");
        fleet.restart(pod);
        // The replacement consumes before the next pod goes: three pods at all times.
        let queue = env.topology().work_queue("default");
        common::wait_until(JOB_TIMEOUT, || async {
            env.consumer_count(&queue).await == 3
        })
        .await;
    }

    let report = check_invariants(&env, &[(job_id.as_str(), "done")], &audit, 0).await;
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    // Every handler run is preceded by exactly one successful claim, and each claim
    // bumps `deliveries`: their sum counts handler executions.
    let executions: i64 = rows.iter().map(|row| i64::from(row.deliveries)).sum();
    assert_eq!(executions, 2000, "a rolling deploy ran no task twice");
    assert!(rows.iter().all(|row| row.attempts == 1));
    fleet.stop_all().await;
    eprintln!(
        "rolling SIGTERM: 2000 tasks, 3 pods replaced, {executions} handler executions, {report}"
    );
}

async fn purged_work_queue_is_swept_back(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let (env, audit, mut fleet) = setup(backend, &[]).await;
    let job_id = sleep_job(&env, 2000, 5).await;
    wait_for_progress(&env, &job_id, 300).await;

    let connection = env.connection().await;
    let channel = connection.create_channel().await.unwrap();
    let purged = channel
        .queue_purge(
            env.topology().work_queue("default").as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();

    let report = check_invariants(&env, &[(job_id.as_str(), "done")], &audit, 0).await;
    fleet.stop_all().await;
    eprintln!("purge: 2000 tasks, {purged} task messages purged mid-job, {report}");
    assert!(purged > 0, "the purge hit queued task messages");
}

async fn bad_input_flood_is_parked(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let (env, audit, mut fleet) = setup(backend, &["--max-request-bytes", "65536"]).await;
    let job_id = env
        .submit(
            builtin::ECHO,
            (0..1000).map(|n| json!({ "n": n })).collect(),
        )
        .await;

    let topology = env.topology();
    // The workers may not have declared the work queue yet: declared as they declare
    // it (its queue type included), or the first of them to do so would be refused.
    // Its binding needs the delay ladder's exchanges.
    let connection = env.connection().await;
    let channel = connection.create_channel().await.unwrap();
    topology.declare_delay_ladder(&channel).await.unwrap();
    topology
        .declare_work_queue(&channel, "default")
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    let targets = [
        (topology.jobs_exchange(), "bad.request".to_owned()),
        (String::new(), topology.work_queue("default")),
        (String::new(), topology.completion_queue()),
    ];
    let mut rng = rand::rng();
    let valid =
        serde_json::to_vec(&JobRequest::new(builtin::ECHO, vec![json!(1), json!(2)])).unwrap();
    let connection = env.connection().await;
    let publisher = taskmill::amqp::broker::Publisher::open(&connection)
        .await
        .unwrap();
    let mut pending = Vec::new();
    for n in 0..1000 {
        let (body, content_type): (Vec<u8>, Option<&str>) = match n % 5 {
            0 => {
                let mut noise = vec![0u8; rng.random_range(1..512)];
                rng.fill_bytes(&mut noise);
                (noise, Some("application/json"))
            }
            1 => (
                valid[..rng.random_range(1..valid.len() - 1)].to_vec(),
                Some("application/json"),
            ),
            2 => (vec![b' '; 70_000], Some("application/json")),
            3 => (
                valid.clone(),
                Some(
                    *["text/plain", "application/xml", "image/png"]
                        .choose(&mut rng)
                        .unwrap(),
                ),
            ),
            _ => (br#"{"version": 99, "job_type": "x"}"#.to_vec(), None),
        };
        let (exchange, routing_key) = &targets[n % targets.len()];
        let mut properties = lapin::BasicProperties::default();
        if let Some(kind) = content_type {
            properties = properties.with_content_type(kind.into());
        }
        let message = taskmill::amqp::broker::Outgoing {
            exchange,
            routing_key,
            body: &body,
            mandatory: true,
            headers: None,
        };
        pending.push(publisher.send_with(message, properties).await.unwrap());
    }
    taskmill::amqp::broker::all_confirmed(pending)
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();

    let report = check_invariants(&env, &[(job_id.as_str(), "done")], &audit, 1000).await;
    assert_eq!(fleet.alive(), 3, "no worker crashed");
    fleet.stop_all().await;
    eprintln!("bad input: 1000-task job with 1000 bad messages mixed in, {report}");
}

/// The broker closes every connection (`rabbitmqctl close_all_connections`) while
/// three `taskmill submit --wait` producers and the workers run: every producer still
/// gets its event and exits 0, and every worker carries on.
async fn closed_connections_are_ridden_out(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let (env, audit, mut fleet) = setup(backend, &[]).await;
    let tasks = std::env::temp_dir().join(format!("{}-tasks.jsonl", env.name));
    std::fs::write(&tasks, "{\"ms\": 20}\n".repeat(1000)).unwrap();
    let ids: Vec<String> = (0..3).map(|n| format!("waited-{n}")).collect();
    let mut producers: Vec<Child> = ids
        .iter()
        .map(|id| {
            Command::new(env!("CARGO_BIN_EXE_taskmill"))
                .args(["submit", "--type", builtin::SLEEP, "--wait", "--job-id", id])
                .arg("--tasks-file")
                .arg(&tasks)
                .envs(fleet.vars.iter().cloned())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("taskmill submit starts")
        })
        .collect();
    wait_for_progress(&env, &ids[0], 100).await;

    run(
        "rabbitmqctl",
        &["close_all_connections", "-p", &env.name, "a fault test"],
    );
    for (id, producer) in ids.iter().zip(producers.iter_mut()) {
        let status = tokio::time::timeout(JOB_TIMEOUT, producer.wait())
            .await
            .expect("the producer gets its event")
            .unwrap();
        assert!(status.success(), "submit --wait of {id} exits 0: {status}");
    }
    let jobs: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "done")).collect();
    let report = check_invariants(&env, &jobs, &audit, 0).await;
    assert_eq!(
        fleet.alive(),
        3,
        "every worker rode out the closed connections"
    );
    fleet.stop_all().await;
    let _ = std::fs::remove_file(&tasks);
    eprintln!("closed connections: 3 waiting producers, 3 jobs of 1000 tasks, {report}");
}

/// A task that aborts its process, among 31 neighbours on one pod of 32 slots,
/// restarted whenever it dies (as an orchestrator would): each crash takes down the
/// neighbours running beside it, yet only the poison task fails — once it was started
/// more than `max_starts` (5) times — and every neighbour is done.
async fn a_poison_task_fails_alone(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(backend).await;
    let audit = env.audit_events().await;
    let mut fleet = Fleet::poison_pods(&env).await;
    let mut tasks: Vec<serde_json::Value> = (0..31).map(|_| json!({ "ms": 500 })).collect();
    tasks.insert(13, json!({ "abort": true }));
    let mut request = JobRequest::new(POISON, tasks);
    request.on_failure = taskmill::FailurePolicy::Continue;
    let client = env.client().await;
    let job_id = client.submit(request).await.unwrap();
    client.close().await.unwrap();

    let started = Instant::now();
    let mut crashes = 0;
    while !job_ended(&env, &job_id).await {
        assert!(started.elapsed() < JOB_TIMEOUT, "the job ends");
        if fleet.alive() == 0 {
            crashes += 1;
            fleet.restart(0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = check_invariants(&env, &[(job_id.as_str(), "failed")], &audit, 0).await;
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    let failed: Vec<_> = rows.iter().filter(|row| row.status == "failed").collect();
    assert_eq!(failed.len(), 1, "only the poison task fails: {failed:?}");
    assert_eq!(failed[0].ordinal, 13);
    assert!(
        failed[0]
            .info
            .as_deref()
            .is_some_and(|error| error.contains("keeps killing its worker")),
        "{:?}",
        failed[0].info
    );
    assert_eq!(rows.iter().filter(|row| row.status == "done").count(), 31);
    fleet.stop_all().await;
    eprintln!("poison task: {crashes} crashes, 31 neighbours done, {report}");
}

/// Not a scenario: the pod of [`a_poison_task_fails_alone`], run as a child process
/// (this test binary again) because one of its handlers aborts the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by a_poison_task_fails_alone"]
async fn poison_pod() {
    if std::env::var_os(POISON_POD).is_none() {
        return;
    }
    let mut config = taskmill::Config::from_env().unwrap();
    config.grace_period = Duration::from_secs(5);
    config.sweep_interval = Duration::from_secs(1);
    config.stuck_after = Duration::from_secs(3);
    let shutdown = taskmill::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        term.recv().await;
        stop.cancel();
    });
    taskmill::Pod::builder()
        .config(config)
        .handler(POISON, |ctx: taskmill::TaskContext| async move {
            if ctx.payload["abort"] == json!(true) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::process::abort();
            }
            let ms = ctx.payload["ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!(null))
        })
        .build()
        .run(shutdown)
        .await
        .unwrap();
}

/// A cleaner killed -9 half-way through a removal: on SQLite while it deletes a job
/// too big for one transaction a batch at a time, on PostgreSQL while it deletes the
/// jobs of a detached partition (slowed by a trigger, so that the kill lands there).
/// Every job is then whole, gone, or in the removal under way; the next cleaner
/// finishes it, and what the retention keeps is untouched.
async fn a_killed_cleaner_leaves_no_half_removed_job(backend: Backend) {
    const BIG: i64 = 10 * taskmill::retention::TASK_BATCH as i64;
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(backend).await;
    // Short partitions, so that the jobs' partition is due at once.
    let span = [("TASKMILL_PARTITION_SPAN", "1s")];
    let config = taskmill::Config {
        partition_span: Duration::from_secs(1),
        ..env.config.clone()
    };
    let pod = env.start(env.pod().config(config));
    env.wait_for_partition().await;
    let big = env
        .submit(builtin::ECHO, (0..BIG).map(|n| json!(n)).collect())
        .await;
    let mut small = Vec::new();
    for _ in 0..5 {
        small.push(
            env.submit(builtin::ECHO, vec![json!(1), json!(2), json!(3)])
                .await,
        );
    }
    // Failed jobs are kept for ever here: it stays.
    let kept = env
        .submit(builtin::FAIL, vec![json!({"times": 1, "permanent": true})])
        .await;
    for job_id in small.iter().chain([&big, &kept]) {
        env.wait_for_end(job_id, JOB_TIMEOUT).await;
    }
    let delivered = "SELECT COUNT(*) AS n FROM job_events WHERE published_at IS NOT NULL";
    common::wait_until(JOB_TIMEOUT, || async { env.count(delivered).await == 7 }).await;
    pod.stop().await;
    let kept_tasks = env.store.tasks_of_job(&kept).await.unwrap();

    let mut cleaner = Fleet::start(&env, 0, &["--roles", "sweeper"]).await;
    cleaner.vars.extend(
        [
            ("TASKMILL_RETENTION", "0s"),
            ("TASKMILL_RETENTION_FAILED", "off"),
            ("TASKMILL_CLEAN_SECS", "1"),
        ]
        .into_iter()
        .chain(span)
        .map(|(name, value)| (name.to_owned(), value.to_owned())),
    );
    let half_way = match backend {
        Backend::Sqlite => format!(
            "SELECT COUNT(*) AS n FROM jobs WHERE id = '{big}' AND removal_started_at IS NOT NULL \
             AND (SELECT COUNT(*) FROM tasks WHERE job_id = '{big}') BETWEEN 1 AND {}",
            BIG - 1
        ),
        Backend::Postgres => {
            env.execute_sql(&[
                "CREATE FUNCTION slow_removal() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN PERFORM pg_sleep(0.5); RETURN OLD; END $$",
                "CREATE TRIGGER slow_removal BEFORE DELETE ON jobs \
                 FOR EACH ROW EXECUTE FUNCTION slow_removal()",
            ])
            .await;
            "SELECT COUNT(*) AS n FROM task_partitions WHERE detached_at IS NOT NULL".to_owned()
        }
    };
    let child = cleaner.spawn();
    cleaner.children.push(child);
    common::wait_until(JOB_TIMEOUT, || async { env.count(&half_way).await == 1 }).await;
    if backend == Backend::Postgres {
        // Inside the deletes of the detached partition's jobs (the trigger holds each).
        let deleting = "SELECT COUNT(*) AS n FROM pg_stat_activity \
            WHERE state = 'active' AND query LIKE 'DELETE FROM jobs%'";
        common::wait_until(JOB_TIMEOUT, || async { env.count(deleting).await > 0 }).await;
    }
    cleaner.kill_9(0).await;

    // A job is whole unless it is the one marked for removal, or of a detached span.
    let being_removed = match backend {
        Backend::Sqlite => "removal_started_at IS NOT NULL",
        Backend::Postgres => {
            "removal_started_at IS NOT NULL OR EXISTS (SELECT 1 FROM task_partitions p \
             WHERE p.detached_at IS NOT NULL AND jobs.created_at >= p.starts_at \
             AND jobs.created_at < p.ends_at AND NOT jobs.tasks_kept)"
        }
    };
    let half_removed = format!(
        "SELECT COUNT(*) AS n FROM jobs WHERE NOT ({being_removed}) \
         AND task_count <> (SELECT COUNT(*) FROM tasks WHERE tasks.job_id = jobs.id)"
    );
    assert_eq!(
        env.count(&half_removed).await,
        0,
        "every other job is whole"
    );
    let being = format!("SELECT COUNT(*) AS n FROM jobs WHERE {being_removed}");
    assert!(env.count(&being).await >= 1, "the kill came half-way");
    for job_id in &small {
        let rows = env.rows_of_job(job_id).await;
        assert!(
            rows == [0; 4] || rows == [1, 3, 1, 0] || rows == [1, 0, 1, 0],
            "{job_id}: {rows:?}"
        );
    }

    if backend == Backend::Postgres {
        env.execute_sql(&["DROP TRIGGER slow_removal ON jobs"])
            .await;
    }
    cleaner.restart(0);
    common::wait_until(JOB_TIMEOUT, || async {
        env.count("SELECT COUNT(*) AS n FROM jobs").await == 1
    })
    .await;
    cleaner.stop_all().await;
    assert_eq!(env.rows_of_job(&big).await, [0; 4]);
    assert_eq!(env.store.tasks_of_job(&kept).await.unwrap(), kept_tasks);
    let totals = env.store.removed_totals().await.unwrap();
    assert_eq!(
        totals
            .iter()
            .map(|stage| (stage.stage.as_str(), stage.jobs, stage.tasks))
            .collect::<Vec<_>>(),
        [("done", 6, BIG + 15)],
        "each removed row counted once"
    );
}

/// Jobs submitted in their producers' transactions while the relay cannot delete what
/// it published (a trigger refuses the DELETE): every job runs, its row still in the
/// outbox, and the relay is killed -9 there. More jobs are committed while no pod runs.
/// The next pods publish every row again, and delete them: each job ran once, with one
/// event.
async fn a_relay_killed_between_publish_and_delete(backend: Backend) {
    const JOBS: usize = 20;
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(backend).await;
    let audit = env.audit_events().await;
    let (hold, release): (&[&str], &[&str]) = match backend {
        Backend::Sqlite => (
            &[
                "CREATE TRIGGER hold_requests BEFORE DELETE ON job_requests \
               BEGIN SELECT RAISE(ABORT, 'held by the test'); END",
            ],
            &["DROP TRIGGER hold_requests"],
        ),
        Backend::Postgres => (
            &[
                "CREATE FUNCTION hold_requests() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'held by the test'; END $$",
                "CREATE TRIGGER hold_requests BEFORE DELETE ON job_requests \
                 FOR EACH ROW EXECUTE FUNCTION hold_requests()",
            ],
            &["DROP TRIGGER hold_requests ON job_requests"],
        ),
    };
    env.execute_sql(hold).await;
    let db = Database::connect(&env.config.database_url).await.unwrap();
    let submit = |n: usize| {
        let db = db.clone();
        async move {
            let txn = db.begin().await.unwrap();
            let mut request = JobRequest::new(builtin::ECHO, vec![json!(n), json!(n + 1)]);
            request.job_id = Some(format!("tx-{n}"));
            taskmill::submit_in(&txn, request).await.unwrap();
            txn.commit().await.unwrap();
        }
    };
    let waiting = "SELECT COUNT(*) AS n FROM job_requests";

    let mut relay = Fleet::start(&env, 1, &[]).await;
    for n in 0..JOBS {
        submit(n).await;
    }
    for n in 0..JOBS {
        env.wait_for_end(&format!("tx-{n}"), JOB_TIMEOUT).await;
    }
    assert_eq!(
        env.count(waiting).await,
        JOBS as i64,
        "published, not deleted"
    );
    // Their events out first: an event whose publisher dies between the broker's
    // confirm and the outbox update may be sent twice (docs/protocol.md), and that is
    // not what this test is about.
    common::wait_until(JOB_TIMEOUT, || async {
        env.store.unpublished_event_count().await.unwrap() == 0
    })
    .await;
    relay.kill_9(0).await;
    env.execute_sql(release).await;
    for n in JOBS..2 * JOBS {
        submit(n).await;
    }

    let mut fleet = Fleet::start(&env, 2, &[]).await;
    let ids: Vec<String> = (0..2 * JOBS).map(|n| format!("tx-{n}")).collect();
    let jobs: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "done")).collect();
    let report = check_invariants(&env, &jobs, &audit, 0).await;
    for id in &ids {
        let rows = env.store.tasks_of_job(id).await.unwrap();
        assert!(rows.iter().all(|row| row.attempts == 1), "{id} ran once");
    }
    common::wait_until(JOB_TIMEOUT, || async { env.count(waiting).await == 0 }).await;
    fleet.stop_all().await;
    db.close().await.unwrap();
    eprintln!("relay killed between publish and delete: {report}");
}

/// Ten jobs scheduled a few seconds ahead, and the only pod killed -9 while they wait:
/// pods started after their time run each once, none before its time.
async fn scheduled_jobs_outlive_a_killed_pod(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(backend).await;
    let audit = env.audit_events().await;
    let mut first = Fleet::start(&env, 1, &[]).await;
    let client = env.client().await;
    let run_at = chrono::Utc::now() + chrono::TimeDelta::seconds(5);
    let ids: Vec<String> = (0..10).map(|n| format!("later-{n}")).collect();
    for id in &ids {
        let mut request = JobRequest::new(builtin::ECHO, vec![json!(1), json!(2)]);
        request.job_id = Some(id.clone());
        request.run_at = Some(run_at);
        client.submit(request).await.unwrap();
    }
    let scheduled = "SELECT COUNT(*) AS n FROM jobs WHERE stage = 'scheduled'";
    common::wait_until(JOB_TIMEOUT, || async { env.count(scheduled).await == 10 }).await;
    first.kill_9(0).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(env.count(scheduled).await, 10, "nothing ran them meanwhile");

    let mut fleet = Fleet::start(&env, 2, &[]).await;
    let jobs: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "done")).collect();
    let report = check_invariants(&env, &jobs, &audit, 0).await;
    for id in &ids {
        let job = env.store.job(id).await.unwrap().unwrap();
        assert!(
            job.started_at.unwrap() >= run_at,
            "{id} not before its time"
        );
        let rows = env.store.tasks_of_job(id).await.unwrap();
        assert!(rows.iter().all(|row| row.attempts == 1), "{id} ran once");
    }
    client.close().await.unwrap();
    fleet.stop_all().await;
    eprintln!("scheduled jobs outlive a killed pod: {report}");
}

/// An every-second schedule that catches missed ticks up, fired by two pods that are
/// both killed -9 and started again: every second from its first tick to its last
/// made exactly one job, each with one event, none lost and none twice.
async fn every_tick_fires_once_across_killed_pods(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(backend).await;
    let audit = env.audit_events().await;
    env.cli(&[
        "schedule",
        "add",
        "every-second",
        "--cron",
        "* * * * * *",
        "--catch-up",
        "all",
        "--type",
        builtin::ECHO,
        "--task",
        "1",
    ]);
    let ticks = || async {
        env.texts("SELECT id FROM jobs WHERE id LIKE 'every-second:%' ORDER BY id")
            .await
    };
    let mut fleet = Fleet::start(&env, 2, &[]).await;
    common::wait_until(JOB_TIMEOUT, || async { ticks().await.len() >= 3 }).await;
    fleet.kill_9(0).await;
    fleet.kill_9(1).await;
    let killed_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.restart(0);
    fleet.restart(1);
    // Past the dead holder's lease, the ticks missed meanwhile are caught up, and
    // firing goes on.
    let after = format!(
        "every-second:{}",
        (killed_at + chrono::TimeDelta::seconds(5)).format("%Y%m%dT%H%M%SZ")
    );
    common::wait_until(JOB_TIMEOUT, || async {
        ticks().await.last().is_some_and(|last| *last > after)
    })
    .await;
    env.cli(&["schedule", "remove", "every-second"]);
    // Every tick fired is a job once its request is out and taken. A request taken is
    // not yet a job (the intake holds it unacked while it forms the job), so the wait
    // also asks for the ticks to have no gap: a tick skipped times it out.
    let intake = env.topology().intake_queue();
    let seconds = |ids: &[String]| -> Vec<i64> {
        ids.iter()
            .map(|id| {
                let tick = id.rsplit_once(':').unwrap().1;
                chrono::NaiveDateTime::parse_from_str(tick, "%Y%m%dT%H%M%SZ")
                    .unwrap()
                    .and_utc()
                    .timestamp()
            })
            .collect()
    };
    common::wait_until(JOB_TIMEOUT, || async {
        env.count("SELECT COUNT(*) AS n FROM job_requests").await == 0
            && env.message_count(&intake).await == 0
            && seconds(&ticks().await)
                .windows(2)
                .all(|pair| pair[1] - pair[0] == 1)
    })
    .await;

    let ids = ticks().await;
    for pair in seconds(&ids).windows(2) {
        assert_eq!(pair[1] - pair[0], 1, "every tick once: {ids:?}");
    }
    let jobs: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "done")).collect();
    let report = check_invariants(&env, &jobs, &audit, 0).await;
    fleet.stop_all().await;
    eprintln!("{} ticks across two killed pods: {report}", ids.len());
}

// ---------------------------------------------------------------- the checks

/// Waits for the jobs to end, then checks every invariant; returns a summary.
/// The pod feeding a large job is killed once its request is acked: the job's
/// messages are half out, and no request will come back to finish them. Another pod's
/// intake takes the feeder's lease once it expires and feeds the rest.
async fn a_killed_feeder_is_taken_over(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(backend).await;
    let audit = env.audit_events().await;
    let mut feeder = Fleet::start(&env, 1, &["--roles", "intake"]).await;
    let job_id = env
        .submit(builtin::ECHO, (0..5_000).map(|n| json!(n)).collect())
        .await;
    env.wait_for_feeding(&job_id, JOB_TIMEOUT).await;
    feeder.kill_9(0).await;

    let mut fleet = Fleet::start(&env, 2, &[]).await;
    let report = check_invariants(&env, &[(job_id.as_str(), "done")], &audit, 0).await;
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert!(
        rows.iter().all(|row| row.attempts == 1),
        "the copies a takeover publishes claim nothing"
    );
    fleet.stop_all().await;
    eprintln!("feeder killed: 5000 tasks, {report}");
}

/// A job sent in parts whose intake (and feeder) is killed -9 after its first part:
/// the rest arrives at other pods, which take the feeding over once the dead feeder's
/// lease runs out, and the job runs whole.
async fn an_intake_killed_between_parts(backend: Backend) {
    const PART: u64 = taskmill::client::PART_TASKS as u64;
    let _serial = SERIAL.lock().await;
    let env = TestEnv::new(backend).await;
    let audit = env.audit_events().await;
    let mut intake = Fleet::start(&env, 1, &["--roles", "intake"]).await;
    let client = env.client().await;
    let mut job = client
        .open_job(JobRequest::new(builtin::ECHO, Vec::new()))
        .unwrap();
    let job_id = job.job_id().to_owned();
    for n in 0..PART {
        job.push(&json!(n)).await.unwrap();
    }
    common::wait_until(JOB_TIMEOUT, || async {
        let parts = env.store.parts(&job_id).await.unwrap();
        parts.first().is_some_and(|part| part.stored)
    })
    .await;
    intake.kill_9(0).await;

    for n in PART..PART + 5_000 {
        job.push(&json!(n)).await.unwrap();
    }
    job.seal().await.unwrap();
    let mut fleet = Fleet::start(&env, 2, &[]).await;
    let report = check_invariants(&env, &[(job_id.as_str(), "done")], &audit, 0).await;
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert_eq!(rows.len() as u64, PART + 5_000);
    assert!(
        rows.iter().all(|row| row.attempts == 1),
        "each task ran once"
    );
    client.close().await.unwrap();
    fleet.stop_all().await;
    eprintln!(
        "intake killed between parts: {} tasks, {report}",
        PART + 5_000
    );
}

async fn check_invariants(
    env: &TestEnv,
    jobs: &[(&str, &str)],
    audit: &str,
    expected_parked: usize,
) -> String {
    for (job_id, _) in jobs {
        env.wait_for_end(job_id, JOB_TIMEOUT).await;
    }
    let mut total_tasks = 0;
    let mut retried = 0;
    for (job_id, expected_stage) in jobs {
        let job = env.store.job(job_id).await.unwrap().unwrap();
        assert_eq!(
            &job.stage, expected_stage,
            "job {job_id} ends {expected_stage}"
        );
        let rows = env.store.tasks_of_job(job_id).await.unwrap();
        assert_eq!(rows.len() as i64, job.task_count, "task count of {job_id}");
        let mut by_status: HashMap<&str, i64> = HashMap::new();
        for row in &rows {
            assert!(
                ["done", "failed", "cancelled"].contains(&row.status.as_str()),
                "task {} of {job_id} is terminal, not {}",
                row.id,
                row.status
            );
            *by_status.entry(row.status.as_str()).or_default() += 1;
            retried += i64::from(row.deliveries > 1);
        }
        let count = |status| by_status.get(status).copied().unwrap_or(0);
        assert_eq!(
            (job.done_count, job.failed_count, job.cancelled_count),
            (count("done"), count("failed"), count("cancelled")),
            "counts of {job_id} match its rows"
        );
        total_tasks += rows.len();
    }

    // An outbox row is marked published only after the broker confirmed its event
    // into the audit queue: once none is left, the queue holds every event sent.
    common::wait_until(Duration::from_secs(60), || async {
        env.store.unpublished_event_count().await.unwrap() == 0
    })
    .await;
    // A pod killed between the broker's confirm and the outbox update leaves its event
    // to the relay, which sends the stored body again (docs/protocol.md: deduplicate on
    // `(job_id, run)`): one event per job, and any copy is the same bytes.
    let events = env.drain_queue(audit).await;
    let mut per_job: HashMap<String, Vec<&[u8]>> = HashMap::new();
    for (body, _) in &events {
        let event: taskmill::JobEvent = serde_json::from_slice(body).unwrap();
        per_job.entry(event.job_id).or_default().push(body);
    }
    for (job_id, _) in jobs {
        let copies = per_job.get(*job_id).map(Vec::as_slice).unwrap_or_default();
        assert!(!copies.is_empty(), "no event for {job_id}");
        assert!(
            copies.iter().all(|copy| *copy == copies[0]),
            "one event for {job_id}, its copies identical: {:?}",
            copies
                .iter()
                .map(|copy| String::from_utf8_lossy(copy))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(per_job.len(), jobs.len(), "no events for other jobs");

    let parking = env.topology().parking_queue();
    let mut parked = env.drain_queue(&parking).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while parked.len() < expected_parked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        parked.extend(env.drain_queue(&parking).await);
    }
    assert_eq!(
        parked.len(),
        expected_parked,
        "the parking lot holds what was sent there on purpose"
    );
    assert!(
        parked
            .iter()
            .all(|(_, reason)| reason.as_ref().is_some_and(|r| !r.is_empty())),
        "every parked message has a reason"
    );

    // Copies of finished tasks' messages (from a resumed formation or the sweeper) may
    // still be on their way through the workers, which ack them as stale: the queues
    // must drain, not be empty at this very instant.
    for queue in env.queue_names() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut left = env.message_count(&queue).await;
        while left > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            left = env.message_count(&queue).await;
        }
        assert_eq!(left, 0, "queue {queue} drains at the end");
    }
    format!(
        "{total_tasks} task rows terminal, counts match, {} events (one per job), {} parked, all queues empty, {retried} tasks delivered more than once",
        events.len(),
        parked.len()
    )
}

/// A fresh vhost and database, an audit queue for job events, and three pods.
async fn setup(backend: Backend, extra: &[&str]) -> (TestEnv, String, Fleet) {
    let env = TestEnv::new(backend).await;
    let audit = env.audit_events().await;
    let fleet = Fleet::start(&env, 3, extra).await;
    (env, audit, fleet)
}

/// A job of `tasks` tasks that each sleep `ms` milliseconds.
async fn sleep_job(env: &TestEnv, tasks: usize, ms: u64) -> String {
    env.submit(
        builtin::SLEEP,
        (0..tasks).map(|_| json!({ "ms": ms })).collect(),
    )
    .await
}

async fn job_ended(env: &TestEnv, job_id: &str) -> bool {
    env.store.job(job_id).await.unwrap().is_some_and(|job| {
        job.stage
            .parse::<taskmill::JobStage>()
            .unwrap()
            .is_terminal()
    })
}

/// Waits until at least `done` tasks of the job are done.
async fn wait_for_progress(env: &TestEnv, job_id: &str, done: i64) {
    common::wait_until(JOB_TIMEOUT, || async {
        env.store
            .job_status(job_id)
            .await
            .unwrap()
            .is_some_and(|status| status.tasks_by_status.get("done").copied().unwrap_or(0) >= done)
    })
    .await;
}

// ---------------------------------------------------------------- processes

/// `taskmill worker` processes, each running every role.
struct Fleet {
    children: Vec<Child>,
    program: PathBuf,
    command: Vec<String>,
    vars: Vec<(String, String)>,
    logs: PathBuf,
    spawned: usize,
}

impl Fleet {
    async fn start(env: &TestEnv, count: usize, extra: &[&str]) -> Self {
        let logs = std::env::temp_dir().join(format!("{}-logs", env.name));
        std::fs::create_dir_all(&logs).unwrap();
        let mut command: Vec<String> = [
            "worker",
            "--concurrency",
            "8",
            "--grace-secs",
            "15",
            "--lease-secs",
            "30",
            "--sweep-secs",
            "1",
            "--stuck-secs",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        command.extend(extra.iter().map(|s| s.to_string()));
        let vars = vec![
            ("AMQP_URL".to_owned(), env.config.amqp_url.clone()),
            ("DATABASE_URL".to_owned(), env.config.database_url.clone()),
            ("TASKMILL_PREFIX".to_owned(), env.config.prefix.clone()),
            ("RUST_LOG".to_owned(), "warn,taskmill=info".to_owned()),
            // Pods on one host: each serves its endpoint on a free port.
            ("TASKMILL_HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ];
        let mut fleet = Self {
            children: Vec::new(),
            program: PathBuf::from(env!("CARGO_BIN_EXE_taskmill")),
            command,
            vars,
            logs,
            spawned: 0,
        };
        for _ in 0..count {
            let child = fleet.spawn();
            fleet.children.push(child);
        }
        fleet
    }

    /// One [`poison_pod`]: this test binary, running only that test.
    async fn poison_pods(env: &TestEnv) -> Self {
        let mut fleet = Self::start(env, 0, &[]).await;
        fleet.program = std::env::current_exe().unwrap();
        fleet.command = ["poison_pod", "--exact", "--ignored", "--nocapture"]
            .map(String::from)
            .to_vec();
        fleet.vars.push((POISON_POD.to_owned(), "1".to_owned()));
        let child = fleet.spawn();
        fleet.children.push(child);
        fleet
    }

    fn spawn(&mut self) -> Child {
        self.spawned += 1;
        let log =
            std::fs::File::create(self.logs.join(format!("worker-{}.log", self.spawned))).unwrap();
        Command::new(&self.program)
            .args(&self.command)
            .envs(self.vars.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("taskmill worker starts")
    }

    fn len(&self) -> usize {
        self.children.len()
    }

    fn alive(&mut self) -> usize {
        self.children
            .iter_mut()
            .map(|child| child.try_wait())
            .filter(|status| matches!(status, Ok(None)))
            .count()
    }

    async fn kill_9(&mut self, pod: usize) {
        let child = &mut self.children[pod];
        let _ = child.kill().await;
    }

    fn restart(&mut self, pod: usize) {
        self.children[pod] = self.spawn();
    }

    async fn sigterm(&mut self, pod: usize) -> ExitStatus {
        let child = &mut self.children[pod];
        let pid = child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("the pod exits within its grace period")
            .unwrap()
    }

    async fn stop_all(&mut self) {
        for pod in 0..self.len() {
            if matches!(self.children[pod].try_wait(), Ok(None)) {
                let status = self.sigterm(pod).await;
                assert!(status.success(), "pod {pod} exits 0 on SIGTERM: {status}");
            }
        }
    }
}

impl Drop for Fleet {
    /// The pods' logs explain a failure: print their tails before removing them.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for entry in std::fs::read_dir(&self.logs)
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {} (last 40 lines)", entry.path().display());
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{line}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

// ---------------------------------------------------------------- services

fn run(program: &str, args: &[&str]) {
    let status = std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "{program} {args:?} failed"
    );
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_for_port(port: u16, up: bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while port_open(port) != up {
        assert!(
            Instant::now() < deadline,
            "port {port} did not go {}",
            if up { "up" } else { "down" }
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A service stopped by a test: started again by `start` or, whatever happens, on drop.
struct Outage {
    restart: fn(),
    restarted: bool,
}

impl Outage {
    async fn begin(stop: fn(), restart: fn()) -> Self {
        tokio::task::spawn_blocking(stop).await.unwrap();
        Self {
            restart,
            restarted: false,
        }
    }

    async fn start(mut self) {
        tokio::task::spawn_blocking(self.restart).await.unwrap();
        self.restarted = true;
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.restarted {
            (self.restart)();
        }
    }
}

/// Stops the RabbitMQ application (the Erlang node keeps running).
async fn stop_rabbitmq() -> Outage {
    Outage::begin(
        || {
            run("rabbitmqctl", &["stop_app"]);
            wait_for_port(5672, false);
        },
        || {
            run("rabbitmqctl", &["start_app"]);
            wait_for_port(5672, true);
            wait_for_port(15672, true);
        },
    )
    .await
}

/// Stops the PostgreSQL cluster.
async fn stop_postgres() -> Outage {
    Outage::begin(
        || {
            postgres_cluster("stop");
            wait_for_port(5432, false);
        },
        || {
            postgres_cluster("start");
            wait_for_port(5432, true);
        },
    )
    .await
}

fn postgres_cluster(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL install")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .next()
        .expect("one cluster version");
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, "main", action],
    );
}

/// A publisher whose connection is closed says so: its dead channel's own error
/// ("invalid channel state") read as one channel closed by the broker, and a role
/// publishing on it retried for minutes instead of reconnecting.
#[tokio::test]
async fn a_publisher_on_a_closed_connection_reports_the_connection_lost() {
    use taskmill::amqp::broker::{Outgoing, Publisher};
    let env = TestEnv::new(Backend::Sqlite).await;
    let connection = env.connection().await;
    let publisher = Publisher::open(&connection).await.unwrap();
    connection
        .close(200, "the test closes it".into())
        .await
        .unwrap();
    match publisher.send(Outgoing::to_queue("nowhere", b"{}")).await {
        Ok(_) => panic!("a publish on a closed connection went out"),
        Err(err) => assert!(err.is_connection_lost(), "{err}"),
    }
}
