//! Built-in task types, usable from any producer:
//!
//! - `taskmill.echo`: the result is the payload;
//! - `taskmill.sleep`: `{"ms": N}` waits N milliseconds;
//! - `taskmill.fail`: `{"times": K, "permanent": bool}` fails its first K attempts
//!   (retryably, unless `permanent`), then echoes the payload.

use std::time::Duration;

use serde_json::{json, Value};

use crate::registry::{HandlerResult, Registry, TaskContext, TaskError};

/// `taskmill.echo`: its result is its payload.
pub const ECHO: &str = "taskmill.echo";
/// `taskmill.sleep`: `{"ms": N}` waits N milliseconds and returns `{"slept_ms": N}`;
/// stopped by its timeout, it fails retryably.
pub const SLEEP: &str = "taskmill.sleep";
/// `taskmill.fail`: `{"times": K, "permanent": bool}` fails attempts 1 to K
/// (permanently if `permanent`), then returns its payload.
pub const FAIL: &str = "taskmill.fail";

/// Registers the built-in handlers; every pod's builder starts from them.
pub fn register(registry: &mut Registry) {
    registry.add_handler(ECHO, echo);
    registry.add_handler(SLEEP, sleep);
    registry.add_handler(FAIL, fail);
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
