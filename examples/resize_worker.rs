//! A service's own worker binary: registers a `resize` handler beside the built-in
//! task types and serves until Ctrl-C / SIGTERM.
//!
//! ```sh
//! cargo run --example resize_worker
//! # elsewhere:
//! cargo run -- submit --type resize --task '{"width": 640, "height": 480, "scale": 0.5}' --wait
//! ```

use serde::Deserialize;
use serde_json::{json, Value};
use taskmill::{CancellationToken, Config, Pod, TaskContext, TaskError};

#[derive(Deserialize)]
struct Resize {
    width: u32,
    height: u32,
    scale: f64,
}

/// Bad input can never succeed, so it fails permanently; anything else returned as an
/// error (a flaky download, say) would be retried with linear backoff.
async fn resize(ctx: TaskContext) -> Result<Value, TaskError> {
    let request: Resize = serde_json::from_value(ctx.payload)
        .map_err(|err| TaskError::permanent(format!("bad resize payload: {err}")))?;
    if !(0.0..=8.0).contains(&request.scale) {
        return Err(TaskError::permanent(format!(
            "scale {} is out of range",
            request.scale
        )));
    }
    let width = (f64::from(request.width) * request.scale).round() as u32;
    let height = (f64::from(request.height) * request.scale).round() as u32;
    Ok(json!({ "width": width, "height": height }))
}

#[tokio::main]
async fn main() -> Result<(), taskmill::Error> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    Pod::builder()
        .config(Config::from_env()?)
        .handler("resize", resize)
        .concurrency(16)
        .build()
        .run(shutdown)
        .await
}
