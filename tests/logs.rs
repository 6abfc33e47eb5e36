//! The binary's log lines: JSON lines when stderr is not a terminal, and every line of
//! a task's attempt — the handler's own included — carries its job and task ids.

mod common;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use taskmill::{builtin, JobRequest};

use common::{Backend, TestEnv};

on_both_backends!(a_workers_json_lines_carry_the_job_and_task_ids);

async fn a_workers_json_lines_carry_the_job_and_task_ids(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmill"))
        .args(["worker", "--no-migrate"])
        .env("AMQP_URL", &env.config.amqp_url)
        .env("DATABASE_URL", &env.config.database_url)
        .env("TASKMILL_PREFIX", &env.config.prefix)
        .env("RUST_LOG", "warn,taskmill=info")
        .env("TASKMILL_HTTP_ADDR", "127.0.0.1:0")
        .env_remove("TASKMILL_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("taskmill worker starts");
    let client = env.client().await;
    let request = JobRequest::new(
        builtin::FAIL,
        vec![json!({ "times": 1, "permanent": true })],
    );
    let job_id = client.submit(request).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(60), client.wait(&job_id))
        .await
        .expect("the job ends")
        .unwrap();
    assert_eq!(event.stage, "failed");
    let task_id = env.store.tasks_of_job(&job_id).await.unwrap()[0].id;

    let pid = worker.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(60), worker.wait_with_output())
        .await
        .expect("the worker stops")
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let failed = lines
        .iter()
        .find(|line| line["fields"]["message"] == "task failed for good")
        .unwrap_or_else(|| panic!("no line says the task failed: {stderr}"));
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["span"]["name"], "task");
    assert_eq!(failed["span"]["job_id"], json!(job_id));
    assert_eq!(failed["span"]["task_id"], json!(task_id));
    client.close().await.unwrap();
}
