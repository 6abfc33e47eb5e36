//! The dashboard in a real browser: headless Chromium renders each page of a pod with
//! a failed job, a done job and a parked request, and the DOM it built is checked; a
//! screenshot of a job's page is kept in `target/`. The write actions are posted as
//! their forms would: refused without the token, and doing what they say with it.
//! Needs `chromium` (Debian: `apt-get install chromium`), which `.ci/run` installs.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use taskmill::{JobRequest, TaskContext, TaskError};

use common::{Backend, TestEnv};

const LONG: Duration = Duration::from_secs(120);
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

/// POSTs a form; the status and body.
async fn post(url: String, form: Vec<(&'static str, String)>) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let fields: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut response = agent.post(&url).send_form(fields).unwrap();
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        )
    })
    .await
    .unwrap()
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
    let pod = env.start(env.pod().config(config).handler("odd", odd));
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

    let jobs = rendered(&format!("{base}/")).await;
    for id in [&done, &failed] {
        assert!(jobs.contains(&format!("href=\"/jobs/{id}\"")), "{jobs}");
    }
    assert!(jobs.contains(">failed<") && jobs.contains(">done<"));
    let only_failed = rendered(&format!("{base}/?stage=failed")).await;
    assert!(only_failed.contains(&failed) && !only_failed.contains(&done));

    let page = rendered(&format!("{base}/jobs/{failed}")).await;
    assert!(page.contains("Retry failed tasks"), "{page}");
    assert!(
        page.contains("&lt;b&gt;1&lt;/b&gt; is odd"),
        "a task's error is shown as text, never as markup: {page}"
    );
    assert!(!page.contains("<b>1</b>"));
    assert!(page.contains("<svg"), "the throughput chart");
    assert!(!page.contains(TOKEN), "the token is never on a page");
    assert!(!page.contains("guest:guest"), "nor a credential");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-job.png");
    chromium(
        &[&format!("--screenshot={}", shot.display())],
        &format!("{base}/jobs/{failed}"),
    )
    .await;
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot"
    );

    let queues = rendered(&format!("{base}/queues")).await;
    assert!(queues.contains(&env.topology().work_queue("default")));
    let parked = rendered(&format!("{base}/parking")).await;
    assert!(parked.contains("malformed JSON"), "{parked}");

    let retry = format!("{base}/jobs/{failed}/retry");
    let (status, body) = post(retry.clone(), vec![("token", "wrong".into())]).await;
    assert_eq!((status, body.contains("wrong token")), (403, true));
    assert_eq!(post(retry.clone(), vec![]).await.0, 403, "no token at all");
    assert_eq!(
        env.store.job(&failed).await.unwrap().unwrap().stage,
        "failed",
        "nothing happened"
    );
    HEALED.store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, body) = post(retry, vec![("token", TOKEN.into())]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("runs again"), "{body}");
    let job = env.wait_for_end(&failed, LONG).await;
    assert_eq!((job.stage.as_str(), job.run), ("done", 2));

    let (status, body) = post(
        format!("{base}/parking/replay"),
        vec![("token", TOKEN.into())],
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("1 parked messages sent back"), "{body}");
    client.close().await.unwrap();
    pod.stop().await;
}

#[tokio::test]
async fn without_a_token_the_dashboard_is_read_only() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let (config, base) = env.config_with_http();
    let pod = env.start(env.pod().config(config));
    let client = env.client().await;
    let mut request = JobRequest::new(taskmill::builtin::FAIL, vec![json!({"times": 9})]);
    request.max_retries = 0;
    let job_id = client.submit(request).await.unwrap();
    assert!(!client.wait(&job_id).await.unwrap().is_done());
    let page = rendered(&format!("{base}/jobs/{job_id}")).await;
    assert!(page.contains("Read-only"), "{page}");
    assert!(!page.contains("Retry failed tasks"));
    let (status, body) = post(
        format!("{base}/jobs/{job_id}/retry"),
        vec![("token", String::new())],
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("read-only"), "{body}");
    client.close().await.unwrap();
    pod.stop().await;
}
