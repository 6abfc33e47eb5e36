//! Results out: a job's task results and errors, streamed from the store by
//! `Client::results` and `taskmill results`, and carried by the job event when the
//! request asks and they fit; the jobs themselves listed by `taskmill jobs`.

mod common;

use futures::TryStreamExt;
use serde_json::{json, Value};
use taskmill::protocol::RESULTS_IN_EVENT_MAX_BYTES;
use taskmill::{
    builtin, FailurePolicy, JobRequest, TaskContext, TaskError, TaskResult, TaskStatus,
};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    a_large_jobs_results_stream_in_task_order,
    a_small_jobs_results_ride_in_its_event,
    results_too_large_for_the_event_are_announced,
    jobs_are_listed_newest_first_and_filtered,
);

/// Squares its payload; fails for good on multiples of 1,000 plus 7.
async fn square(ctx: TaskContext) -> Result<Value, TaskError> {
    let n = ctx.payload.as_i64().unwrap_or(-1);
    if n % 1_000 == 7 {
        return Err(TaskError::permanent(format!("no squares of {n}")));
    }
    Ok(json!({ "square": n * n }))
}

async fn a_large_jobs_results_stream_in_task_order(backend: Backend) {
    const TASKS: i64 = 10_000;
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod().handler("square", square));
    let client = env.client().await;
    let mut request = JobRequest::new("square", (0..TASKS).map(|n| json!(n)).collect());
    request.on_failure = FailurePolicy::Continue;
    request.results_in_event = true;
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!((event.done, event.failed), (TASKS - 10, 10));
    assert_eq!(
        event.results, None,
        "10,000 results are over the event's cap"
    );
    let withheld = event.results_withheld.expect("the event says why");
    assert_eq!(withheld.count, TASKS);
    assert!(
        withheld
            .reason
            .contains(&format!("taskmill results {job_id}")),
        "{}",
        withheld.reason
    );

    let results = all_results(&client, &job_id).await;
    assert_eq!(results.len(), TASKS as usize);
    for (n, result) in (0..TASKS).zip(&results) {
        assert_eq!(i64::from(result.ordinal), n, "in task order");
        if n % 1_000 == 7 {
            assert_eq!(result.status, "failed");
            assert_eq!(result.result, None);
            assert_eq!(
                result.error.as_deref(),
                Some(&*format!("no squares of {n}"))
            );
        } else {
            assert_eq!(result.status, "done");
            assert_eq!(result.result, Some(json!({ "square": n * n })));
            assert_eq!(result.error, None);
        }
    }
    let failed: Vec<i32> = client
        .results(&job_id, Some(TaskStatus::Failed))
        .await
        .unwrap()
        .map_ok(|result| result.ordinal)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(failed, (0..10).map(|k| k * 1_000 + 7).collect::<Vec<_>>());

    // The command prints the same, one JSON object per line.
    let lines = results_command(&env, &["--json", &job_id]).await;
    let printed: Vec<TaskResult> = lines
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(printed, results);
    let text = results_command(&env, &["--status", "failed", &job_id]).await;
    assert_eq!(text.lines().next(), Some("7\tfailed\tno squares of 7"));
    assert_eq!(text.lines().count(), 10);

    match client.results("no-such-job", None).await {
        Err(taskmill::Error::UnknownJob(id)) => assert_eq!(id, "no-such-job"),
        Err(err) => panic!("unexpected error {err}"),
        Ok(_) => panic!("a stream of results for a job that does not exist"),
    }
    pod.stop().await;
}

async fn a_small_jobs_results_ride_in_its_event(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let tasks = vec![
        json!({ "word": "one" }),
        json!({ "times": 9, "permanent": true }),
        json!({ "word": "three" }),
    ];
    let mut request = JobRequest::new(builtin::FAIL, tasks);
    request.on_failure = FailurePolicy::Continue;
    request.results_in_event = true;
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!(event.results_withheld, None);
    let results = event.results.expect("three results fit the event");
    let summary: Vec<(i32, &str, Option<&Value>)> = results
        .iter()
        .map(|r| (r.ordinal, r.status.as_str(), r.result.as_ref()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, "done", Some(&json!({ "word": "one" }))),
            (1, "failed", None),
            (2, "done", Some(&json!({ "word": "three" }))),
        ]
    );
    assert!(results[1].error.as_deref().unwrap().contains("attempt 1"));

    // Without the flag the event is as it always was.
    let quiet = client
        .submit(JobRequest::new(builtin::ECHO, vec![json!(1)]))
        .await
        .unwrap();
    let event = client.wait(&quiet).await.unwrap();
    assert_eq!((event.results, event.results_withheld), (None, None));
    let body = env.store.job_event(&quiet).await.unwrap().unwrap().body;
    assert!(body.get("results").is_none() && body.get("results_withheld").is_none());
    pod.stop().await;
}

async fn results_too_large_for_the_event_are_announced(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    // Few enough tasks, but more bytes than an event carries.
    let big = "x".repeat(RESULTS_IN_EVENT_MAX_BYTES / 8);
    let tasks = (0..10).map(|n| json!({ "n": n, "text": big })).collect();
    let mut request = JobRequest::new(builtin::ECHO, tasks);
    request.results_in_event = true;
    let job_id = client.submit(request).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!(event.results, None);
    let withheld = event.results_withheld.expect("the event says why");
    assert_eq!(withheld.count, 10);
    assert!(withheld.reason.contains("bytes"), "{}", withheld.reason);
    let streamed = all_results(&client, &job_id).await;
    assert_eq!(streamed.len(), 10);
    pod.stop().await;
}

/// Every task's result through `Client::results`.
async fn jobs_are_listed_newest_first_and_filtered(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod().handler("square", square));
    let client = env.client().await;
    let mut ids = Vec::new();
    for tasks in [vec![json!(1), json!(2)], vec![json!(7)], vec![json!(3)]] {
        let id = client
            .submit(JobRequest::new("square", tasks))
            .await
            .unwrap();
        client.wait(&id).await.unwrap();
        ids.push(id);
    }
    let echo = client
        .submit(JobRequest::new(builtin::ECHO, vec![json!("hi")]))
        .await
        .unwrap();
    client.wait(&echo).await.unwrap();

    let listed: Vec<Value> =
        serde_json::from_str(&taskmill_command(&env, &["jobs", "--json"]).await).unwrap();
    let listed_ids: Vec<&str> = listed
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed_ids,
        [echo.as_str(), &ids[2], &ids[1], &ids[0]],
        "newest first"
    );
    assert_eq!(
        (
            &listed[3]["stage"],
            &listed[3]["done"],
            &listed[3]["task_count"]
        ),
        (&json!("done"), &json!(2), &json!(2))
    );
    let failed: Vec<Value> = serde_json::from_str(
        &taskmill_command(&env, &["jobs", "--json", "--stage", "failed"]).await,
    )
    .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (&failed[0]["job_id"], &failed[0]["failed"]),
        (&json!(ids[1]), &json!(1))
    );
    let table = taskmill_command(&env, &["jobs", "--type", "square", "--limit", "2"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two jobs: {table}");
    assert!(
        lines[1].starts_with(&ids[2]) && lines[1].contains("1/1"),
        "{table}"
    );
    assert!(
        lines[2].starts_with(&ids[1]) && lines[2].contains("failed"),
        "{table}"
    );
    client.close().await.unwrap();
    pod.stop().await;
}

async fn all_results(client: &taskmill::Client, job_id: &str) -> Vec<TaskResult> {
    client
        .results(job_id, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// What `taskmill results ARGS` prints.
async fn results_command(env: &TestEnv, args: &[&str]) -> String {
    let mut command = vec!["results"];
    command.extend_from_slice(args);
    taskmill_command(env, &command).await
}

/// What `taskmill ARGS` prints, run on the test's database.
async fn taskmill_command(env: &TestEnv, args: &[&str]) -> String {
    let output = tokio::time::timeout(
        LONG,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmill"))
            .args(args)
            .env("DATABASE_URL", &env.config.database_url)
            .output(),
    )
    .await
    .expect("taskmill ends")
    .expect("taskmill runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}
