//! The store alone, on both databases and with no broker: each named transition of a
//! job's and a task's life, and what a second, late or racing try of it does.

mod common;

use std::time::Duration;

use serde_json::json;
use taskmill::phases::{PhasePlan, ReducePlan};
use taskmill::protocol::{Part, Seal};
use taskmill::store::{
    NewJob, PartClaim, PartsState, Rerun, StartOutcome, Store, TaskOutcome, Transition,
};
use taskmill::{FailurePolicy, JobStage, TaskStatus};

use common::{echo_job, echo_tasks, Backend, TestDb};

on_both_backends!(
    a_claim_takes_an_attempt_once,
    a_redelivered_attempt_is_taken_over_and_an_expired_lease_too,
    an_outcome_counts_once_and_the_last_one_ends_the_job,
    a_failed_attempt_is_retried_then_fails_the_job,
    a_job_ends_once_however_many_checks_race,
    a_cancel_ends_a_job_once_and_its_tasks_with_it,
    a_map_phase_over_moves_the_job_to_reduce,
    a_rerun_starts_a_failed_job_again_and_refuses_the_rest,
    parts_are_claimed_once_and_a_sealed_job_starts_whole,
    a_lease_has_one_holder_until_it_lapses_or_is_released,
);

const LEASE: Duration = Duration::from_secs(60);

fn with_retries(job: NewJob, max_retries: i32) -> NewJob {
    NewJob { max_retries, ..job }
}

/// Creates `job`, inserts `count` tasks and starts it; the task ids in ordinal order.
async fn running_job(store: &Store, job: NewJob, count: i32) -> Vec<i64> {
    let id = job.id.clone();
    assert!(store.create_job(&job).await.unwrap().is_none());
    assert!(store
        .insert_tasks(&id, &echo_tasks(0, count))
        .await
        .unwrap());
    let started = store.start_job(&id, i64::from(count)).await.unwrap();
    assert!(matches!(started, StartOutcome::Running(_)), "{started:?}");
    task_ids(store, &id).await
}

async fn task_ids(store: &Store, job_id: &str) -> Vec<i64> {
    let mut tasks = store.tasks_of_job(job_id).await.unwrap();
    tasks.sort_by_key(|task| task.ordinal);
    tasks.iter().map(|task| task.id).collect()
}

fn outcome(job_id: &str, task_id: i64, attempt: i32, outcome: TaskOutcome) -> Transition {
    Transition {
        job_id: job_id.into(),
        task_id,
        attempt,
        run: 1,
        outcome,
    }
}

async fn stage(store: &Store, job_id: &str) -> String {
    store.job(job_id).await.unwrap().expect("the job").stage
}

async fn status(store: &Store, task_id: i64) -> String {
    store.task(task_id).await.unwrap().expect("the task").status
}

async fn a_claim_takes_an_attempt_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let tasks = running_job(store, echo_job("claims", FailurePolicy::Continue), 4).await;

    let claim = store
        .claim_task(tasks[0], 1, 1, "a", false, LEASE)
        .await
        .unwrap();
    let claim = claim.expect("a fresh attempt is claimed");
    assert!(!claim.taken_over);
    assert_eq!(status(store, tasks[0]).await, TaskStatus::Running.as_str());
    // Another holder, not redelivered, while the lease is live: nothing.
    assert!(store
        .claim_task(tasks[0], 1, 1, "b", false, LEASE)
        .await
        .unwrap()
        .is_none());
    // An attempt the task is not at: nothing. (A run before the task's own claims
    // nothing either: see the rerun below.)
    let early = store.claim_task(tasks[1], 2, 1, "a", false, LEASE).await;
    assert!(early.unwrap().is_none());

    // The batch claim takes the fresh ones, and a second batch finds them taken.
    let batch: Vec<_> = tasks[1..].iter().map(|&id| (id, 1, 1)).collect();
    let claimed = store.claim_tasks(&batch, "c", LEASE).await.unwrap();
    assert_eq!(claimed, tasks[1..].iter().copied().collect());
    assert!(store
        .claim_tasks(&batch, "d", LEASE)
        .await
        .unwrap()
        .is_empty());
}

async fn a_redelivered_attempt_is_taken_over_and_an_expired_lease_too(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let tasks = running_job(store, echo_job("takeovers", FailurePolicy::Continue), 2).await;

    assert!(store
        .claim_task(tasks[0], 1, 1, "a", false, LEASE)
        .await
        .unwrap()
        .is_some());
    let taken = store
        .claim_task(tasks[0], 1, 1, "b", true, LEASE)
        .await
        .unwrap();
    assert!(taken.expect("a redelivery takes over").taken_over);

    let short = Duration::from_millis(200);
    assert!(store
        .claim_task(tasks[1], 1, 1, "a", false, short)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .claim_task(tasks[1], 1, 1, "b", false, LEASE)
        .await
        .unwrap()
        .is_none());
    common::wait_until(common::LONG, || async {
        store
            .claim_task(tasks[1], 1, 1, "b", false, LEASE)
            .await
            .unwrap()
            .is_some_and(|claim| claim.taken_over)
    })
    .await;
    // The old holder's outcome no longer counts: the attempt is "b"'s, and the same
    // attempt's outcome was never recorded. Its own lease cannot be renewed either.
    assert!(!store.renew_lease(tasks[1], 1, "a", LEASE).await.unwrap());
    assert!(store.renew_lease(tasks[1], 1, "b", LEASE).await.unwrap());
}

async fn an_outcome_counts_once_and_the_last_one_ends_the_job(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let tasks = running_job(store, echo_job("finishes", FailurePolicy::Continue), 3).await;
    let batch: Vec<_> = tasks.iter().map(|&id| (id, 1, 1)).collect();
    assert_eq!(
        store.claim_tasks(&batch, "a", LEASE).await.unwrap().len(),
        3
    );

    let done = |task_id| outcome("finishes", task_id, 1, TaskOutcome::Done(json!(task_id)));
    let first = store
        .finish_tasks(&[done(tasks[0]), done(tasks[0])])
        .await
        .unwrap();
    assert_eq!(first.ids.len(), 1, "two copies of one outcome count once");
    assert!(first.ended.is_empty());
    // The same outcome again, late: no row changes, nothing counts.
    assert!(store
        .finish_tasks(&[done(tasks[0])])
        .await
        .unwrap()
        .ids
        .is_empty());

    let last = store
        .finish_tasks(&[done(tasks[1]), done(tasks[2])])
        .await
        .unwrap();
    assert_eq!(last.ids.len(), 2);
    assert_eq!(
        last.ended.len(),
        1,
        "the last outcome ends the job in its transaction"
    );
    assert_eq!(last.ended[0].kind, "job.done");
    assert_eq!(stage(store, "finishes").await, JobStage::Done.as_str());
    let job = store.job("finishes").await.unwrap().unwrap();
    assert_eq!((job.done_count, job.failed_count), (3, 0));
    assert!(store
        .check_jobs(&["finishes".into()])
        .await
        .unwrap()
        .ended
        .is_empty());
}

async fn a_failed_attempt_is_retried_then_fails_the_job(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let tasks = running_job(
        store,
        with_retries(echo_job("retries", FailurePolicy::FailFast), 1),
        2,
    )
    .await;
    let task = tasks[0];
    let error = || "no luck".to_owned();

    assert!(store
        .claim_task(task, 1, 1, "a", false, LEASE)
        .await
        .unwrap()
        .is_some());
    let retrying = TaskOutcome::of_failure(error(), 1, 1);
    assert_eq!(retrying, TaskOutcome::Retrying(error()));
    store
        .finish_tasks(&[outcome("retries", task, 1, retrying)])
        .await
        .unwrap();
    assert_eq!(status(store, task).await, TaskStatus::Retrying.as_str());
    // Attempt 1 is over: its copies claim nothing; attempt 2 is the next.
    assert!(store
        .claim_task(task, 1, 1, "b", false, LEASE)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .claim_task(task, 2, 1, "b", false, LEASE)
        .await
        .unwrap()
        .is_some());

    let failed = TaskOutcome::of_failure(error(), 2, 1);
    assert_eq!(failed, TaskOutcome::Failed(error()));
    let recorded = store
        .finish_tasks(&[outcome("retries", task, 2, failed)])
        .await
        .unwrap();
    assert_eq!(
        recorded.ended.len(),
        1,
        "fail-fast ends the job at its first failure"
    );
    assert_eq!(recorded.ended[0].kind, "job.failed");
    assert_eq!(
        status(store, tasks[1]).await,
        TaskStatus::Cancelled.as_str()
    );
    let job = store.job("retries").await.unwrap().unwrap();
    assert_eq!(job.first_error.as_deref(), Some("no luck"));
}

async fn a_job_ends_once_however_many_checks_race(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let tasks = running_job(store, echo_job("racing", FailurePolicy::Continue), 1).await;
    // Its counters say over, its end refused (as when the database refused the
    // worker's transaction): the job is left for the completion check.
    let (refuse, allow) = match backend {
        Backend::Postgres => (
            vec![
                "CREATE FUNCTION refuse_end() RETURNS trigger AS $$ BEGIN \
                 RAISE EXCEPTION 'refused by the test''s trigger'; END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER refuse_end BEFORE UPDATE ON jobs FOR EACH ROW \
                 WHEN (NEW.stage <> 'running') EXECUTE FUNCTION refuse_end()",
            ],
            "DROP TRIGGER refuse_end ON jobs",
        ),
        Backend::Sqlite => (
            vec![
                "CREATE TRIGGER refuse_end BEFORE UPDATE ON jobs WHEN NEW.stage <> 'running' \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test''s trigger'); END",
            ],
            "DROP TRIGGER refuse_end",
        ),
    };
    db.execute_sql(&refuse).await;
    assert!(store
        .claim_task(tasks[0], 1, 1, "a", false, LEASE)
        .await
        .unwrap()
        .is_some());
    let done = outcome("racing", tasks[0], 1, TaskOutcome::Done(json!(1)));
    let recorded = store.finish_tasks(&[done]).await.unwrap();
    assert_eq!((recorded.ids.len(), recorded.ended.len()), (1, 0));
    assert_eq!(stage(store, "racing").await, JobStage::Running.as_str());
    db.execute_sql(&[allow]).await;

    let ids = ["racing".to_owned()];
    let checks = (0..8).map(|_| store.check_jobs(&ids));
    let ended: usize = futures::future::join_all(checks)
        .await
        .into_iter()
        .map(|checked| checked.unwrap().ended.len())
        .sum();
    assert_eq!(ended, 1, "of eight racing checks exactly one ends the job");
    assert_eq!(stage(store, "racing").await, JobStage::Done.as_str());
    assert!(store.job_event("racing").await.unwrap().is_some());
}

async fn a_cancel_ends_a_job_once_and_its_tasks_with_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let tasks = running_job(store, echo_job("cancelled", FailurePolicy::Continue), 3).await;
    assert!(store
        .claim_task(tasks[0], 1, 1, "a", false, LEASE)
        .await
        .unwrap()
        .is_some());

    let event = store.cancel_job("cancelled").await.unwrap();
    assert_eq!(event.expect("a running job cancels").kind, "job.cancelled");
    assert!(store.cancel_job("cancelled").await.unwrap().is_none());
    assert!(store.cancel_job("no such job").await.unwrap().is_none());
    for &task in &tasks {
        assert_eq!(status(store, task).await, TaskStatus::Cancelled.as_str());
    }
    // The running attempt's outcome, arriving after, changes nothing.
    let late = outcome("cancelled", tasks[0], 1, TaskOutcome::Done(json!(0)));
    assert!(store.finish_tasks(&[late]).await.unwrap().ids.is_empty());
    assert_eq!(
        stage(store, "cancelled").await,
        JobStage::Cancelled.as_str()
    );
}

async fn a_map_phase_over_moves_the_job_to_reduce(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let mut job = echo_job("phases", FailurePolicy::Continue);
    job.stage_plan = Some(PhasePlan {
        reduce: ReducePlan {
            task_type: "phases.reduce".into(),
            shards: 2,
            per_key: false,
        },
        finalize: None,
    });
    let tasks = running_job(store, job, 2).await;
    let batch: Vec<_> = tasks.iter().map(|&id| (id, 1, 1)).collect();
    store.claim_tasks(&batch, "a", LEASE).await.unwrap();
    let outputs = [json!({"a": 1, "b": 2}), json!({"a": 3, "c": 4})];
    let map_done: Vec<_> = tasks
        .iter()
        .zip(outputs)
        .map(|(&id, output)| outcome("phases", id, 1, TaskOutcome::Done(output)))
        .collect();
    let recorded = store.finish_tasks(&map_done).await.unwrap();
    assert!(
        recorded.ended.is_empty(),
        "a map phase over does not end its job"
    );

    let checked = store.check_jobs(&["phases".into()]).await.unwrap();
    assert_eq!(checked.advanced.len(), 1);
    assert_eq!(checked.advanced[0].phase.as_str(), "reduce");
    assert!(store
        .check_jobs(&["phases".into()])
        .await
        .unwrap()
        .advanced
        .is_empty());
    let rows = store.tasks_of_job("phases").await.unwrap();
    let reduce: Vec<_> = rows
        .iter()
        .filter(|t| t.task_type == "phases.reduce")
        .collect();
    assert!(
        !reduce.is_empty() && reduce.len() <= 2,
        "{} reduce tasks",
        reduce.len()
    );
    let keys: usize = reduce
        .iter()
        .map(|task| {
            task.payload["groups"]
                .as_object()
                .map_or(0, |groups| groups.len())
        })
        .sum();
    assert_eq!(keys, 3, "every key of the map output in one shard");
    assert_eq!(stage(store, "phases").await, JobStage::Running.as_str());
}

async fn a_rerun_starts_a_failed_job_again_and_refuses_the_rest(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let tasks = running_job(
        store,
        with_retries(echo_job("reruns", FailurePolicy::Continue), 0),
        2,
    )
    .await;
    let batch: Vec<_> = tasks.iter().map(|&id| (id, 1, 1)).collect();
    store.claim_tasks(&batch, "a", LEASE).await.unwrap();
    let ended = store
        .finish_tasks(&[
            outcome("reruns", tasks[0], 1, TaskOutcome::Done(json!(0))),
            outcome("reruns", tasks[1], 1, TaskOutcome::Failed("broken".into())),
        ])
        .await
        .unwrap()
        .ended;
    assert_eq!(ended[0].kind, "job.failed");
    // Its event not yet out: the next run's would take its row.
    assert!(matches!(
        store.rerun_job("reruns").await.unwrap(),
        Rerun::Refused(_)
    ));
    store
        .mark_events_published(&[(ended[0].id, None)])
        .await
        .unwrap();

    let Rerun::Started { job, tasks: again } = store.rerun_job("reruns").await.unwrap() else {
        panic!("a failed job whose event went out runs again");
    };
    assert_eq!((job.run, again), (2, 1));
    assert_eq!(status(store, tasks[1]).await, TaskStatus::Pending.as_str());
    assert_eq!(status(store, tasks[0]).await, TaskStatus::Done.as_str());
    // Run 1's attempt claims nothing now; run 2's does.
    assert!(store
        .claim_task(tasks[1], 1, 1, "b", false, LEASE)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .claim_task(tasks[1], 1, 2, "b", false, LEASE)
        .await
        .unwrap()
        .is_some());
    assert!(matches!(
        store.rerun_job("reruns").await.unwrap(),
        Rerun::Refused(_)
    ));
    assert!(matches!(
        store.rerun_job("no such job").await.unwrap(),
        Rerun::UnknownJob
    ));
}

async fn parts_are_claimed_once_and_a_sealed_job_starts_whole(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    assert!(store
        .create_job(&echo_job("parted", FailurePolicy::Continue))
        .await
        .unwrap()
        .is_none());
    let part = |number, offset| Part { number, offset };
    assert!(matches!(
        store
            .claim_part("parted", part(1, 0), 3, "one")
            .await
            .unwrap(),
        PartClaim::Store
    ));
    assert!(store
        .insert_tasks("parted", &echo_tasks(0, 3))
        .await
        .unwrap());
    store.part_stored("parted", 1).await.unwrap();
    assert!(matches!(
        store
            .claim_part("parted", part(1, 0), 3, "one")
            .await
            .unwrap(),
        PartClaim::AlreadyStored
    ));
    assert!(matches!(
        store
            .claim_part("parted", part(1, 0), 3, "another")
            .await
            .unwrap(),
        PartClaim::Refused(_)
    ));
    assert!(matches!(
        store.parts_state("parted").await.unwrap(),
        PartsState::Waiting
    ));

    assert!(store
        .seal_job("parted", Seal { parts: 2, tasks: 5 })
        .await
        .unwrap()
        .is_none());
    assert!(store
        .seal_job("parted", Seal { parts: 2, tasks: 5 })
        .await
        .unwrap()
        .is_none());
    assert!(store
        .seal_job("parted", Seal { parts: 3, tasks: 5 })
        .await
        .unwrap()
        .is_some());
    assert!(matches!(
        store.parts_state("parted").await.unwrap(),
        PartsState::Waiting
    ));
    let missing = store
        .missing_parts(&store.job("parted").await.unwrap().unwrap())
        .await;
    assert!(missing.unwrap().unwrap().contains('2'));

    assert!(matches!(
        store
            .claim_part("parted", part(2, 3), 2, "two")
            .await
            .unwrap(),
        PartClaim::Store
    ));
    assert!(store
        .insert_tasks("parted", &echo_tasks(3, 2))
        .await
        .unwrap());
    store.part_stored("parted", 2).await.unwrap();
    let PartsState::Complete(count) = store.parts_state("parted").await.unwrap() else {
        panic!("sealed, with every part stored");
    };
    assert_eq!(count, 5);
    let started = store.start_job("parted", count).await.unwrap();
    assert!(matches!(started, StartOutcome::Running(_)), "{started:?}");
    assert!(matches!(
        store.parts_state("parted").await.unwrap(),
        PartsState::Started
    ));
    assert!(!store
        .insert_tasks("parted", &echo_tasks(5, 1))
        .await
        .unwrap());
}

async fn a_lease_has_one_holder_until_it_lapses_or_is_released(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = &db.store;
    let short = Duration::from_millis(300);
    assert!(store.acquire_lease("role", "a", short).await.unwrap());
    assert!(!store.acquire_lease("role", "b", LEASE).await.unwrap());
    assert!(
        store.acquire_lease("role", "a", short).await.unwrap(),
        "the holder renews"
    );
    common::wait_until(common::LONG, || async {
        store.acquire_lease("role", "b", LEASE).await.unwrap()
    })
    .await;
    assert!(!store.acquire_lease("role", "a", LEASE).await.unwrap());
    // A release by another holder is no release.
    store.release_lease("role", "a").await.unwrap();
    assert!(!store.acquire_lease("role", "a", LEASE).await.unwrap());
    store.release_lease("role", "b").await.unwrap();
    assert!(store.acquire_lease("role", "a", LEASE).await.unwrap());
    // Leases of other names are their own.
    assert!(store.acquire_lease("other", "b", LEASE).await.unwrap());
}
