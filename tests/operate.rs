//! Operating taskmill: a pod's probes and Prometheus metrics on its HTTP endpoint, and
//! retrying a failed job (`Client::retry`, `taskmill retry`).

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use taskmill::store::Rerun;
use taskmill::{Error, JobRequest, TaskContext, TaskError};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    a_failed_job_runs_again_and_ends_once_more,
    a_retry_stopped_after_its_commit_runs_whole,
    a_retry_is_refused_with_its_reason,
);

/// GET `url`: its status and body; 5xx answers are answers, not errors.
async fn get(url: String) -> (u16, String) {
    try_get(url).await.expect("the endpoint answers")
}

/// [`get`], `None` while nothing listens.
async fn try_get(url: String) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut response = agent.get(&url).call().ok()?;
        let status = response.status().as_u16();
        Some((status, response.body_mut().read_to_string().unwrap()))
    })
    .await
    .unwrap()
}

/// The value of the sample `series` (name and labels, exactly as rendered).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

#[tokio::test]
async fn the_endpoint_serves_probes_and_metrics() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let (config, base) = env.config_with_http();
    // A task type of this test's own: the metrics registry is the process's.
    let pod = env.start(env.pod().config(config).handler(
        "operate.double",
        |ctx: TaskContext| async move {
            let n = ctx.payload.as_i64().unwrap_or(0);
            if n == 3 && ctx.attempt == 1 {
                return Err(TaskError::retryable("three fails once"));
            }
            Ok(json!(n * 2))
        },
    ));
    common::wait_until(LONG, || {
        let url = format!("{base}/readyz");
        async move { try_get(url).await.is_some_and(|(status, _)| status == 200) }
    })
    .await;
    assert_eq!(get(format!("{base}/healthz")).await, (200, "ok\n".into()));

    let client = env.client().await;
    let mut request = JobRequest::new("operate.double", (0..10).map(|n| json!(n)).collect());
    request.retry_delay_ms = 10;
    let job_id = client.submit(request).await.unwrap();
    assert!(client.wait(&job_id).await.unwrap().is_done());

    let (status, metrics) = get(format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let labels = r#"pool="default",task_type="operate.double""#;
    let processed = |outcome: &str| {
        sample(
            &metrics,
            &format!("taskmill_tasks_processed_total{{{labels},outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(processed("done"), Some(10.0), "{metrics}");
    assert_eq!(processed("retried"), Some(1.0));
    assert_eq!(processed("failed"), Some(0.0), "registered at zero");
    assert_eq!(
        sample(
            &metrics,
            &format!("taskmill_tasks_started_total{{{labels}}}")
        ),
        Some(11.0)
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("taskmill_task_duration_seconds_count{{{labels}}}")
        ),
        Some(11.0)
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("taskmill_task_latency_seconds_count{{{labels}}}")
        ),
        Some(11.0)
    );
    assert!(metrics.contains(&format!(
        "taskmill_queue_ready_messages{{queue=\"{}\"}}",
        env.topology().work_queue("default")
    )));
    assert!(metrics.contains("taskmill_jobs{stage=\"running\"}"));
    assert!(metrics.contains("# TYPE taskmill_task_duration_seconds histogram"));
    assert!(
        !metrics.contains(&job_id),
        "no job id is a label: series would grow without bound"
    );
    client.close().await.unwrap();
    pod.stop().await;
}

/// Consumers of `queue` now, 0 while it does not exist (a passive declare on a channel
/// of its own: a missing queue closes the channel).
async fn consumers(connection: &lapin::Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.unwrap();
    taskmill::amqp::topology::declare_passive(&channel, queue)
        .await
        .map_or(0, |queue| queue.consumer_count())
}

/// Polls `/readyz` every few milliseconds until it answers 200, then asserts that the
/// intake, completion and work queues each have a consumer by then.
async fn ready_only_when_consuming(env: &TestEnv, base: &str, when: &str) {
    let topology = env.topology();
    let queues = [
        topology.intake_queue(),
        topology.completion_queue(),
        topology.work_queue("default"),
    ];
    let connection = env.connection().await;
    let deadline = tokio::time::Instant::now() + LONG;
    while try_get(format!("{base}/readyz"))
        .await
        .map(|(status, _)| status)
        != Some(200)
    {
        assert!(tokio::time::Instant::now() < deadline, "never ready {when}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for queue in &queues {
        assert!(
            consumers(&connection, queue).await >= 1,
            "ready {when} while {queue} has no consumer"
        );
    }
    taskmill::amqp::broker::close_connection(&connection).await;
}

#[tokio::test]
async fn a_pod_is_ready_only_once_its_roles_consume() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let (config, base) = env.config_with_http();
    let pod = env.start(env.pod().config(config));
    ready_only_when_consuming(&env, &base, "at start").await;

    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_all_connections", "-p", &env.name, "a readiness test"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(closed.status.success(), "{closed:?}");
    common::wait_until(LONG, || {
        let url = format!("{base}/readyz");
        async move { try_get(url).await.is_some_and(|(status, _)| status != 200) }
    })
    .await;
    ready_only_when_consuming(&env, &base, "after a reconnect").await;
    pod.stop().await;
}

/// A producer chooses job types: a `job_type` label takes only types a pod registered,
/// and rejections are counted too.
#[tokio::test]
async fn job_types_no_pod_registered_are_counted_as_other() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let (config, base) = env.config_with_http();
    let pod = env.start(env.pod().config(config));
    let client = env.client().await;
    let made_up = format!("made-up-{}", env.name);
    let mut request = JobRequest::new(made_up.as_str(), vec![json!(1)]);
    request.task_type = Some(taskmill::builtin::ECHO.to_owned());
    let done = client.submit(request).await.unwrap();
    assert!(client.wait(&done).await.unwrap().is_done());
    // No handler has this type: the intake rejects the request. A rejection leaves no
    // row to find, so the watch comes first.
    let unknown = format!("unknown-{}", env.name);
    let mut request = JobRequest::new(unknown.as_str(), vec![json!(1)]);
    request.job_id = Some(unknown.clone());
    let watch = client.watch(&unknown).await.unwrap();
    client.submit(request).await.unwrap();
    let answer = tokio::time::timeout(LONG, watch.event()).await.unwrap();
    assert!(matches!(answer, Err(Error::Rejected { .. })), "{answer:?}");

    let finished = |metrics: &str, stage: &str| {
        sample(
            metrics,
            &format!("taskmill_jobs_finished_total{{job_type=\"other\",stage=\"{stage}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let metrics = common::wait_for_value(Duration::from_secs(20), || {
        let url = format!("{base}/metrics");
        async move {
            let (_, metrics) = get(url).await;
            (finished(&metrics, "done") >= 1.0 && finished(&metrics, "rejected") >= 1.0)
                .then_some(metrics)
        }
    })
    .await;
    assert!(!metrics.contains(&made_up), "{metrics}");
    assert!(!metrics.contains(&unknown), "{metrics}");
    client.close().await.unwrap();
    pod.stop().await;
}

/// A `taskmill worker` process of this test's broker and database, its stderr piped
/// (JSON lines), with `vars` on top.
fn worker_process(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> tokio::process::Child {
    tokio::process::Command::from(env.taskmill())
        .arg("worker")
        .args(args)
        .env("RUST_LOG", "warn,taskmill=info")
        .env_remove("TASKMILL_HTTP_ADDR")
        .env_remove("TASKMILL_LOG_FORMAT")
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("taskmill worker starts")
}

/// Reads a worker's JSON log lines until one says where it serves HTTP: that address,
/// and the lines before it.
async fn serving_addr(worker: &mut tokio::process::Child) -> (std::net::SocketAddr, Vec<Value>) {
    use tokio::io::AsyncBufReadExt;
    let stderr = worker.stderr.take().expect("stderr is piped");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(LONG, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let line: Value = serde_json::from_str(&line).expect("JSON lines");
            if line["fields"]["message"] == "serving probes, metrics and the dashboard" {
                return line["fields"]["addr"].as_str().unwrap().parse().unwrap();
            }
            seen.push(line);
        }
        panic!("the worker exited without serving HTTP: {seen:?}");
    })
    .await
    .expect("the worker serves HTTP within two minutes");
    // The rest is drained, so that the worker never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (found, seen)
}

/// Several pods on one host at their defaults: the first to start takes port 9464 (if
/// nothing else on the machine holds it), the next warns once and serves on a free
/// port; both are ready.
#[tokio::test]
async fn two_pods_at_the_default_address_on_one_host_both_serve() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut first = worker_process(&env, &[], &[]);
    let (first_addr, first_lines) = serving_addr(&mut first).await;
    let mut second = worker_process(&env, &["--no-migrate"], &[]);
    let (second_addr, second_lines) = serving_addr(&mut second).await;
    assert_ne!(first_addr.port(), second_addr.port());
    for (addr, lines) in [(first_addr, &first_lines), (second_addr, &second_lines)] {
        let warnings: Vec<&Value> = lines
            .iter()
            .filter(|line| line["level"] == "WARN" && line["fields"]["taken"] == "0.0.0.0:9464")
            .collect();
        let expected = usize::from(addr.port() != 9464);
        assert_eq!(warnings.len(), expected, "{addr}: {lines:?}");
        let base = format!("http://127.0.0.1:{}", addr.port());
        common::wait_until(LONG, || {
            let url = format!("{base}/readyz");
            async move { try_get(url).await.is_some_and(|(status, _)| status == 200) }
        })
        .await;
    }
    for mut worker in [first, second] {
        let _ = worker.start_kill();
        let _ = worker.wait().await;
    }
}

/// An address asked for that cannot be bound stops the pod at start with one line on
/// stderr, never a backtrace (even with `RUST_BACKTRACE=1`).
#[tokio::test]
async fn an_address_asked_for_that_is_in_use_stops_the_pod_with_one_line() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (args, vars) in [
        (vec!["--http-addr", addr.as_str()], vec![]),
        (vec![], vec![("TASKMILL_HTTP_ADDR", addr.as_str())]),
    ] {
        let mut vars = vars;
        vars.push(("RUST_BACKTRACE", "1"));
        let worker = worker_process(&env, &args, &vars);
        let output = tokio::time::timeout(LONG, worker.wait_with_output())
            .await
            .expect("the worker stops")
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        let not_logs: Vec<&str> = stderr
            .lines()
            .filter(|line| serde_json::from_str::<Value>(line).is_err())
            .collect();
        assert_eq!(not_logs.len(), 1, "one line: {stderr}");
        assert!(
            not_logs[0].starts_with(&format!("taskmill: cannot serve HTTP on {addr}: "))
                && not_logs[0].contains("in use"),
            "{stderr}"
        );
    }
    drop(taken);
}

#[tokio::test]
async fn a_pod_without_its_broker_is_alive_but_not_ready() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let (mut config, base) = env.config_with_http();
    // Nothing listens there: the pod keeps reconnecting.
    config.amqp_url = format!("amqp://guest:secret-password@{}/", common::free_addr());
    let pod = env.start(env.pod().config(config));
    let (status, body) = common::wait_for_value(LONG, || {
        let url = format!("{base}/readyz");
        async move { try_get(url).await }
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker: not connected"), "{body}");
    assert!(!body.contains("secret-password"), "no credential is shown");
    assert_eq!(
        get(format!("{base}/healthz")).await.0,
        200,
        "alive all the same"
    );
    pod.stop().await;
}

/// The tests whose odd tasks no longer fail: their retry runs them to the end.
static HEALED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Fails odd tasks for good until their test is healed.
async fn odd_fails_until_healed(ctx: TaskContext) -> Result<Value, TaskError> {
    let n = ctx.payload["n"].as_i64().unwrap_or(0);
    let test = ctx.payload["test"].as_str().unwrap_or_default();
    if n % 2 == 1 && !HEALED.lock().unwrap().iter().any(|healed| healed == test) {
        return Err(TaskError::permanent(format!("{n} is odd")));
    }
    Ok(json!(n))
}

async fn a_failed_job_runs_again_and_ends_once_more(backend: Backend) {
    retried_job_ends_once_more(backend, Retry::Client).await
}

/// A retry whose caller stops once its transaction commits (Ctrl-C, a dropped
/// dashboard request) has sent nothing: the pods' feeders send the rerun.
async fn a_retry_stopped_after_its_commit_runs_whole(backend: Backend) {
    retried_job_ends_once_more(backend, Retry::CommitOnly).await
}

enum Retry {
    Client,
    CommitOnly,
}

async fn retried_job_ends_once_more(backend: Backend, retry: Retry) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod().handler("odd", odd_fails_until_healed));
    let client = env.client().await;
    let tasks = (0..20)
        .map(|n| json!({ "n": n, "test": env.name }))
        .collect();
    let request = JobRequest::new("odd", tasks);
    let job_id = client.submit(request).await.unwrap();
    let first = client.wait(&job_id).await.unwrap();
    assert_eq!((first.stage.as_str(), first.run), ("failed", 1));
    // fail_fast: the first odd failure cancels what had not ended.
    assert!(first.failed >= 1 && first.done + first.failed + first.cancelled == 20);
    events.wait_for(1, LONG).await;

    HEALED.lock().unwrap().push(env.name.clone());
    let again = match retry {
        Retry::Client => client.retry(&job_id).await.unwrap(),
        Retry::CommitOnly => match env.store.rerun_job(&job_id).await.unwrap() {
            Rerun::Started { tasks, .. } => tasks,
            other => panic!("not retried: {other:?}"),
        },
    };
    assert_eq!(again, (first.failed + first.cancelled) as u64);
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!(job.stage, "done");
    assert_eq!(job.run, 2);
    assert_eq!(
        (job.done_count, job.failed_count, job.cancelled_count),
        (20, 0, 0)
    );
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert!(rows
        .iter()
        .all(|row| row.status == "done" && row.info.is_none()));
    assert!(rows.iter().all(|row| row.attempts == 1), "fresh attempts");

    let all = events.wait_for(2, LONG).await;
    let runs: Vec<(i32, &str)> = all
        .iter()
        .map(|event| (event.run, event.stage.as_str()))
        .collect();
    assert_eq!(runs, [(1, "failed"), (2, "done")], "one event per run");
    client.close().await.unwrap();
    pod.stop().await;
}

async fn a_retry_is_refused_with_its_reason(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let job_id = client
        .submit(JobRequest::new(
            taskmill::builtin::ECHO,
            vec![json!(1), json!(2)],
        ))
        .await
        .unwrap();
    assert!(client.wait(&job_id).await.unwrap().is_done());
    match client.retry(&job_id).await {
        Err(Error::NotRetried { reason, .. }) => {
            assert!(reason.contains("only a failed job"), "{reason}")
        }
        other => panic!("a done job is not retried: {other:?}"),
    }
    assert!(matches!(
        client.retry("no-such-job").await,
        Err(Error::UnknownJob(_))
    ));
    client.close().await.unwrap();
    pod.stop().await;
}

#[tokio::test]
async fn pods_and_clients_given_several_broker_urls_use_the_one_that_answers() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut config = env.config.clone();
    // A node that is away, listed first and last around the one that answers: wherever
    // a pod starts in the list, it ends up on the live node.
    let away = format!("amqp://guest:guest@{}/{}", common::free_addr(), env.name);
    config.amqp_url = format!("{away}, {}, {away}", env.config.amqp_url);
    let pod = env.start(env.pod().config(config.clone()));
    let client = taskmill::Client::connect(&config)
        .await
        .unwrap()
        .with_store(env.store.clone().into());
    let job_id = client
        .submit(JobRequest::new(
            taskmill::builtin::ECHO,
            vec![json!(1), json!(2)],
        ))
        .await
        .unwrap();
    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert!(event.is_done());
    client.close().await.unwrap();
    pod.stop().await;
}

/// A cancel whose caller is dropped mid-transaction (a browser closing the dashboard's
/// request, a pod stopping) still commits: its transaction runs on a task of its own,
/// and no connection is left inside a transaction holding the job's lock.
#[tokio::test]
async fn a_transaction_outlives_its_dropped_caller() {
    let env = TestEnv::new(Backend::Postgres).await;
    let client = env.client().await;
    // No pod: the job waits, forming nothing, until it is cancelled.
    let mut request = JobRequest::new(taskmill::builtin::ECHO, vec![json!(1)]);
    request.job_id = Some("dropped-cancel".to_owned());
    let intake = env.start(env.pod().roles(common::INTAKE_ONLY));
    client.submit(request).await.unwrap();
    common::wait_until(LONG, || async {
        env.store
            .job("dropped-cancel")
            .await
            .unwrap()
            .is_some_and(|job| job.stage == "running")
    })
    .await;
    intake.stop().await;
    // The cancel's statements on the job's tasks take a second.
    env.execute_sql(&[
        "CREATE FUNCTION slow() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER slow BEFORE UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION slow()",
    ])
    .await;
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        env.store.cancel_job("dropped-cancel"),
    )
    .await;
    assert!(dropped.is_err(), "the caller gave up mid-transaction");
    let job = env.wait_for_end("dropped-cancel", LONG).await;
    assert_eq!(job.stage, "cancelled", "the transaction ran to its commit");
    common::wait_until(LONG, || async {
        let db = sea_orm::Database::connect(&env.config.database_url)
            .await
            .unwrap();
        use sea_orm::ConnectionTrait;
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
            ))
            .await
            .unwrap()
            .unwrap();
        let open: i64 = row.try_get("", "n").unwrap();
        db.close().await.unwrap();
        open == 0
    })
    .await;
    client.close().await.unwrap();
}

/// `taskmill submit --wait` hears an answer to every request: the event of a new job,
/// the stored event when the job ended before, and the refusal of a job id reused with
/// another request; and a signal stops the wait (exit 130), not the command's caller.
#[tokio::test]
async fn submit_wait_answers_every_resubmission_and_stops_on_a_signal() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let pod = env.start(env.pod());
    let submit = |job_id: &str, task: &str| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmill"));
        command
            .args(["submit", "--type", taskmill::builtin::ECHO, "--wait"])
            .args(["--job-id", job_id, "--task", task])
            .env("AMQP_URL", &env.config.amqp_url)
            .env("TASKMILL_PREFIX", &env.config.prefix)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    };
    let answered = |mut command: tokio::process::Command| async move {
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("submit --wait answers")
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(answered(submit("again", "1")).await.0, Some(0), "a new job");
    assert_eq!(
        answered(submit("again", "1")).await.0,
        Some(0),
        "the same job again"
    );
    let (code, stderr) = answered(submit("again", "2")).await;
    assert_eq!(code, Some(1), "another request under its id");
    assert!(
        stderr.contains("reused with a different request"),
        "{stderr}"
    );

    pod.stop().await;
    let mut waiting = submit("nobody-runs-it", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It prints the job id once the request is sent, just before it waits.
    let mut printed = String::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::io::AsyncBufReadExt::read_line(
            &mut tokio::io::BufReader::new(waiting.stdout.take().unwrap()),
            &mut printed,
        ),
    )
    .await
    .expect("the job id is printed")
    .unwrap();
    assert_eq!(printed.trim(), "nobody-runs-it");
    let pid = waiting.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), waiting.wait())
        .await
        .expect("a signal stops the wait")
        .unwrap();
    assert_eq!(status.code(), Some(130));
}

/// The parking lot holds at most `TASKMILL_PARKING_MAX` messages: past it a message
/// that would be parked is dropped and counted (`taskmill_parks_refused_total`), the
/// pod goes on serving, and `taskmill dead purge --older-than` makes room from the
/// oldest end.
#[tokio::test]
async fn a_full_parking_lot_drops_parks_loudly_and_purges_by_age() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let (mut config, base) = env.config_with_http();
    config.parking_max = 2;
    let pod = env.start(env.pod().config(config));
    let topology = env.topology();
    let lot = topology.parking_queue();
    let bad = |n: u32| format!("{{\"not a request\": {n}}}");
    let send_bad = |n: u32| {
        let (env, jobs, body) = (&env, topology.jobs_exchange(), bad(n));
        async move {
            env.publish_raw(&jobs, "bad", body.as_bytes(), Some("application/json"))
                .await
        }
    };
    send_bad(1).await;
    common::wait_until(LONG, || async { env.message_count(&lot).await == 1 }).await;
    // The first parked message ages past the purge's cut-off below; time itself must
    // pass here.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for n in 2..=4 {
        send_bad(n).await;
    }
    let refused = common::wait_for_value(LONG, || async {
        let (_, metrics) = get(format!("{base}/metrics")).await;
        sample(
            &metrics,
            r#"taskmill_parks_refused_total{queue="tm.intake"}"#,
        )
        .filter(|refused| *refused == 2.0)
        .map(|_| metrics)
    })
    .await;
    // The registry is the process's: other tests' pods set the bound's gauge too.
    assert!(
        sample(&refused, "taskmill_parking_max_messages").is_some(),
        "{refused}"
    );
    let intake = topology.intake_queue();
    common::wait_until(LONG, || async { env.message_count(&intake).await == 0 }).await;
    assert_eq!(env.message_count(&lot).await, 2, "two parked, two dropped");

    // The pod still serves.
    let done = env.submit(taskmill::builtin::ECHO, vec![json!(1)]).await;
    assert_eq!(env.wait_for_end(&done, LONG).await.stage, "done");

    // The purge takes the message parked before the cut-off only.
    let purged = env.cli(&["dead", "purge", "--older-than", "1s"]);
    assert_eq!(purged, "purged 1");
    let left = env.drain_queue(&lot).await;
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].0, bad(1).into_bytes(), "the oldest one went");
    // With room again, a bad request is parked once more.
    send_bad(5).await;
    common::wait_until(LONG, || async { env.message_count(&lot).await == 1 }).await;
    pod.stop().await;
}
