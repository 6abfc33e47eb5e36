//! `taskmill bench` runs end to end and reports every scenario (tiny sizes: a smoke
//! test of the harness, not a timing test — timings are never asserted).

use std::process::Command;

#[test]
fn bench_reports_every_scenario_as_json() {
    let output = Command::new(env!("CARGO_BIN_EXE_taskmill"))
        .args([
            "bench",
            "--json",
            "--tasks",
            "200",
            "--jobs",
            "20",
            "--baseline-messages",
            "2000",
            "--open-loop-secs",
            "1",
            "--soak-secs",
            "1",
            "--waiting-jobs",
            "50",
            "--idle-secs",
            "1",
            "--only",
            "S1,S3,S4,S6,S8,S9,S10,S11",
        ])
        // The bench makes its own scratch SQLite file and broker prefix, and removes both.
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .output()
        .expect("taskmill runs");
    assert!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert!(report["broker"]["messages_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["autovacuum"].is_null(), "SQLite has no autovacuum");
    assert!(
        report["database"]["single_row_updates_per_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let scenarios = report["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["S1", "S3", "S4", "S10/pub", "S10/tx", "S8"]);
    for scenario in scenarios {
        assert_eq!(scenario["all_done"], true, "{scenario}");
        assert!(scenario["tasks_per_s"].as_f64().unwrap() > 0.0);
        assert!(scenario["worker_peak_rss_mib"].as_f64().is_some());
    }
    assert_eq!(scenarios[1]["jobs"], 20);
    assert_eq!(scenarios[2]["tasks"], 200);
    // 200 map tasks, 100 reduce shards (the texts have more than 100 distinct words),
    // one finalize task.
    assert_eq!(scenarios[5]["tasks"], 301);
    // The same 20 single-task jobs, published and written in transactions.
    for transactional in &scenarios[3..5] {
        assert_eq!(transactional["jobs"], 20, "{transactional}");
        assert_eq!(transactional["tasks"], 20, "{transactional}");
    }
    // S6 at 200 jobs/s, then at half of S3's rate, then from 200/s up by half while
    // every event arrives with p99 under 250 ms.
    let open_loop = report["open_loop"].as_array().unwrap();
    assert!(open_loop.len() >= 2, "{open_loop:?}");
    assert_eq!(open_loop[0]["name"], "S6/200");
    for rate in &open_loop[..2] {
        assert!(rate["published"].as_u64().unwrap() > 0, "{rate}");
        assert_eq!(
            rate["published"], rate["arrived"],
            "every event arrived: {rate}"
        );
    }
    let kept_up = |rate: &serde_json::Value| {
        rate["published"] == rate["arrived"] && rate["latency_p99_ms"].as_f64().unwrap() < 250.0
    };
    let mut previous = 200.0;
    let climb = &open_loop[2..];
    for (step, rate) in climb.iter().enumerate() {
        let jobs_per_s = rate["jobs_per_s"].as_f64().unwrap();
        assert_eq!(jobs_per_s, (previous * 1.5_f64).round(), "{open_loop:?}");
        previous = jobs_per_s;
        if step + 1 < climb.len() {
            assert!(
                kept_up(rate),
                "the climb goes on only while kept up: {rate}"
            );
        }
    }
    if kept_up(&open_loop[0]) {
        assert!(
            !climb.is_empty(),
            "a rate that kept up is followed by a higher one"
        );
    }
    // The soak: S2-sized jobs (10 × --tasks), one after another, each with the size of
    // the database once it ended.
    let soak = &report["soak"];
    assert_eq!(soak["tasks_per_job"], 2_000);
    let jobs = soak["jobs"].as_array().unwrap();
    assert!(!jobs.is_empty(), "{soak}");
    for job in jobs {
        assert!(job["tasks_per_s"].as_f64().unwrap() > 0.0, "{job}");
        assert!(
            job["sizes"]["database_bytes"].as_i64().unwrap() > 0,
            "{job}"
        );
        assert!(
            job["sizes"]["free_bytes"].as_i64().is_some(),
            "SQLite: {job}"
        );
    }
    // Scheduled jobs: while 50 wait an hour ahead, no task row and no message exist
    // (only their job rows and requests), and 20 due among them all run.
    let waiting = &report["waiting"];
    assert_eq!(waiting["waiting_jobs"], 50, "{waiting}");
    assert_eq!(waiting["task_rows"], 0, "{waiting}");
    assert_eq!(waiting["request_rows"], 50, "{waiting}");
    assert_eq!(waiting["broker_messages"], 0, "{waiting}");
    assert_eq!(
        waiting["broker_messages_by_queue"],
        serde_json::json!({}),
        "{waiting}"
    );
    assert_eq!(waiting["due_jobs"], 20, "{waiting}");
    assert_eq!(waiting["all_done"], true, "{waiting}");
    assert!(
        waiting["start_late_ms_p50"].as_f64().unwrap() >= 0.0,
        "{waiting}"
    );
}
