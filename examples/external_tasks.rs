//! External tasks end to end: a small HTTP "render farm" started by this example, a pod
//! whose `render` tasks are handed to it (`HttpBackend`), and a job of five renders
//! whose results come back through the syncer.
//!
//! ```sh
//! cargo run --example external_tasks   # RabbitMQ on 127.0.0.1:5672, SQLite by default
//! ```
//!
//! The farm takes a render (`POST /renders`, idempotent by the key taskmill sends) and
//! reports its renders' states (`POST /renders/states`): each report moves a render one
//! step on (its update id rises), and after three steps it is done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use taskmill::{CancellationToken, Client, Config, HttpBackend, JobRequest, Pod, Store};

/// Renders by id: the key it was handed with, its payload, and its steps so far.
#[derive(Default)]
struct Farm {
    ids_by_key: HashMap<String, String>,
    renders: HashMap<String, (Value, i64)>,
}

type SharedFarm = Arc<Mutex<Farm>>;

async fn take_render(State(farm): State<SharedFarm>, Json(body): Json<Value>) -> Json<Value> {
    let mut farm = farm.lock().unwrap();
    let key = body["key"].as_str().unwrap_or_default().to_owned();
    let fresh = format!("render-{}", farm.ids_by_key.len() + 1);
    let id = farm.ids_by_key.entry(key).or_insert(fresh).clone();
    farm.renders
        .entry(id.clone())
        .or_insert((body["payload"].clone(), 0));
    Json(json!({ "id": id }))
}

async fn report(State(farm): State<SharedFarm>, Json(body): Json<Value>) -> Json<Value> {
    let mut farm = farm.lock().unwrap();
    let ids: Vec<String> = serde_json::from_value(body["ids"].clone()).unwrap_or_default();
    let states = ids
        .iter()
        .map(|id| match farm.renders.get_mut(id) {
            None => json!({ "id": id, "error": "no such render" }),
            Some((payload, steps)) => {
                *steps += 1;
                if *steps < 3 {
                    json!({ "id": id, "update_id": *steps, "state": "running" })
                } else {
                    let frame = payload["frame"].as_u64().unwrap_or(0);
                    let result = json!({ "file": format!("frame-{frame:04}.png") });
                    json!({ "id": id, "update_id": *steps, "state": "done", "result": result })
                }
            }
        })
        .collect::<Vec<_>>();
    Json(json!({ "states": states }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let farm: SharedFarm = Arc::default();
    let app = Router::new()
        .route("/renders", post(take_render))
        .route("/renders/states", post(report))
        .with_state(farm);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut config = Config::from_env()?;
    config.prefix = "taskmill_external_example".to_owned();
    let store = Store::connect(&config.database_url, config.db_pool_size).await?;
    store.migrate().await?;
    let backend = HttpBackend::new(format!("{base}/renders"), format!("{base}/renders/states"))
        .poll_every(Duration::from_millis(200));
    let shutdown = CancellationToken::new();
    let pod = tokio::spawn(
        Pod::builder()
            .config(config.clone())
            .store(store.clone())
            .backend("render", backend)
            .build()
            .run(shutdown.clone()),
    );

    let client = Client::connect(&config).await?.with_store(store);
    let mut request = JobRequest::new(
        "render",
        (1..=5).map(|frame| json!({ "frame": frame })).collect(),
    );
    request.results_in_event = true;
    let job_id = uuid::Uuid::new_v4().to_string();
    request.job_id = Some(job_id.clone());
    let watch = client.watch(&job_id).await?;
    client.submit(request).await?;
    let event = tokio::time::timeout(Duration::from_secs(60), watch.event()).await??;
    println!("job {} ended {}", event.job_id, event.stage);
    for result in event.results.unwrap_or_default() {
        println!(
            "  task {} → {}",
            result.ordinal,
            result.result.unwrap_or_default()
        );
    }
    shutdown.cancel();
    pod.await??;
    client.close().await?;
    Ok(())
}
