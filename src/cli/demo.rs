//! `taskmill demo`: migrate, start every role in this process, submit one job of
//! `--tasks` tasks (every `--fail-every`th fails its first attempt and succeeds on
//! retry) — or, with `--wordcount DIR`, the built-in map → reduce word count over the
//! files in DIR — wait for its event, and print a summary.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::builtin;
use crate::store::Store;
use crate::{CancellationToken, Client, Config, JobRequest, Pod};
use clap::Args;
use serde_json::{json, Value};

use super::progress::Progress;

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    /// Every Kth task fails once (0: none).
    #[arg(long, default_value_t = 10)]
    pub fail_every: usize,
    #[arg(long, default_value_t = 500)]
    pub retry_delay_ms: u64,
    /// Handlers at once (and prefetch, the batch size of claims and outcomes).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Count the words of the files in DIR (not its subdirectories) with the built-in
    /// map → reduce job `taskmill.wordcount`: one map task per file.
    #[arg(long, value_name = "DIR")]
    pub wordcount: Option<PathBuf>,
    /// Serve the dashboard, probes and metrics here while the demo runs (off by
    /// default: a demo beside running pods would find their port taken).
    #[arg(long)]
    pub http_addr: Option<std::net::SocketAddr>,
}

/// The demo's job: failing-once tasks, or a word count of a directory's files.
fn demo_request(args: &DemoArgs) -> anyhow::Result<JobRequest> {
    let Some(dir) = &args.wordcount else {
        let tasks = (1..=args.tasks)
            .map(|n| {
                let fails = args.fail_every > 0 && n % args.fail_every == 0;
                json!({ "n": n, "times": u8::from(fails) })
            })
            .collect();
        let mut request = JobRequest::new(builtin::FAIL, tasks);
        request.retry_delay_ms = args.retry_delay_ms;
        return Ok(request);
    };
    Ok(JobRequest::new(builtin::WORDCOUNT, texts_in(dir)?))
}

/// The word count's tasks: one per file of `dir` that is text, in name order.
fn texts_in(dir: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut tasks = Vec::with_capacity(paths.len());
    for path in &paths {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        // Words are counted in text: a file that is not UTF-8 (an image, say) is left
        // out rather than counted as the letters its bytes happen to hold.
        match String::from_utf8(bytes) {
            Ok(text) => tasks.push(json!({ "text": text })),
            Err(_) => eprintln!("skipping {}: not UTF-8 text", path.display()),
        }
    }
    Ok(tasks)
}

/// The word count's figures and its ten most common words.
fn print_word_count(result: &Value) {
    let counts = result["counts"].as_object().cloned().unwrap_or_default();
    let mut common: Vec<(&String, u64)> = counts
        .iter()
        .map(|(word, count)| (word, count.as_u64().unwrap_or(0)))
        .collect();
    common.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let top: Vec<String> = common
        .iter()
        .take(10)
        .map(|(word, count)| format!("{word} {count}"))
        .collect();
    println!(
        "words      {} in all, {} distinct",
        result["total"], result["words"]
    );
    println!("most used  {}", top.join(", "));
}

pub async fn run(
    mut config: Config,
    args: DemoArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<i32> {
    config.concurrency = args.concurrency;
    config.http_addr = args.http_addr;
    // Only an address asked for is served: it is served there or not at all.
    config.http_addr_fallback = false;
    let store = Store::connect(&config.database_url, config.db_pool_size).await?;
    store.migrate().await?;
    let pod_token = shutdown.child_token();
    let pod = tokio::spawn(
        Pod::builder()
            .config(config.clone())
            .store(store.clone().into())
            .build()
            .run(pod_token.clone()),
    );
    let client = Client::connect(&config)
        .await?
        .with_store(store.clone().into());
    let mut request = demo_request(&args)?;
    let task_count = request.tasks.as_ref().map_or(0, Vec::len);
    let job_id = uuid::Uuid::new_v4().to_string();
    request.job_id = Some(job_id.clone());

    let started = Instant::now();
    let watch = client.watch(&job_id).await?;
    client.submit(request).await?;
    println!("submitted job {job_id} with {task_count} tasks");
    let progress = Progress::follow(config.database_url.clone(), job_id.clone());
    let event = tokio::select! {
        event = watch.event() => event.map_err(anyhow::Error::from),
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    let wall = started.elapsed();
    progress.finish();
    let event = event?;

    let attempts = store.total_attempts(&job_id).await?;
    println!();
    println!("job        {}", event.job_id);
    println!("stage      {}", event.stage);
    println!(
        "tasks      {} (done {}, failed {}, cancelled {})",
        event.task_count, event.done, event.failed, event.cancelled
    );
    println!("retries    {}", attempts - event.task_count);
    println!("wall time  {:.2} s", wall.as_secs_f64());
    println!(
        "throughput {:.0} tasks/s",
        event.task_count as f64 / wall.as_secs_f64()
    );
    // Read from the store: a large result is not in the event.
    if let Some(result) = client.job_result(&job_id).await? {
        print_word_count(&result);
    }
    println!(
        "database   {}",
        crate::config::redacted(&config.database_url)
    );

    pod_token.cancel();
    pod.await??;
    client.close().await?;
    Ok(if event.is_done() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_count_reads_text_files_only() {
        let dir = std::env::temp_dir().join(format!("taskmill-demo-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.md"), "hello world").unwrap();
        std::fs::write(dir.join("b.png"), [0x89, b'P', b'N', b'G', 0xff, 0xfe]).unwrap();
        let texts = texts_in(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(texts.unwrap(), vec![json!({ "text": "hello world" })]);
    }
}
