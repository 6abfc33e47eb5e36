//! The Rust snippets of the README and of docs/, in a program that compiles and runs:
//! `tests/docs.rs` checks that every one of them appears here, line for line, so a
//! snippet that stops compiling fails the tests.
//!
//! ```sh
//! cargo run --example readme -- worker   # a pod running `resize` tasks
//! cargo run --example readme -- words    # a pod running the multi-stage `words` job type
//! cargo run --example readme -- submit   # a `resize` job, then one of 25,000 tasks sent in parts
//! ```

use std::collections::BTreeMap;

use serde_json::{json, Value};
use taskmill::{CancellationToken, Pod, TaskContext, TaskError};

async fn resize(ctx: TaskContext) -> Result<serde_json::Value, TaskError> {
    let width = ctx.payload["width"]
        .as_u64()
        .ok_or_else(|| TaskError::permanent("no width"))?;
    Ok(serde_json::json!({ "width": width / 2 }))
}

/// A pod with the `resize` handler, until `shutdown`.
async fn worker(shutdown: CancellationToken) -> Result<(), taskmill::Error> {
    Pod::builder()
        .config(taskmill::Config::from_env()?)
        .handler("resize", resize)
        .build()
        .run(shutdown) // a CancellationToken: cancel it to stop the pod
        .await?;
    Ok(())
}

/// Map: a task's `text` → how often each word occurs in it.
async fn count_words(ctx: TaskContext) -> Result<Value, TaskError> {
    let text = ctx.payload["text"].as_str().unwrap_or_default();
    let mut counts = BTreeMap::<String, u64>::new();
    for word in text.split_whitespace() {
        *counts.entry(word.to_lowercase()).or_default() += 1;
    }
    Ok(json!(counts))
}

/// Reduce: one shard's groups of counts → each word's total.
async fn sum_counts(ctx: TaskContext) -> Result<Value, TaskError> {
    let groups = ctx.payload["groups"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let totals: BTreeMap<String, u64> = groups
        .into_iter()
        .map(|(word, counts)| {
            let counts = counts.as_array().cloned().unwrap_or_default();
            (word, counts.iter().filter_map(Value::as_u64).sum())
        })
        .collect();
    Ok(json!(totals))
}

/// Finalize: every word's total → the job's result.
async fn summarize(ctx: TaskContext) -> Result<Value, TaskError> {
    let words = ctx.payload.as_object().map_or(0, |words| words.len());
    Ok(json!({ "distinct_words": words }))
}

/// A pod with the multi-stage `words` job type, until `shutdown`.
async fn words(shutdown: CancellationToken) -> Result<(), taskmill::Error> {
    let words = taskmill::JobType::new("words")
        .splitter(|params| Ok(vec![params.clone()])) // optional: tasks from params
        .map(count_words) // → {"word": 3, ...}
        .reduce(sum_counts) // {"shard", "groups": {"word": [3, 1]}} → {"word": 4}
        .reduce_shards(16)
        .finalizer(summarize); // optional: {"word": 4, ...} → the job's result
    let pod = Pod::builder().job_type(words);
    pod.config(taskmill::Config::from_env()?)
        .build()
        .run(shutdown)
        .await
}

/// A `resize` job waited for, then one of 25,000 tasks pushed one at a time.
async fn submit() -> Result<(), taskmill::Error> {
    let tasks = vec![json!({ "width": 640 }), json!({ "width": 1024 })];
    let client = taskmill::Client::connect(&taskmill::Config::from_env()?).await?;
    let job_id = client
        .submit(taskmill::JobRequest::new("resize", tasks))
        .await?;
    let event = client.wait(&job_id).await?; // or client.watch(&id) before submit
    println!("{job_id}: {}", event.stage);

    let mut job = client.open_job(taskmill::JobRequest::new("resize", Vec::new()))?;
    for task in tasks_from_somewhere() {
        job.push(&task).await?;
    }
    let job_id = job.seal().await?;
    println!("{job_id}: {}", client.wait(&job_id).await?.stage);
    client.close().await
}

fn tasks_from_somewhere() -> impl Iterator<Item = Value> {
    (0..25_000).map(|width| json!({ "width": width }))
}

#[tokio::main]
async fn main() -> Result<(), taskmill::Error> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let shutdown = CancellationToken::new();
    let on_ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_ctrl_c.cancel();
    });
    match std::env::args().nth(1).as_deref() {
        Some("worker") => worker(shutdown).await,
        Some("words") => words(shutdown).await,
        Some("submit") => submit().await,
        _ => {
            eprintln!("usage: readme worker | words | submit");
            std::process::exit(2)
        }
    }
}
