//! Retention: ended jobs leave with all their rows once their event is delivered and
//! they are past their retention, by the cleaner and by `taskmill prune`; nothing else
//! ever leaves, and what stays is untouched.

mod common;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use taskmill::config::Retention;
use taskmill::store::{RemovalRule, Removed, Rerun};
use taskmill::{builtin, CancellationToken, Config, JobRequest, JobStage, TaskContext, TaskError};

use common::{wait_until, Backend, TestEnv, LONG};

on_both_backends!(
    ended_jobs_leave_whole_and_nothing_else_does,
    a_big_job_leaves_in_batches_and_a_cut_off_removal_is_finished,
    the_cleaner_removes_jobs_past_their_retention,
    prune_removes_by_hand_and_reports,
);

/// Test environments whose `hold` tasks may end.
static RELEASED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Runs until its test releases it: a job that stays running.
async fn hold(ctx: TaskContext) -> Result<Value, TaskError> {
    let test = ctx.payload["test"].as_str().unwrap_or_default().to_owned();
    while !RELEASED.lock().unwrap().contains(&test) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(json!("released"))
}

async fn boom(_: TaskContext) -> Result<Value, TaskError> {
    Err(TaskError::permanent("boom"))
}

/// Every ended job, kept for no time at all, leaving one by one (no partition goes).
fn nothing_kept() -> RemovalRule {
    let now = chrono::Utc::now();
    [JobStage::Done, JobStage::Failed, JobStage::Cancelled]
        .into_iter()
        .fold(RemovalRule::none(), |rule, stage| rule.with(stage, now))
}

async fn remove_all(env: &TestEnv, rule: &RemovalRule) -> Removed {
    taskmill::retention::remove(&env.store, rule, Duration::MAX, &CancellationToken::new())
        .await
        .unwrap()
}

/// Waits until the job's event is published (and its target, if any, settled).
async fn wait_delivered(env: &TestEnv, job_id: &str) {
    let sql = format!(
        "SELECT COUNT(*) AS n FROM job_events WHERE job_id = '{job_id}' \
         AND published_at IS NOT NULL AND target_retry_at IS NULL"
    );
    wait_until(LONG, || async { env.count(&sql).await == 1 }).await;
}

async fn ended_jobs_leave_whole_and_nothing_else_does(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod().handler("hold", hold).handler("boom", boom));
    let done = env
        .submit(builtin::ECHO, vec![json!(1), json!(2), json!(3)])
        .await;
    let failed = env.submit("boom", vec![json!(1), json!(2)]).await;
    let unpublished = env.submit(builtin::ECHO, vec![json!(1)]).await;
    let retrying_target = env.submit(builtin::ECHO, vec![json!(1)]).await;
    let running = env
        .submit("hold", vec![json!({ "test": env.name }); 2])
        .await;
    for job_id in [&done, &failed, &unpublished, &retrying_target] {
        env.wait_for_end(job_id, LONG).await;
        wait_delivered(&env, job_id).await;
    }
    // Events not yet delivered: one never published, one whose target waits for a
    // retry.
    env.execute_sql(&[
        &format!("UPDATE job_events SET published_at = NULL WHERE job_id = '{unpublished}'"),
        &format!(
            "UPDATE job_events SET target_retry_at = created_at WHERE job_id = '{retrying_target}'"
        ),
    ])
    .await;
    let kept = [&unpublished, &retrying_target, &running];
    // Rows still changing on their own: the intake marks, once a second, that their
    // tasks went out.
    let published = format!(
        "SELECT COUNT(*) AS n FROM jobs WHERE tasks_published AND id IN ('{unpublished}', '{retrying_target}', '{running}')"
    );
    wait_until(LONG, || async { env.count(&published).await == 3 }).await;
    let mut before = Vec::new();
    for job_id in kept {
        before.push((
            env.store.job(job_id).await.unwrap().unwrap(),
            env.store.tasks_of_job(job_id).await.unwrap(),
        ));
    }

    let rule = nothing_kept();
    let due = env.store.removable_now(&rule).await.unwrap();
    assert_eq!(due, Removed { jobs: 2, tasks: 5 }, "a dry run counts");
    assert_eq!(
        env.rows_of_job(&done).await[1],
        3,
        "a dry run removes nothing"
    );
    let removed = remove_all(&env, &rule).await;
    assert_eq!(removed, Removed { jobs: 2, tasks: 5 });
    for job_id in [&done, &failed] {
        assert_eq!(
            env.rows_of_job(job_id).await,
            [0; 4],
            "job {job_id} left whole"
        );
    }
    for (job_id, (job, tasks)) in kept.iter().zip(&before) {
        assert_eq!(
            &env.store.job(job_id).await.unwrap().unwrap(),
            job,
            "a kept job's row is untouched"
        );
        assert_eq!(
            &env.store.tasks_of_job(job_id).await.unwrap(),
            tasks,
            "a kept job's tasks are untouched"
        );
    }
    assert!(
        env.store.results(&running, None).await.unwrap().is_some(),
        "a kept job's results stay readable"
    );
    let totals: Vec<(String, i64, i64)> = env
        .store
        .removed_totals()
        .await
        .unwrap()
        .into_iter()
        .map(|stage| (stage.stage, stage.jobs, stage.tasks))
        .collect();
    assert_eq!(
        totals,
        [("done".to_owned(), 1, 3), ("failed".to_owned(), 1, 2)]
    );
    assert!(matches!(
        env.store.rerun_job(&failed).await.unwrap(),
        Rerun::UnknownJob
    ));

    // Its id is free again: a new request with it makes a new job of its own tasks,
    // nothing left of the old one's.
    let client = env.client().await;
    let mut again = JobRequest::new(builtin::ECHO, vec![json!("a"), json!("b")]);
    again.job_id = Some(done.clone());
    client.submit(again).await.unwrap();
    let job = env.wait_for_end(&done, LONG).await;
    assert_eq!((job.stage.as_str(), job.task_count), ("done", 2));
    assert_eq!(env.store.tasks_of_job(&done).await.unwrap().len(), 2);
    client.close().await.unwrap();

    // Delivered at last, and ended: they leave too.
    RELEASED.lock().unwrap().push(env.name.clone());
    env.wait_for_end(&running, LONG).await;
    env.execute_sql(&[&format!(
        "UPDATE job_events SET published_at = created_at, target_retry_at = NULL \
         WHERE job_id IN ('{unpublished}', '{retrying_target}')"
    )])
    .await;
    wait_delivered(&env, &running).await;
    wait_delivered(&env, &done).await;
    let removed = remove_all(&env, &nothing_kept()).await;
    assert_eq!(removed, Removed { jobs: 4, tasks: 6 });
    assert_eq!(env.count("SELECT COUNT(*) AS n FROM tasks").await, 0);
    pod.stop().await;
}

async fn a_big_job_leaves_in_batches_and_a_cut_off_removal_is_finished(backend: Backend) {
    const TASKS: u64 = taskmill::retention::TASK_BATCH * 5 / 2;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let job_id = env
        .submit(builtin::ECHO, (0..TASKS).map(|n| json!(n)).collect())
        .await;
    env.wait_for_end(&job_id, LONG).await;
    wait_delivered(&env, &job_id).await;
    pod.stop().await;

    let rule = nothing_kept();
    let batch = taskmill::retention::TASK_BATCH;
    let marked = env.store.remove_ended_step(&rule, batch).await.unwrap();
    assert_eq!(marked, Some(Removed::default()), "too big to go at once");
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert!(job.removal_started_at.is_some());
    assert!(
        env.store.results(&job_id, None).await.unwrap().is_none(),
        "a job being removed has no results to read"
    );
    match env.store.rerun_job(&job_id).await.unwrap() {
        Rerun::Refused(reason) => assert!(reason.contains("being removed"), "{reason}"),
        other => panic!("a job being removed was retried: {other:?}"),
    }
    let first = env.store.remove_ended_step(&rule, batch).await.unwrap();
    assert_eq!(
        first,
        Some(Removed {
            jobs: 0,
            tasks: batch
        })
    );
    assert_eq!(env.rows_of_job(&job_id).await[1] as u64, TASKS - batch);

    // The removing process stops here. Another, under any rule (or none), carries
    // the removal on before anything else.
    let rest = remove_all(&env, &RemovalRule::none()).await;
    assert_eq!(
        rest,
        Removed {
            jobs: 1,
            tasks: TASKS - batch
        }
    );
    assert_eq!(env.rows_of_job(&job_id).await, [0; 4]);
    let totals = env.store.removed_totals().await.unwrap();
    assert_eq!(
        (totals[0].stage.as_str(), totals[0].jobs, totals[0].tasks),
        ("done", 1, TASKS as i64)
    );
}

async fn the_cleaner_removes_jobs_past_their_retention(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let config = Config {
        retention: Retention {
            ended: Some(Duration::from_secs(1)),
            failed: None,
        },
        clean_interval: Duration::from_millis(200),
        // On PostgreSQL jobs leave with their partition: short ones here.
        partition_span: Duration::from_secs(1),
        ..env.config.clone()
    };
    let pod = env.start(env.pod().config(config).handler("boom", boom));
    let failed = env.submit("boom", vec![json!(1)]).await;
    let done = env.submit(builtin::ECHO, vec![json!(1), json!(2)]).await;
    env.wait_for_end(&failed, LONG).await;
    wait_until(LONG, || async {
        env.store.job(&done).await.unwrap().is_none()
    })
    .await;
    assert_eq!(env.rows_of_job(&done).await, [0; 4]);
    // Failed jobs are kept for ever under this retention: ten clean intervals pass,
    // and the failed job is still there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.rows_of_job(&failed).await[..2], [1, 1]);
    pod.stop().await;
}

async fn prune_removes_by_hand_and_reports(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod().handler("boom", boom));
    let done = env.submit(builtin::ECHO, vec![json!(1), json!(2)]).await;
    let failed = env.submit("boom", vec![json!(1)]).await;
    for job_id in [&done, &failed] {
        env.wait_for_end(job_id, LONG).await;
        wait_delivered(&env, job_id).await;
    }
    pod.stop().await;

    let dry = env.cli(&["prune", "--older-than", "0s", "--dry-run"]);
    assert_eq!(dry, "would remove 2 jobs (3 tasks)");
    let by_stage = env.cli(&["prune", "--older-than", "0s", "--stage", "done"]);
    assert_eq!(by_stage, "removed 1 jobs (2 tasks)");
    assert!(env.store.job(&done).await.unwrap().is_none());
    assert!(env.store.job(&failed).await.unwrap().is_some());
    // At the default retention, a job that ended a moment ago stays.
    let at_default = env.cli(&["prune"]);
    assert_eq!(at_default, "removed 0 jobs (0 tasks)");
    let listed = env.cli(&["jobs"]);
    assert!(
        listed.contains("removed past their retention: 1 done (2 tasks"),
        "{listed}"
    );
    let running = env.cli_fails(&["prune", "--stage", "running"]);
    assert!(running.contains("has not ended"), "{running}");
    let seen: HashSet<&str> = listed.lines().collect();
    assert!(seen.iter().any(|line| line.contains(&failed)));
}

mod postgres_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cleaner_keeps_the_partitions_few() {
        super::the_cleaner_keeps_the_partitions_few(super::Backend::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_go_whole_and_kept_jobs_are_set_aside() {
        super::partitions_go_whole_and_kept_jobs_are_set_aside(super::Backend::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_partitioned_table_keeps_the_rows_it_was_made_from() {
        super::the_partitioned_table_keeps_the_rows_it_was_made_from(super::Backend::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_by_id_probe_each_partitions_index_without_statistics() {
        super::lookups_by_id_probe_each_partitions_index_without_statistics().await
    }
}

/// Partitions of the tasks table that lack a unique index on `id` alone.
const LEAVES_WITHOUT_ID_INDEX: &str = "SELECT COUNT(*) AS n FROM pg_inherits i \
    WHERE i.inhparent = 'tasks'::regclass AND NOT EXISTS (SELECT 1 FROM pg_index x \
    JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0] \
    WHERE x.indrelid = i.inhrelid AND x.indisunique AND x.indnkeyatts = 1 AND a.attname = 'id')";

/// Claims and finishes look up tasks by id alone, a batch at a time. With no
/// statistics on a partition (a fresh one, or any with autovacuum off), only a unique
/// index on `id` tells the planner that an id finds one row; without it, it expects
/// hundreds per id and, for a batch, reads the whole partition instead of probing its
/// index. Every partition, the ones the cleaner makes included, has that index.
async fn lookups_by_id_probe_each_partitions_index_without_statistics() {
    let env = TestEnv::new(Backend::Postgres).await;
    let made = env
        .store
        .make_partitions(
            Duration::from_secs(3_600),
            chrono::Utc::now() + chrono::Duration::hours(2),
        )
        .await
        .unwrap();
    assert!(made > 0);
    assert_eq!(env.count(LEAVES_WITHOUT_ID_INDEX).await, 0);
    let made_partition = env
        .texts(
            "SELECT name FROM task_partitions WHERE name <> 'tasks_before_migration' \
             ORDER BY starts_at LIMIT 1",
        )
        .await
        .remove(0);
    // 150,000 tasks in the partition the cleaner made and as many in the default one:
    // a size at which reading a whole partition costs several times 256 probes.
    env.execute_sql(&[&format!(
        "INSERT INTO tasks (job_id, ordinal, type, payload, status, created_at, updated_at, \
         filed_at) SELECT 'probe', g, 'taskmill.echo', '{{}}', 'pending', now(), now(), \
         CASE WHEN g <= 150000 THEN (SELECT starts_at FROM task_partitions \
           WHERE name = '{made_partition}') ELSE '2100-01-01 00:00:00+00' END \
         FROM generate_series(1, 300000) g"
    )])
    .await;
    for (partition, first) in [(made_partition.as_str(), 1), ("tasks_default", 150_001)] {
        let ids = env
            .texts(&format!(
                "SELECT array_agg(id)::text FROM tasks WHERE job_id = 'probe' \
                 AND ordinal BETWEEN {first} AND {}",
                first + 255
            ))
            .await
            .remove(0);
        let one_id = ids
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .next()
            .unwrap();
        let lookups = [
            (
                format!("SELECT id FROM tasks WHERE id = {one_id}"),
                "rows=1 ",
            ),
            (
                format!("SELECT id FROM tasks WHERE id = ANY('{ids}'::bigint[])"),
                "",
            ),
        ];
        for (statement, estimate) in lookups {
            let plan = env.texts(&format!("EXPLAIN {statement}")).await.join("\n");
            let scans: Vec<&str> = plan
                .lines()
                .filter(|line| line.contains("Scan") && line.contains(&format!(" on {partition} ")))
                .collect();
            assert!(
                !scans.is_empty()
                    && scans
                        .iter()
                        .all(|line| !line.contains("Seq Scan") && line.contains(estimate)),
                "{partition} is not probed by its index as it should be:\n{plan}"
            );
        }
    }
}
/// Which of the tasks table's partitions hold the job's tasks.
async fn partitions_of(env: &TestEnv, job_id: &str) -> Vec<String> {
    use sea_orm::{ConnectionTrait, Database};
    let db = Database::connect(&env.config.database_url).await.unwrap();
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT DISTINCT tableoid::regclass::text AS name FROM tasks WHERE job_id = '{job_id}'"
            ),
        ))
        .await
        .unwrap();
    db.close().await.unwrap();
    rows.iter()
        .map(|row| row.try_get::<String>("", "name").unwrap())
        .collect()
}

/// Jobs that may leave go with their partition, whole; a failed job kept longer has
/// its tasks set aside first, and can still be read and retried; a running job's
/// partition stays.
async fn partitions_go_whole_and_kept_jobs_are_set_aside(backend: Backend) {
    const SPAN: Duration = Duration::from_secs(1);
    let env = TestEnv::new(backend).await;
    let config = Config {
        retention: Retention::FOREVER,
        clean_interval: Duration::from_millis(100),
        partition_span: SPAN,
        ..env.config.clone()
    };
    let pod = env.start(
        env.pod()
            .config(config)
            .handler("hold", hold)
            .handler("boom", boom),
    );
    env.wait_for_partition().await;
    let done = env
        .submit(builtin::ECHO, vec![json!(1), json!(2), json!(3)])
        .await;
    let failed = env.submit("boom", vec![json!(1)]).await;
    let also_done = env.submit(builtin::ECHO, vec![json!(1), json!(2)]).await;
    for job_id in [&done, &failed, &also_done] {
        env.wait_for_end(job_id, LONG).await;
        wait_delivered(&env, job_id).await;
    }
    let mut dropped = Vec::new();
    for job_id in [&done, &also_done] {
        dropped.extend(partitions_of(&env, job_id).await);
    }
    assert!(
        dropped.iter().all(|name| name != "tasks_default"),
        "{dropped:?}"
    );
    // Time itself must pass: the next job goes to a later span than the ended ones.
    tokio::time::sleep(SPAN).await;
    env.wait_for_partition().await;
    let running = env.submit("hold", vec![json!({ "test": env.name })]).await;
    let running_tasks = common::wait_for_value(LONG, || async {
        let tasks = env.store.tasks_of_job(&running).await.unwrap();
        tasks
            .iter()
            .any(|task| task.status == "running")
            .then_some(tasks)
    })
    .await;
    // Time passes again: the running job's span is over too, and its partition must
    // still stay.
    tokio::time::sleep(SPAN).await;

    // A failed job whose retention ends within a span holds its partition: its tasks
    // are not moved aside, and the jobs beside it wait to leave with the partition.
    let holding = taskmill::retention::rule(
        &Retention {
            ended: Some(Duration::ZERO),
            failed: Some(Duration::from_secs(3_600)),
        },
        Duration::from_secs(7_200),
        chrono::Utc::now(),
    );
    assert_eq!(remove_all(&env, &holding).await, Removed::default());
    assert_ne!(partitions_of(&env, &failed).await, ["tasks_kept"]);
    assert_eq!(
        env.rows_of_job(&done).await[1],
        3,
        "held with the failed job"
    );

    let rule = taskmill::retention::rule(
        &Retention {
            ended: Some(Duration::ZERO),
            failed: None,
        },
        SPAN,
        chrono::Utc::now(),
    );
    let removed = remove_all(&env, &rule).await;
    assert_eq!(removed, Removed { jobs: 2, tasks: 5 });
    for job_id in [&done, &also_done] {
        assert_eq!(env.rows_of_job(job_id).await, [0; 4]);
    }
    for name in &dropped {
        let left = env
            .count(&format!(
                "SELECT COUNT(*) AS n FROM pg_class WHERE relname = '{name}'"
            ))
            .await;
        assert_eq!(left, 0, "partition {name} is dropped");
    }
    assert_eq!(
        env.count("SELECT COUNT(*) AS n FROM task_partitions WHERE detached_at IS NOT NULL")
            .await,
        0
    );
    // The failed job, kept for ever, is whole: its tasks set aside, readable, and
    // it can run again.
    assert_eq!(partitions_of(&env, &failed).await, ["tasks_kept"]);
    let job = env.store.job(&failed).await.unwrap().unwrap();
    assert!(job.tasks_kept);
    assert_eq!(env.rows_of_job(&failed).await[..3], [1, 1, 1]);
    assert!(env.store.results(&failed, None).await.unwrap().is_some());
    match env.store.rerun_job(&failed).await.unwrap() {
        Rerun::Started { tasks, .. } => assert_eq!(tasks, 1),
        other => panic!("the kept job was not retried: {other:?}"),
    }
    let job = wait_for_run(&env, &failed, 2).await;
    assert_eq!(job.stage, "failed");
    // The running job's partition stays, with it.
    assert_eq!(
        env.store.tasks_of_job(&running).await.unwrap().len(),
        running_tasks.len()
    );
    RELEASED.lock().unwrap().push(env.name.clone());
    env.wait_for_end(&running, LONG).await;
    pod.stop().await;
}

/// Waits until the job has ended in run `run`.
async fn wait_for_run(env: &TestEnv, job_id: &str, run: i32) -> taskmill::store::job::Model {
    common::wait_for_value(LONG, || async {
        let job = env.store.job(job_id).await.unwrap()?;
        let ended = job.stage.parse::<JobStage>().unwrap().is_terminal();
        (ended && job.run == run).then_some(job)
    })
    .await
}

/// Migration 17 makes the partitioned table from the rows already there: each kept,
/// filed at its job's creation, and task ids go on after the last one.
async fn the_partitioned_table_keeps_the_rows_it_was_made_from(backend: Backend) {
    use migration::{Migrator, MigratorTrait};
    let env = TestEnv::unmigrated(backend).await;
    let db = sea_orm::Database::connect(&env.config.database_url)
        .await
        .unwrap();
    Migrator::up(&db, Some(16)).await.unwrap();
    let mut statements = Vec::new();
    for (job, stage, created) in [
        ("old-done", "done", "2026-11-30 10:00:00+00"),
        ("old-running", "running", "2026-12-01 11:00:00+00"),
    ] {
        statements.push(format!(
            "INSERT INTO jobs (id, type, queue, stage, params, max_retries, retry_delay_ms, \
             on_failure, task_count, done_count, failed_count, cancelled_count, tasks_published, \
             created_at, updated_at, finished_at, results_in_event, phase_first_ordinal, run) \
             VALUES ('{job}', 'taskmill.echo', 'default', '{stage}', 'null', 3, 5000, 'fail_fast', \
             3, 0, 0, 0, true, '{created}', '{created}', \
             {finished}, false, 0, 1)",
            finished = if stage == "done" { "now()" } else { "NULL" },
        ));
        for ordinal in 0..3 {
            statements.push(format!(
                "INSERT INTO tasks (job_id, ordinal, type, payload, status, attempts, deliveries, \
                 version, created_at, updated_at, result, claimed_by, lease_until) VALUES ('{job}', \
                 {ordinal}, 'taskmill.echo', '{ordinal}', '{status}', 1, 1, 1, '{created}', \
                 '{created}', {result}, {claimed_by}, {lease_until})",
                // The running job's tasks are claimed, their lease live: the sweeper
                // leaves them be.
                status = if stage == "done" { "done" } else { "running" },
                claimed_by = if stage == "done" { "NULL" } else { "'a worker'" },
                lease_until = if stage == "done" { "NULL" } else { "now() + interval '1 day'" },
                result = if stage == "done" { "'{\"n\": 1}'" } else { "NULL" },
            ));
        }
    }
    let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
    env.execute_sql(&statements).await;
    let snapshot = "SELECT COUNT(*) AS n FROM tasks WHERE \
        (job_id = 'old-done' AND status = 'done' AND result = '{\"n\": 1}') OR \
        (job_id = 'old-running' AND status = 'running' AND result IS NULL)";
    assert_eq!(env.count(snapshot).await, 6);
    let last_id = env.count("SELECT MAX(id) AS n FROM tasks").await;

    env.store.migrate().await.unwrap();
    assert_eq!(env.count(snapshot).await, 6, "every row kept");
    assert_eq!(
        env.count(
            "SELECT COUNT(*) AS n FROM tasks t JOIN jobs j ON j.id = t.job_id \
             WHERE t.filed_at = j.created_at AND t.tableoid = 'tasks_before_migration'::regclass"
        )
        .await,
        6
    );
    let ids = "SELECT COUNT(DISTINCT id) AS n FROM tasks WHERE id <= 6";
    assert_eq!(env.count(ids).await, 6);
    assert_eq!(
        env.count(LEAVES_WITHOUT_ID_INDEX).await,
        0,
        "migration 18 gives every partition its index on id"
    );
    let before = env.store.tasks_of_job("old-done").await.unwrap();
    assert_eq!(before.len(), 3);

    // New jobs run on the partitioned table, their ids after the old ones.
    let pod = env.start(env.pod());
    let job_id = env.submit(builtin::ECHO, vec![json!("new")]).await;
    let job = env.wait_for_end(&job_id, LONG).await;
    assert_eq!(job.stage, "done");
    let new_tasks = env.store.tasks_of_job(&job_id).await.unwrap();
    assert!(new_tasks[0].id > last_id, "ids go on: {}", new_tasks[0].id);
    pod.stop().await;

    // The old done job leaves; the running one holds the partition and stays.
    let removed = remove_all(
        &env,
        &taskmill::retention::older_than(Duration::ZERO, &[], chrono::Utc::now()),
    )
    .await;
    assert_eq!(removed.tasks, 3 + 1, "the old done job's and the new one's");
    assert_eq!(env.rows_of_job("old-done").await[..2], [0, 0]);
    assert_eq!(env.rows_of_job("old-running").await[..2], [1, 3]);
    db.close().await.unwrap();
}

/// Partitions are bounded: the cleaner makes them two spans ahead and drops each once
/// its span is past the retention and its jobs have left, so however long jobs come,
/// at most the spans ahead, the current one and those within the retention remain.
async fn the_cleaner_keeps_the_partitions_few(backend: Backend) {
    const SPAN: Duration = Duration::from_secs(1);
    let env = TestEnv::new(backend).await;
    let config = Config {
        retention: Retention {
            ended: Some(SPAN),
            failed: Some(SPAN),
        },
        clean_interval: Duration::from_millis(100),
        partition_span: SPAN,
        ..env.config.clone()
    };
    let pod = env.start(env.pod().config(config));
    env.wait_for_partition().await;
    let partitions = "SELECT COUNT(*) AS n FROM task_partitions";
    let mut most = 0;
    let mut spans = HashSet::new();
    // Jobs over eight spans: each span's partition is made, filled and dropped.
    for _ in 0..16 {
        let job_id = env.submit(builtin::ECHO, vec![json!(1), json!(2)]).await;
        env.wait_for_end(&job_id, LONG).await;
        spans.extend(partitions_of(&env, &job_id).await);
        most = std::cmp::max(most, env.count(partitions).await);
        tokio::time::sleep(SPAN / 2).await;
    }
    assert!(spans.len() >= 6, "jobs filed in {spans:?}");
    // Two spans ahead and the current one (three, or four when "now + two spans" is
    // not on a boundary), one within the retention, one waiting for its last job.
    assert!(most <= 6, "{most} partitions at once");
    // The spans the first jobs were filed in are gone.
    let left = env
        .count(
            "SELECT COUNT(*) AS n FROM task_partitions \
             WHERE ends_at < now() - interval '3 seconds'",
        )
        .await;
    assert_eq!(left, 0, "partitions past their retention are dropped");
    pod.stop().await;
}
