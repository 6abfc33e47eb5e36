//! Periodic jobs: a schedule fires each tick once whatever the number of pods (the
//! tick's job id is `<name>:<tick>`), missed ticks follow the schedule's catch-up
//! policy, and `taskmill schedule` adds, lists and removes schedules. Ticks across a
//! kill -9 are in the fault suite.

mod common;

use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde_json::json;
use taskmill::schedule::{CatchUp, Schedule};
use taskmill::{builtin, JobRequest};

use common::{Backend, TestEnv, LONG};

on_both_backends!(
    two_pods_fire_each_tick_once,
    missed_ticks_follow_the_catch_up_policy,
    schedules_are_managed_from_the_command_line,
    a_broken_schedule_holds_up_no_other,
);

fn echo() -> JobRequest {
    JobRequest::new(builtin::ECHO, vec![json!("tick")])
}

/// The ticks (as job ids) of `schedule` that made jobs, in order.
async fn jobs_of(env: &TestEnv, schedule: &str) -> Vec<String> {
    let mut ids = env
        .texts(&format!(
            "SELECT id FROM jobs WHERE id LIKE '{schedule}:%' ORDER BY id"
        ))
        .await;
    ids.sort();
    ids
}

fn tick_of(job_id: &str) -> DateTime<Utc> {
    let (_, tick) = job_id.rsplit_once(':').unwrap();
    chrono::NaiveDateTime::parse_from_str(tick, "%Y%m%dT%H%M%SZ")
        .unwrap()
        .and_utc()
}

/// Two pods built with the same every-second schedule: each second makes one job,
/// with one event, and none is skipped.
async fn two_pods_fire_each_tick_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let events = env.event_log().await;
    let schedule = || {
        Schedule::new("every-second", "* * * * * *", echo())
            .unwrap()
            .catch_up(CatchUp::All)
    };
    let first = env.start(env.pod().schedule(schedule()));
    let second = env.start(env.pod().schedule(schedule()));
    common::wait_until(LONG, || async {
        jobs_of(&env, "every-second").await.len() >= 5
    })
    .await;
    env.execute_sql(&["DELETE FROM schedules"]).await;
    // Every tick fired is a job once its request is out and taken.
    let intake = env.topology().intake_queue();
    common::wait_until(LONG, || async {
        env.count("SELECT COUNT(*) AS n FROM job_requests").await == 0
            && env.message_count(&intake).await == 0
    })
    .await;
    first.stop().await;
    second.stop().await;

    let ids = jobs_of(&env, "every-second").await;
    let ticks: Vec<_> = ids.iter().map(|id| tick_of(id)).collect();
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            TimeDelta::seconds(1),
            "no tick skipped: {ids:?}"
        );
    }
    let second_pod = env.start(env.pod());
    for id in &ids {
        assert_eq!(env.wait_for_end(id, LONG).await.stage, "done");
    }
    second_pod.stop().await;
    let events = events.wait_for(ids.len(), LONG).await;
    assert_eq!(events.len(), ids.len(), "one event per tick");
}

/// Two hourly schedules last fired three hours ago: under `skip` only the latest
/// missed hour fires, under `all` each of the three does.
async fn missed_ticks_follow_the_catch_up_policy(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let hour = Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap();
    for (name, catch_up) in [("skipping", CatchUp::Skip), ("catching-up", CatchUp::All)] {
        let schedule = Schedule::new(name, "0 * * * *", echo())
            .unwrap()
            .catch_up(catch_up);
        let mut row = taskmill::schedule::row_of(&schedule, Utc::now()).unwrap();
        row.next_tick = hour - TimeDelta::hours(2);
        assert!(env.store.put_schedule(&row).await.unwrap());
    }
    let pod = env.start(env.pod());
    common::wait_until(LONG, || async {
        jobs_of(&env, "catching-up").await.len() == 3 && jobs_of(&env, "skipping").await.len() == 1
    })
    .await;
    let caught_up: Vec<_> = jobs_of(&env, "catching-up")
        .await
        .iter()
        .map(|id| tick_of(id))
        .collect();
    assert_eq!(
        caught_up,
        [hour - TimeDelta::hours(2), hour - TimeDelta::hours(1), hour]
    );
    assert_eq!(
        jobs_of(&env, "skipping").await,
        [format!("skipping:{}", hour.format("%Y%m%dT%H%M%SZ"))]
    );
    // Both go on at the next hour, not before.
    for row in env.store.schedules().await.unwrap() {
        assert_eq!(row.next_tick, hour + TimeDelta::hours(1), "{}", row.name);
        assert_eq!(row.last_tick, Some(hour), "{}", row.name);
    }
    // A tick run twice would show within this second: none does.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(jobs_of(&env, "catching-up").await.len(), 3, "each once");
    pod.stop().await;
}

async fn schedules_are_managed_from_the_command_line(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let nightly = [
        "schedule",
        "add",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Paris",
        "--type",
        builtin::ECHO,
        "--task",
        "1",
    ];
    let added = env.cli(&nightly);
    assert!(added.contains("schedule nightly set"), "{added}");
    let again = env.cli(&nightly);
    assert!(again.contains("unchanged"), "{again}");
    let listed: serde_json::Value =
        serde_json::from_str(&env.cli(&["schedule", "list", "--json"])).unwrap();
    let row = &listed[0];
    assert_eq!(row["name"], "nightly");
    assert_eq!(row["timezone"], "Europe/Paris");
    assert_eq!(row["catch_up"], "skip");
    let next: DateTime<Utc> = serde_json::from_value(row["next_tick"].clone()).unwrap();
    // 03:00 in Paris is 01:00 or 02:00 UTC.
    assert!(
        [1, 2].contains(&next.format("%H").to_string().parse::<u32>().unwrap()),
        "{next}"
    );
    assert!(env.cli(&["schedule", "list"]).contains("nightly"));

    let refused = env.cli_fails(&[
        "schedule",
        "add",
        "bad",
        "--cron",
        "61 * * * *",
        "--type",
        builtin::ECHO,
    ]);
    assert!(refused.contains("cron"), "{refused}");
    let refused = env.cli_fails(&[
        "schedule",
        "add",
        "bad",
        "--cron",
        "0 * * * *",
        "--tz",
        "Mars/Olympus",
        "--type",
        builtin::ECHO,
    ]);
    assert!(refused.contains("time zone"), "{refused}");

    assert!(env
        .cli(&["schedule", "remove", "nightly"])
        .contains("removed"));
    env.cli_fails(&["schedule", "remove", "nightly"]);
    assert!(env.cli(&["schedule", "list"]).contains("no schedules"));
}

/// A schedule row that cannot fire (a pattern edited by hand into nonsense) is put off
/// for an hour, and the schedule beside it fires on time.
async fn a_broken_schedule_holds_up_no_other(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let now = Utc::now();
    let good = Schedule::new("good", "* * * * * *", echo()).unwrap();
    env.store
        .put_schedule(&taskmill::schedule::row_of(&good, now).unwrap())
        .await
        .unwrap();
    let mut broken = taskmill::schedule::row_of(&good, now).unwrap();
    broken.name = "broken".into();
    broken.cron = "every now and then".into();
    broken.next_tick = now - TimeDelta::seconds(1);
    env.store.put_schedule(&broken).await.unwrap();

    let pod = env.start(env.pod());
    common::wait_until(LONG, || async { jobs_of(&env, "good").await.len() >= 2 }).await;
    pod.stop().await;
    let rows = env.store.schedules().await.unwrap();
    let broken = rows.iter().find(|row| row.name == "broken").unwrap();
    assert!(
        broken.next_tick > now + TimeDelta::minutes(50),
        "{broken:?}"
    );
    assert!(broken.last_tick.is_none());
    assert!(jobs_of(&env, "broken").await.is_empty());
}
