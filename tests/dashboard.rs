//! The dashboard in a real browser: headless Chromium renders each page of a pod with
//! a failed job, a done job and a parked request, and the DOM it built is checked; a
//! screenshot of a job's page is kept in `target/`. Every page needs the token (401
//! without it); the write actions are posted as their forms would: refused without
//! the token or with a token the pod made itself, doing what they say with the
//! configured one. Retry is offered only where it would be accepted.
//! Needs `chromium` (Debian: `apt-get install chromium`), which `.ci/run` installs.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use taskmill::{JobRequest, TaskContext, TaskError};

use common::{Backend, TestEnv, LONG};

const TOKEN: &str = "correct horse battery staple";

/// Runs headless Chromium with `args` on `url`; its stdout.
async fn chromium(args: &[&str], url: &str) -> String {
    let output = tokio::process::Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,1000",
        ])
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LONG, output)
        .await
        .expect("chromium renders within two minutes")
        .expect("chromium is installed (Debian: apt-get install chromium)");
    assert!(output.status.success(), "chromium: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The page as the browser built it.
async fn rendered(url: &str) -> String {
    chromium(&["--dump-dom"], url).await
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

/// POSTs a form with `cookie` (if any); the status and body.
async fn post(
    url: String,
    cookie: Option<String>,
    form: Vec<(&'static str, String)>,
) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let fields: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut request = agent().post(&url);
        if let Some(cookie) = cookie {
            request = request.header("Cookie", cookie);
        }
        let mut response = request.send_form(fields).unwrap();
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        )
    })
    .await
    .unwrap()
}

/// GETs `url` with `cookie` (if any), following no redirect: the status, the cookie
/// set (its `name=value`) and the body.
async fn get(url: String, cookie: Option<String>) -> (u16, Option<String>, String) {
    tokio::task::spawn_blocking(move || {
        let mut request = agent().get(&url);
        if let Some(cookie) = cookie {
            request = request.header("Cookie", cookie);
        }
        let mut response = request.call().unwrap();
        let set = response.headers().get("set-cookie").map(|value| {
            value
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_owned()
        });
        (
            response.status().as_u16(),
            set,
            response.body_mut().read_to_string().unwrap(),
        )
    })
    .await
    .unwrap()
}

/// `?token=` as a browser sends it.
fn with_token(url: &str, token: &str) -> String {
    format!("{url}?token={}", token.replace(' ', "%20"))
}

static HEALED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Fails odd payloads for good, with markup in the error, until healed.
async fn odd(ctx: TaskContext) -> Result<Value, TaskError> {
    let n = ctx.payload.as_i64().unwrap_or(0);
    if n % 2 == 1 && !HEALED.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(TaskError::permanent(format!("<b>{n}</b> is odd")));
    }
    Ok(json!(n))
}

#[tokio::test]
async fn the_dashboard_renders_and_its_actions_need_the_token() {
    let env = TestEnv::new(Backend::Postgres).await;
    let (mut config, base) = env.config_with_http();
    config.dashboard_token = taskmill::config::Token::new(TOKEN);
    let nightly = taskmill::schedule::Schedule::new(
        "nightly",
        "0 3 * * *",
        JobRequest::new("odd", vec![json!(2)]),
    )
    .unwrap();
    let pod = env.start(
        env.pod()
            .config(config)
            .handler("odd", odd)
            .schedule(nightly),
    );
    let client = env.client().await;

    let done = client
        .submit(JobRequest::new("odd", vec![json!(2), json!(4)]))
        .await
        .unwrap();
    let failed = client
        .submit(JobRequest::new("odd", (0..6).map(|n| json!(n)).collect()))
        .await
        .unwrap();
    assert!(client.wait(&done).await.unwrap().is_done());
    assert!(!client.wait(&failed).await.unwrap().is_done());
    env.publish_raw(&env.topology().jobs_exchange(), "", b"{ not json", None)
        .await;
    let parking = env.topology().parking_queue();
    common::wait_until(LONG, || async { env.message_count(&parking).await == 1 }).await;

    // Without the token nothing is shown; probes and metrics stay open.
    for page in [
        "/",
        "/queues",
        "/schedules",
        "/parking",
        &format!("/jobs/{failed}"),
    ] {
        let (status, _, body) = get(format!("{base}{page}"), None).await;
        assert_eq!(status, 401, "{page}: {body}");
        assert!(
            !body.contains(&failed) && !body.contains("malformed"),
            "{body}"
        );
    }
    for open in ["/healthz", "/metrics"] {
        assert_eq!(get(format!("{base}{open}"), None).await.0, 200, "{open}");
    }
    let (status, _, _) = get(with_token(&format!("{base}/"), "wrong"), None).await;
    assert_eq!(status, 401, "a wrong token");
    // ?token= sets the cookie and sends the browser to the page without it.
    let (status, cookie, _) = get(with_token(&format!("{base}/queues"), TOKEN), None).await;
    assert_eq!(status, 303);
    let cookie = cookie.expect("a cookie is set");
    let (status, _, body) = get(format!("{base}/queues"), Some(cookie.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        get(format!("{base}/"), Some("taskmill_token=00".into()))
            .await
            .0,
        401,
        "a wrong cookie"
    );

    let jobs = rendered(&with_token(&format!("{base}/"), TOKEN)).await;
    for id in [&done, &failed] {
        assert!(jobs.contains(&format!("href=\"/jobs/{id}\"")), "{jobs}");
    }
    assert!(jobs.contains(">failed<") && jobs.contains(">done<"));
    let only_failed = rendered(&format!(
        "{base}/?stage=failed&token={}",
        TOKEN.replace(' ', "%20")
    ))
    .await;
    assert!(only_failed.contains(&failed) && !only_failed.contains(&done));

    let page = rendered(&with_token(&format!("{base}/jobs/{failed}"), TOKEN)).await;
    assert!(page.contains("Retry failed tasks"), "{page}");
    assert!(
        page.contains("&lt;b&gt;1&lt;/b&gt; is odd"),
        "a task's error is shown as text, never as markup: {page}"
    );
    assert!(!page.contains("<b>1</b>"));
    assert!(page.contains("<svg"), "the throughput chart");
    assert!(!page.contains(TOKEN), "the token is never on a page");
    assert!(
        !page.contains(cookie.split('=').nth(1).unwrap()),
        "nor its cookie"
    );
    assert!(!page.contains("guest:guest"), "nor a credential");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-job.png");
    chromium(
        &[&format!("--screenshot={}", shot.display())],
        &with_token(&format!("{base}/jobs/{failed}"), TOKEN),
    )
    .await;
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot"
    );

    let queues = rendered(&with_token(&format!("{base}/queues"), TOKEN)).await;
    assert!(queues.contains(&env.topology().work_queue("default")));
    let parked = rendered(&with_token(&format!("{base}/parking"), TOKEN)).await;
    assert!(parked.contains("malformed JSON"), "{parked}");
    let schedules = rendered(&with_token(&format!("{base}/schedules"), TOKEN)).await;
    assert!(
        schedules.contains("nightly") && schedules.contains("0 3 * * *"),
        "{schedules}"
    );
    let (_, _, metrics) = get(format!("{base}/metrics"), None).await;
    assert!(
        metrics.contains("taskmill_schedule_next_tick_timestamp_seconds{schedule=\"nightly\"}"),
        "{metrics}"
    );

    let retry = format!("{base}/jobs/{failed}/retry");
    let wrong = Some("taskmill_token=00".to_owned());
    assert_eq!(
        post(retry.clone(), wrong, vec![]).await.0,
        401,
        "a wrong token"
    );
    assert_eq!(
        post(retry.clone(), None, vec![]).await.0,
        401,
        "no token at all"
    );
    assert_eq!(
        env.store.job(&failed).await.unwrap().unwrap().stage,
        "failed",
        "nothing happened"
    );
    HEALED.store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, body) = post(retry, Some(cookie.clone()), vec![]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("runs again"), "{body}");
    let job = env.wait_for_end(&failed, LONG).await;
    assert_eq!((job.stage.as_str(), job.run), ("done", 2));

    let (status, body) = post(
        format!("{base}/parking/replay"),
        Some(cookie.clone()),
        vec![],
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("1 parked messages sent back"), "{body}");

    // A failed job that retry would refuse is offered no retry, and says why: failed
    // as a whole (no task failed or was cancelled), or in formation.
    let page = |job: &str| get(format!("{base}/jobs/{job}"), Some(cookie.clone()));
    env.execute_sql(&[&format!(
        "UPDATE jobs SET stage = 'failed', first_error = 'its output was refused' WHERE id = '{done}'"
    )])
    .await;
    let whole = page(&done).await.2;
    assert!(!whole.contains("Retry failed tasks"), "{whole}");
    assert!(whole.contains("failed as a whole"), "{whole}");
    env.execute_sql(&[&format!(
        "UPDATE jobs SET started_at = NULL WHERE id = '{done}'"
    )])
    .await;
    let forming = page(&done).await.2;
    assert!(!forming.contains("Retry failed tasks"), "{forming}");
    assert!(forming.contains("failed in formation"), "{forming}");
    client.close().await.unwrap();
    pod.stop().await;
}

/// Without `TASKMILL_DASHBOARD_TOKEN` a pod makes a token and logs the dashboard's URL
/// with it; that token reads, and cannot write.
#[tokio::test]
async fn without_a_configured_token_the_pod_makes_one_that_only_reads() {
    use tokio::io::AsyncBufReadExt;
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut worker = tokio::process::Command::from(env.taskmill())
        .args(["worker", "--no-migrate", "--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,taskmill=info")
        .env_remove("TASKMILL_DASHBOARD_TOKEN")
        .env_remove("TASKMILL_LOG_FORMAT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("taskmill worker starts");
    let mut lines = tokio::io::BufReader::new(worker.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(LONG, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the worker logs its dashboard");
            let line: Value = serde_json::from_str(&line).unwrap();
            if let Some(url) = line["fields"]["url"].as_str() {
                return url.to_owned();
            }
        }
    })
    .await
    .expect("the dashboard's URL is logged");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (base, token) = url.split_once("/?token=").expect("a URL with its token");

    let client = env.client().await;
    let mut request = JobRequest::new(taskmill::builtin::FAIL, vec![json!({"times": 9})]);
    request.max_retries = 0;
    let job_id = client.submit(request).await.unwrap();
    assert!(!client.wait(&job_id).await.unwrap().is_done());
    assert_eq!(get(format!("{base}/jobs/{job_id}"), None).await.0, 401);
    let page = rendered(&with_token(&format!("{base}/jobs/{job_id}"), token)).await;
    assert!(page.contains("Read-only"), "{page}");
    assert!(!page.contains("Retry failed tasks"));
    assert!(!page.contains(token), "the token is never on a page");
    let (status, cookie, _) = get(with_token(&format!("{base}/"), token), None).await;
    assert_eq!(status, 303);
    let (status, body) = post(format!("{base}/jobs/{job_id}/retry"), cookie, vec![]).await;
    assert_eq!(status, 403);
    assert!(body.contains("read-only"), "{body}");
    client.close().await.unwrap();
    let _ = worker.start_kill();
    let _ = worker.wait().await;
}

/// Pages read through a small store of the dashboard's own, with a time limit: while
/// the database cannot answer them (the jobs table locked), five open pages each give
/// up with 503 instead of waiting, and the pipeline's store still has its connections.
#[tokio::test]
async fn pages_the_database_cannot_answer_give_up_and_take_nothing_from_the_pipeline() {
    use sea_orm::{ConnectionTrait, Database, TransactionTrait};
    let env = TestEnv::new(Backend::Postgres).await;
    let (mut config, base) = env.config_with_http();
    config.dashboard_token = taskmill::config::Token::new(TOKEN);
    let pod = env.start(env.pod().config(config));
    let client = env.client().await;
    let job = client
        .submit(JobRequest::new(taskmill::builtin::ECHO, vec![json!(1)]))
        .await
        .unwrap();
    assert!(client.wait(&job).await.unwrap().is_done());
    let (_, cookie, _) = get(with_token(&format!("{base}/"), TOKEN), None).await;
    assert_eq!(get(format!("{base}/"), cookie.clone()).await.0, 200);

    let locker = Database::connect(&env.config.database_url).await.unwrap();
    let lock = locker.begin().await.unwrap();
    lock.execute_unprepared("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let pages: Vec<_> = (0..5)
        .map(|n| {
            let url = match n % 2 {
                0 => format!("{base}/"),
                _ => format!("{base}/jobs/{job}"),
            };
            tokio::spawn(get(url, cookie.clone()))
        })
        .collect();
    // The pages wait for the lock on their own connections...
    common::wait_until(LONG, || async {
        let row = locker
            .query_one_raw(sea_orm::Statement::from_string(
                locker.get_database_backend(),
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "n").unwrap() > 0
    })
    .await;
    // ...and the pipeline's store answers meanwhile.
    tokio::time::timeout(Duration::from_secs(2), env.store.ping())
        .await
        .expect("the pipeline's store has a connection free")
        .unwrap();
    for page in pages {
        let (status, _, _) = tokio::time::timeout(LONG, page)
            .await
            .expect("a page gives up rather than waiting for the lock")
            .unwrap();
        assert_eq!(status, 503);
    }
    lock.rollback().await.unwrap();
    locker.close().await.unwrap();
    assert_eq!(get(format!("{base}/"), cookie).await.0, 200);
    client.close().await.unwrap();
    pod.stop().await;
}
