//! Built-in task types, usable from any producer:
//!
//! - `taskmill.echo`: the result is the payload;
//! - `taskmill.sleep`: `{"ms": N}` waits N milliseconds;
//! - `taskmill.fail`: `{"times": K, "permanent": bool}` fails its first K attempts
//!   (retryably, unless `permanent`), then echoes the payload;
//! - `taskmill.wordcount`: a map → reduce → finalize job counting the words of texts
//!   (`{"text": ...}` per task, or `params` `{"texts": [...]}`).

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::registry::{HandlerResult, JobType, Registry, TaskContext, TaskError};

/// `taskmill.echo`: its result is its payload.
pub const ECHO: &str = "taskmill.echo";
/// `taskmill.sleep`: `{"ms": N}` waits N milliseconds and returns `{"slept_ms": N}`;
/// stopped by its timeout, it fails retryably.
pub const SLEEP: &str = "taskmill.sleep";
/// `taskmill.fail`: `{"times": K, "permanent": bool}` fails attempts 1 to K
/// (permanently if `permanent`), then returns its payload.
pub const FAIL: &str = "taskmill.fail";

/// `taskmill.wordcount`: each map task counts the words (lowercased runs of letters and
/// digits) of its payload's `"text"`; the reduce stage sums the counts per word; the
/// finalizer's result is `{"words": distinct words, "total": all words, "counts":
/// {word: count}}`. A request without `tasks` gives `params` `{"texts": [...]}`, one
/// map task per text. Texts travel in the payloads: a built-in type reads no files.
pub const WORDCOUNT: &str = "taskmill.wordcount";

/// Registers the built-in handlers; every pod's builder starts from them.
pub fn register(registry: &mut Registry) {
    registry.add_handler(ECHO, echo);
    registry.add_handler(SLEEP, sleep);
    registry.add_handler(FAIL, fail);
    registry.add_job_type(
        JobType::new(WORDCOUNT)
            .splitter(split_texts)
            .map(count_words)
            .reduce(sum_counts)
            .finalizer(summarize_counts),
    );
}

async fn echo(ctx: TaskContext) -> HandlerResult {
    Ok(ctx.payload)
}

async fn sleep(ctx: TaskContext) -> HandlerResult {
    let ms = ctx
        .payload
        .get("ms")
        .and_then(Value::as_u64)
        .ok_or_else(|| TaskError::permanent("taskmill.sleep needs {\"ms\": N}"))?;
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!({ "slept_ms": ms })),
        _ = ctx.stop.cancelled() => Err(TaskError::retryable("timed out before the sleep was over")),
    }
}

async fn fail(ctx: TaskContext) -> HandlerResult {
    let times = ctx
        .payload
        .get("times")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let permanent = ctx
        .payload
        .get("permanent")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if i64::from(ctx.attempt) > times {
        return Ok(ctx.payload);
    }
    let message = format!(
        "taskmill.fail: attempt {} of {times} planned failures",
        ctx.attempt
    );
    Err(if permanent {
        TaskError::permanent(message)
    } else {
        TaskError::retryable(message)
    })
}

fn split_texts(params: &Value) -> Result<Vec<Value>, String> {
    let texts = params
        .get("texts")
        .and_then(Value::as_array)
        .ok_or("taskmill.wordcount needs params {\"texts\": [...]} or tasks")?;
    Ok(texts.iter().map(|text| json!({ "text": text })).collect())
}

async fn count_words(ctx: TaskContext) -> HandlerResult {
    let text = ctx
        .payload
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| TaskError::permanent("taskmill.wordcount needs {\"text\": ...}"))?;
    let mut counts = Map::new();
    for word in words(text) {
        let count = counts.entry(word).or_insert(json!(0));
        *count = json!(count.as_u64().unwrap_or(0) + 1);
    }
    Ok(Value::Object(counts))
}

/// The words of `text` as the word count counts them: maximal runs of alphanumeric
/// characters, lowercased.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
}

fn sum(values: &Value) -> u64 {
    values
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .sum()
}

/// Per key (`{"key", "values"}`) the sum; per shard (`{"groups"}`) each group's sum.
async fn sum_counts(ctx: TaskContext) -> HandlerResult {
    if let Some(groups) = ctx.payload.get("groups").and_then(Value::as_object) {
        let sums = groups
            .iter()
            .map(|(word, counts)| (word.clone(), json!(sum(counts))));
        return Ok(Value::Object(sums.collect()));
    }
    Ok(json!(sum(&ctx.payload["values"])))
}

async fn summarize_counts(ctx: TaskContext) -> HandlerResult {
    let counts = ctx.payload.as_object().cloned().unwrap_or_default();
    let total: u64 = counts.values().filter_map(Value::as_u64).sum();
    Ok(json!({ "words": counts.len(), "total": total, "counts": counts }))
}
