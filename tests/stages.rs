//! Multi-stage jobs (map → reduce → finalize) against real RabbitMQ and a real
//! database: the built-in word count over a generated corpus, per shard and per key,
//! racing completion checks, a phase change whose maker dies before feeding, and the
//! rules for empty and malformed stage output.

mod common;

use std::collections::BTreeMap;

use futures::future::join_all;
use serde_json::{json, Value};
use taskmill::builtin::{self, WORDCOUNT};
use taskmill::protocol::STAGE;
use taskmill::{Error as TaskmillError, JobRequest, JobType, TaskContext};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    word_count_equals_a_direct_count,
    racing_checks_make_the_next_phase_once_and_an_orphan_is_fed,
    a_map_stage_without_output_moves_straight_on,
    bad_stage_output_fails_the_job,
    every_payload_a_job_makes_is_capped,
);

/// `files` texts of 40–80 words each from a vocabulary of 500, deterministic.
fn corpus(files: usize) -> Vec<String> {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..files)
        .map(|_| {
            let words = 40 + next() % 41;
            (0..words)
                .map(|_| match next() % 500 {
                    0 => "Ünïcode,".to_owned(),
                    n => format!("w{n}"),
                })
                .collect::<Vec<_>>()
                .join(if next() % 5 == 0 { "\n" } else { " " })
        })
        .collect()
}

/// The word count's result, computed directly.
fn direct_count(texts: &[String]) -> Value {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for text in texts {
        for word in builtin::words(text) {
            *counts.entry(word).or_default() += 1;
        }
    }
    let total: u64 = counts.values().sum();
    json!({ "words": counts.len(), "total": total, "counts": counts })
}

fn wordcount_request(texts: &[String]) -> JobRequest {
    let mut request = JobRequest::new(WORDCOUNT, vec![]);
    request.tasks = None;
    request.params = json!({ "texts": texts });
    request
}

async fn word_count_equals_a_direct_count(backend: Backend) {
    const FILES: usize = 300;
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let texts = corpus(FILES);
    let expected = direct_count(&texts);

    let sharded = client.submit(wordcount_request(&texts)).await.unwrap();
    let mut per_key = wordcount_request(&texts);
    per_key.reduce_per_key = Some(true);
    let per_key = client.submit(per_key).await.unwrap();

    let keys = expected["words"].as_u64().unwrap() as usize;
    for (job_id, reduce_tasks) in [(&sharded, 16), (&per_key, keys)] {
        let event = client.wait(job_id).await.unwrap();
        assert_eq!(event.event, "job.done", "{event:?}");
        assert_eq!(event.result.as_ref(), Some(&expected), "job {job_id}");
        let job = env.store.job(job_id).await.unwrap().unwrap();
        assert_eq!(job.result.as_ref(), Some(&expected));
        assert_eq!(job.phase.as_deref(), Some("finalize"));
        // Map tasks, then the reduce tasks, then one finalize task, each run once.
        let rows = env.store.tasks_of_job(job_id).await.unwrap();
        assert_eq!(rows.len(), FILES + reduce_tasks + 1);
        assert_eq!(job.task_count as usize, rows.len());
        assert_eq!(job.done_count as usize, rows.len());
        let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
        for row in &rows {
            assert_eq!((row.status.as_str(), row.attempts), ("done", 1));
            *by_type.entry(row.task_type.as_str()).or_default() += 1;
        }
        assert_eq!(
            by_type,
            BTreeMap::from([
                (WORDCOUNT, FILES),
                ("taskmill.wordcount.finalize", 1),
                ("taskmill.wordcount.reduce", reduce_tasks),
            ])
        );
    }
    // Each job: two job.stage events (reduce, finalize), then one job.done.
    let all = events.wait_for(6, LONG).await;
    for job_id in [&sharded, &per_key] {
        let mine: Vec<(&str, Option<&str>)> = all
            .iter()
            .filter(|event| &event.job_id == job_id)
            .map(|event| (event.event.as_str(), event.phase.as_deref()))
            .collect();
        assert_eq!(
            mine,
            vec![
                (STAGE, Some("reduce")),
                (STAGE, Some("finalize")),
                ("job.done", None)
            ]
        );
    }
    pod.stop().await;
}

/// Eight completion checks race on a job whose map stage is over: one makes the
/// reduce tasks, the others find them made. Nobody feeds them (the check's maker is
/// gone, as if it died right after its commit): an intake's orphan scan does, without
/// the sweeper.
async fn racing_checks_make_the_next_phase_once_and_an_orphan_is_fed(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let no_completion = env.start(env.pod().roles(common::INTAKE_AND_WORKER));
    let client = env.client().await;
    let texts = corpus(40);
    let job_id = client.submit(wordcount_request(&texts)).await.unwrap();
    common::wait_until(LONG, || async {
        let job = env.store.job(&job_id).await.unwrap();
        job.is_some_and(|job| job.task_count == 40 && job.done_count == 40)
    })
    .await;

    let checks =
        join_all((0..8).map(|_| env.store.check_jobs(std::slice::from_ref(&job_id)))).await;
    let moved: usize = checks
        .into_iter()
        .map(|checked| checked.unwrap().advanced.len())
        .sum();
    assert_eq!(moved, 1, "exactly one check moved the job on");
    let job = env.store.job(&job_id).await.unwrap().unwrap();
    assert_eq!(job.phase.as_deref(), Some("reduce"));
    assert_eq!((job.phase_first_ordinal, job.task_count), (40, 56));
    assert!(!job.tasks_published);
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    assert_eq!(rows.len(), 56);

    no_completion.stop().await;
    let no_sweeper = env.start(env.pod().roles(common::NO_SWEEPER));
    // Without a sweeper, only a feeder's orphan scan can publish the reduce tasks.
    let event = tokio::time::timeout(LONG, client.wait(&job_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.result, Some(direct_count(&texts)));
    no_sweeper.stop().await;
}

/// Empty texts make no words: no reduce tasks, and the finalizer gets `{}`.
async fn a_map_stage_without_output_moves_straight_on(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(env.pod());
    let client = env.client().await;
    let texts = vec![String::new(), " ,. ".to_owned()];
    let job_id = client.submit(wordcount_request(&texts)).await.unwrap();
    let event = client.wait(&job_id).await.unwrap();
    assert_eq!(event.event, "job.done");
    assert_eq!(
        event.result,
        Some(json!({ "words": 0, "total": 0, "counts": {} }))
    );
    let rows = env.store.tasks_of_job(&job_id).await.unwrap();
    let types: Vec<&str> = rows.iter().map(|row| row.task_type.as_str()).collect();
    assert_eq!(
        types,
        vec![WORDCOUNT, WORDCOUNT, "taskmill.wordcount.finalize"]
    );
    pod.stop().await;
}

/// A map task that returns a list instead of an object fails the job at the phase
/// change, with the reason; a reduce shard that does the same fails it at the end; a
/// map task that fails fails it as for any job; a request for reduce settings a job
/// type without a reduce stage is refused.
async fn bad_stage_output_fails_the_job(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pod = env.start(
        env.pod()
            .job_type(
                JobType::new("lists")
                    .map(|ctx: TaskContext| async move { Ok(json!([ctx.payload])) })
                    .reduce(|_ctx: TaskContext| async { Ok(json!({})) }),
            )
            .job_type(
                JobType::new("bad-reduce")
                    .map(|_ctx: TaskContext| async { Ok(json!({ "k": 1 })) })
                    .reduce(|_ctx: TaskContext| async { Ok(json!("not an object")) }),
            ),
    );
    let client = env.client().await;

    let lists = client
        .submit(JobRequest::new("lists", vec![json!(1), json!(2)]))
        .await
        .unwrap();
    let event = client.wait(&lists).await.unwrap();
    assert_eq!(event.event, "job.failed");
    let error = event.first_error.unwrap();
    assert!(error.contains("map task 0 returned [1]"), "{error}");

    let bad_reduce = client
        .submit(JobRequest::new("bad-reduce", vec![json!(1)]))
        .await
        .unwrap();
    let event = client.wait(&bad_reduce).await.unwrap();
    assert_eq!(event.event, "job.failed");
    let error = event.first_error.unwrap();
    assert!(
        error.contains("reduce task 1 returned \"not an object\""),
        "{error}"
    );

    let mut broken = JobRequest::new(WORDCOUNT, vec![json!({ "text": "fine" }), json!({})]);
    broken.max_retries = 0;
    let broken = client.submit(broken).await.unwrap();
    let event = client.wait(&broken).await.unwrap();
    assert_eq!((event.event.as_str(), event.failed), ("job.failed", 1));
    assert_eq!(
        env.store.tasks_of_job(&broken).await.unwrap().len(),
        2,
        "no reduce tasks"
    );

    // Watched before it is submitted: a rejection is not stored, only published.
    let mut misplaced = JobRequest::new(builtin::ECHO, vec![json!(1)]);
    misplaced.job_id = Some("misplaced-reduce".to_owned());
    misplaced.reduce_shards = Some(4);
    let watch = client.watch("misplaced-reduce").await.unwrap();
    client.submit(misplaced).await.unwrap();
    match tokio::time::timeout(LONG, watch.event()).await.unwrap() {
        Err(TaskmillError::Rejected { reason, .. }) => {
            assert!(reason.contains("has no reduce stage"), "{reason}")
        }
        other => panic!("not rejected: {other:?}"),
    }
    pod.stop().await;
}

/// With a payload cap of 2,000 bytes: a reduce shard's input, the finalize task's
/// input, a job's result and a task's result over it each fail their job, saying which
/// and how large; a request with a task payload over it is rejected. Nothing over the
/// cap is stored or sent, so nothing is parked and re-sent.
async fn every_payload_a_job_makes_is_capped(backend: Backend) {
    const CAP: usize = 2_000;
    let env = TestEnv::new(backend).await;
    let mut config = env.config.clone();
    config.max_payload_bytes = CAP;
    let pod = env.start(
        env.pod()
            .config(config)
            .job_type(
                JobType::new("spread")
                    .map(|ctx: TaskContext| async move {
                        let n = ctx.payload.as_u64().unwrap_or(0);
                        let keys: serde_json::Map<String, Value> = (0..20)
                            .map(|k| (format!("a-rather-long-key-{n}-{k}"), json!(k)))
                            .collect();
                        Ok(Value::Object(keys))
                    })
                    .reduce(|ctx: TaskContext| async move { Ok(ctx.payload["groups"].clone()) }),
            )
            .handler("big-result", |_ctx: TaskContext| async move {
                Ok(json!("x".repeat(CAP)))
            }),
    );
    let client = env.client().await;
    let texts = corpus(20);
    let over = |error: &str, what: &str| {
        assert!(
            error.contains(what) && error.contains(&format!("over the cap of {CAP} bytes")),
            "{what}: {error}"
        );
    };

    let mut one_shard = wordcount_request(&texts);
    one_shard.reduce_shards = Some(1);
    let one_shard = client.submit(one_shard).await.unwrap();
    let event = client.wait(&one_shard).await.unwrap();
    assert_eq!(event.event, "job.failed");
    over(
        &event.first_error.unwrap(),
        "the input of reduce task 20 (shard 0 of 1)",
    );
    assert_eq!(env.store.tasks_of_job(&one_shard).await.unwrap().len(), 20);

    let sharded = client.submit(wordcount_request(&texts)).await.unwrap();
    let event = client.wait(&sharded).await.unwrap();
    assert_eq!(event.event, "job.failed");
    over(&event.first_error.unwrap(), "the finalize task's input");

    let spread = client
        .submit(JobRequest::new(
            "spread",
            (0..10).map(|n| json!(n)).collect(),
        ))
        .await
        .unwrap();
    let event = client.wait(&spread).await.unwrap();
    assert_eq!(event.event, "job.failed");
    over(&event.first_error.unwrap(), "the job's result");

    let mut big = JobRequest::new("big-result", vec![json!(1)]);
    big.max_retries = 3;
    let big = client.submit(big).await.unwrap();
    let event = client.wait(&big).await.unwrap();
    assert_eq!((event.event.as_str(), event.failed), ("job.failed", 1));
    over(&event.first_error.unwrap(), "the result of task");
    let rows = env.store.tasks_of_job(&big).await.unwrap();
    assert_eq!(
        rows[0].attempts, 1,
        "not retried: it would be as large again"
    );

    let mut heavy = JobRequest::new(builtin::ECHO, vec![json!("y".repeat(CAP))]);
    heavy.job_id = Some("heavy-payload".to_owned());
    let watch = client.watch("heavy-payload").await.unwrap();
    client.submit(heavy).await.unwrap();
    match tokio::time::timeout(LONG, watch.event()).await.unwrap() {
        Err(TaskmillError::Rejected { reason, .. }) => over(&reason, "the payload of task 0"),
        other => panic!("not rejected: {other:?}"),
    }
    let parking = env.topology().parking_queue();
    assert_eq!(
        env.message_count(&parking).await,
        1,
        "the rejected request alone"
    );
    pod.stop().await;
}
