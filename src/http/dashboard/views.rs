//! The dashboard's markup: maud templates (every value escaped), one stylesheet
//! inlined, bars and the throughput chart drawn in HTML and SVG.

use chrono::Utc;
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::amqp::parking::Parked;
use crate::protocol::TaskResult;
use crate::state::JobStage;
use crate::store::{job, schedule, Throughput};
use crate::summary::{age, rate};

/// Failed tasks shown on a job's page.
pub(super) const FAILED_SHOWN: u64 = 50;

/// The failed tasks found among a window of a job's ordinals.
pub(super) struct Failures {
    /// The window's first ordinal.
    pub from: i64,
    /// Its length.
    pub window: i64,
    /// What was found, [`FAILED_SHOWN`] at most.
    pub tasks: Vec<TaskResult>,
}

const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 10px 24px; display: flex; gap: 24px; align-items: baseline; }
header a { color: #fff; text-decoration: none; } header .brand { font-weight: 700; font-size: 16px; }
main { padding: 16px 24px; max-width: 1200px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e3e6eb; vertical-align: top; }
th { font-weight: 600; color: #556; background: #eef0f3; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: flex; width: 160px; height: 10px; background: #e3e6eb; border-radius: 3px; overflow: hidden; }
.bar .done { background: #2f9e5b; } .bar .failed { background: #d64545; } .bar .cancelled { background: #a0a6b0; }
.stage { font-weight: 600; } .stage-failed { color: #c03030; } .stage-done { color: #23804a; }
.error { color: #a02828; white-space: pre-wrap; word-break: break-word; }
code, .mono { font-family: ui-monospace, monospace; font-size: 13px; }
form.inline { display: inline-flex; gap: 6px; align-items: center; margin: 0 12px 0 0; }
.panel { background: #fff; padding: 12px 16px; margin: 12px 0; border: 1px solid #e3e6eb; }
.muted { color: #778; } dl { display: grid; grid-template-columns: max-content auto; gap: 4px 16px; margin: 0; }
dt { color: #667; } dd { margin: 0; }
svg rect { fill: #3a6fd8; }
"#;

fn page(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh { meta http-equiv="refresh" content="5"; }
                title { (title) " · taskmill" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    a.brand href="/" { "taskmill" }
                    a href="/" { "Jobs" }
                    a href="/queues" { "Queues" }
                    a href="/schedules" { "Schedules" }
                    a href="/parking" { "Parking lot" }
                }
                main { (body) }
            }
        }
    }
}

/// The tasks ended of all, as a bar: done, failed and cancelled in their colours.
fn bar(total: i64, done: i64, failed: i64, cancelled: i64) -> Markup {
    let share = |n: i64| {
        if total > 0 {
            n as f64 * 100.0 / total as f64
        } else {
            0.0
        }
    };
    html! {
        div.bar title=(format!("{done} done, {failed} failed, {cancelled} cancelled of {total}")) {
            span.done style=(format!("width:{:.2}%", share(done))) {}
            span.failed style=(format!("width:{:.2}%", share(failed))) {}
            span.cancelled style=(format!("width:{:.2}%", share(cancelled))) {}
        }
    }
}

fn stage_of(job: &job::Model) -> Markup {
    let class = format!("stage stage-{}", job.stage);
    html! {
        span class=(class) { (job.stage) }
        @if let (Some(phase), true) = (&job.phase, job.stage == JobStage::Running.as_str()) {
            " " span.muted { "(" (phase) ")" }
        }
    }
}

/// The jobs list, filtered as asked; refreshed every 5 s.
pub(super) fn jobs(jobs: &[job::Model], stage: Option<JobStage>, job_type: Option<&str>) -> Markup {
    let now = Utc::now();
    let stages = [
        "scheduled",
        "formation",
        "running",
        "done",
        "failed",
        "cancelled",
    ];
    page(
        "Jobs",
        true,
        html! {
            h1 { "Jobs" }
            form method="get" action="/" {
                label { "Stage " select name="stage" {
                    option value="" { "any" }
                    @for name in stages {
                        option value=(name) selected[stage.map(JobStage::as_str) == Some(name)] { (name) }
                    }
                } }
                " "
                label { "Type " input type="text" name="type" value=(job_type.unwrap_or_default()); }
                " " button type="submit" { "Filter" }
            }
            p.muted { "The newest " (jobs.len()) " jobs; this page refreshes every 5 s." }
            table {
                thead { tr {
                    th { "Job" } th { "Type" } th { "Stage" } th { "Progress" }
                    th.num { "Done / tasks" } th.num { "Failed" } th.num { "Age" } th.num { "Tasks/s" }
                } }
                tbody {
                    @for job in jobs {
                        tr {
                            td.mono { a href=(format!("/jobs/{}", job.id)) { (job.id) } }
                            td { (job.job_type) }
                            td { (stage_of(job)) }
                            td { (bar(job.task_count, job.done_count, job.failed_count, job.cancelled_count)) }
                            td.num { (job.done_count) " / " (job.task_count) }
                            td.num { (job.failed_count) }
                            td.num { (age(job.created_at, now)) }
                            td.num { (rate(job, now).map_or("-".to_owned(), |r| format!("{r:.0}"))) }
                        }
                    }
                }
            }
        },
    )
}

/// One job: its numbers, tasks by status, throughput, failed tasks and actions;
/// `retry_refused`: why a retry would be refused, if it would.
pub(super) fn job(
    job: &job::Model,
    failed: &Failures,
    throughput: Option<&Throughput>,
    writable: bool,
    retry_refused: Option<&str>,
) -> Markup {
    let now = Utc::now();
    let ended = job.done_count + job.failed_count + job.cancelled_count;
    let by_status = [
        ("done", job.done_count),
        ("failed", job.failed_count),
        ("cancelled", job.cancelled_count),
        ("not ended", (job.task_count - ended).max(0)),
    ];
    let when = |at: Option<chrono::DateTime<Utc>>| {
        at.map_or("-".to_owned(), |at| {
            format!(
                "{} ({} ago)",
                at.format("%Y-%m-%d %H:%M:%S UTC"),
                age(at, now)
            )
        })
    };
    page(
        &format!("Job {}", job.id),
        false,
        html! {
            h1 { "Job " span.mono { (job.id) } }
            div.panel {
                dl {
                    dt { "Type" } dd { (job.job_type) }
                    dt { "Stage" } dd { (stage_of(job)) @if job.run > 1 { " · run " (job.run) } }
                    dt { "Pool" } dd { (job.queue) }
                    dt { "Progress" } dd { (bar(job.task_count, job.done_count, job.failed_count, job.cancelled_count))
                        " " (job.done_count) " done, " (job.failed_count) " failed, " (job.cancelled_count) " cancelled of " (job.task_count) }
                    dt { "Created" } dd { (when(Some(job.created_at))) }
                    dt { "Started" } dd { (when(job.started_at)) }
                    dt { "Finished" } dd { (when(job.finished_at)) }
                    dt { "Rate" } dd { (rate(job, now).map_or("-".to_owned(), |r| format!("{r:.0} tasks/s"))) }
                    @if let Some(error) = &job.first_error { dt { "Error" } dd.error { (error) } }
                }
            }
            (actions(job, writable, retry_refused))
            h2 { "Tasks by status" }
            table {
                thead { tr { th { "Status" } th.num { "Tasks" } } }
                tbody { @for (name, count) in by_status { tr { td { (name) } td.num { (count) } } } }
            }
            h2 { "Throughput" }
            (chart(throughput))
            h2 { "Failed tasks" }
            (failures(job, failed))
        },
    )
}

/// The failed tasks of one window of ordinals, with links to the windows around it
/// while the job has failures outside it.
fn failures(job: &job::Model, failed: &Failures) -> Markup {
    if job.failed_count == 0 {
        return html! { p.muted { "None." } };
    }
    let to = (failed.from + failed.window).min(job.task_count);
    let window = |from: i64| format!("/jobs/{}?failed_from={from}", job.id);
    html! {
        p.muted {
            (job.failed_count) " failed in all; among tasks #" (failed.from) "–#" (to - 1) ", "
            @if failed.tasks.len() as u64 >= FAILED_SHOWN { "the first " }
            (failed.tasks.len()) ". "
            code { "taskmill results " (job.id) " --status failed" } " lists them all."
        }
        @if !failed.tasks.is_empty() {
            table {
                thead { tr { th.num { "#" } th.num { "Task" } th.num { "Attempts" } th { "Last error" } } }
                tbody {
                    @for task in &failed.tasks {
                        tr {
                            td.num { (task.ordinal) } td.num.mono { (task.task_id) }
                            td.num { (task.attempts) } td.error { (task.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
        p {
            @if failed.from > 0 {
                a href=(window((failed.from - failed.window).max(0))) { "← earlier tasks" } " "
            }
            @if to < job.task_count {
                a href=(window(to)) { "later tasks →" }
            }
        }
    }
}

fn actions(job: &job::Model, writable: bool, retry_refused: Option<&str>) -> Markup {
    let running = job.stage == JobStage::Running.as_str();
    let failed = job.stage == JobStage::Failed.as_str();
    if !running && !failed {
        return html! {};
    }
    html! {
        div.panel {
            @if let (true, Some(reason)) = (failed, retry_refused) {
                span.muted { "Not retried from here: " (reason) }
            } @else if writable {
                @if running { (action_form(&format!("/jobs/{}/cancel", job.id), "Cancel job", None)) }
                @if failed { (action_form(&format!("/jobs/{}/retry", job.id), "Retry failed tasks", None)) }
            } @else {
                span.muted { "Read-only: set TASKMILL_DASHBOARD_TOKEN on the pods to "
                    @if running { "cancel" } @else { "retry" } " from here." }
            }
        }
    }
}

/// A form posting to `action`; the token travels in the dashboard's cookie.
fn action_form(action: &str, label: &str, id: Option<&str>) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            @if let Some(id) = id { input type="hidden" name="id" value=(id); }
            button type="submit" { (label) }
        }
    }
}

/// Tasks ended per bucket as SVG bars.
fn chart(throughput: Option<&Throughput>) -> Markup {
    let Some(throughput) = throughput else {
        return html! { p.muted { "No task has ended yet." } };
    };
    let height = 160.0;
    let peak = throughput.counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    // Up to 60 bars over 900 px; a short job's few bars stay bars.
    let slot = (900.0 / throughput.counts.len().max(1) as f64).min(24.0);
    let width = (slot * throughput.counts.len() as f64).max(300.0);
    let per_second = |count: u64| count as f64 * 1000.0 / throughput.bucket_ms as f64;
    html! {
        svg width=(width) height=(height + 20.0) viewBox=(format!("0 0 {width} {}", height + 20.0)) role="img"
            aria-label="tasks ended over time" {
            @for (i, count) in throughput.counts.iter().enumerate() {
                @let h = *count as f64 / peak * height;
                rect x=(format!("{:.1}", i as f64 * slot)) y=(format!("{:.1}", height - h))
                    width=(format!("{:.1}", (slot - 1.0).max(1.0))) height=(format!("{h:.1}")) {
                    title { (count) " tasks (" (format!("{:.0}", per_second(*count))) "/s)" }
                }
            }
            text x="0" y=(height + 15.0) font-size="11" fill="#667" {
                (throughput.start.format("%H:%M:%S")) " · " (throughput.bucket_ms as f64 / 1000.0) " s per bar · peak "
                (format!("{:.0}", per_second(peak as u64))) " tasks/s"
                @if throughput.every > 1 { " · estimated from every " (throughput.every) "th task" }
            }
        }
    }
}

/// The queues taskmill reads, with their ready messages.
pub(super) fn queues(rows: &[(String, Option<u32>)], connected: bool) -> Markup {
    page(
        "Queues",
        true,
        html! {
            h1 { "Queues" }
            @if !connected { p.error { "The broker is not connected: depths unknown." } }
            p.muted { "Ready messages, as the broker counts them now (delivered and unacked ones are not counted; the management API has those)." }
            table {
                thead { tr { th { "Queue" } th.num { "Ready" } } }
                tbody {
                    @for (name, ready) in rows {
                        tr { td.mono { (name) } td.num { (ready.map_or("-".to_owned(), |n| n.to_string())) } }
                    }
                }
            }
        },
    )
}

/// The schedules of periodic jobs, with their last and next tick.
pub(super) fn schedules(rows: &[schedule::Model]) -> Markup {
    let now = Utc::now();
    let when = |at: chrono::DateTime<Utc>| at.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    page(
        "Schedules",
        true,
        html! {
            h1 { "Schedules" }
            p.muted { "Periodic jobs (" code { "taskmill schedule" } "); each tick's job is " code { "<name>:<tick>" } "." }
            @if rows.is_empty() {
                p { "None." }
            } @else {
                table {
                    thead { tr {
                        th { "Schedule" } th { "Cron" } th { "Time zone" } th { "Missed ticks" }
                        th { "Next tick" } th { "Last tick" } th { "Last job" }
                    } }
                    tbody {
                        @for row in rows {
                            tr {
                                td.mono { (row.name) } td.mono { (row.cron) } td { (row.timezone) }
                                td { (row.catch_up) }
                                td { (when(row.next_tick)) @if row.next_tick < now { " (due)" } }
                                td { (row.last_tick.map_or("-".to_owned(), when)) }
                                td.mono { @match &row.last_job_id {
                                    Some(id) => a href=(format!("/jobs/{id}")) { (id) },
                                    None => "-",
                                } }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// The parking lot: what is there and why.
pub(super) fn parking(parked: &[Parked], writable: bool) -> Markup {
    page(
        "Parking lot",
        false,
        html! {
            h1 { "Parking lot" }
            p.muted { "Messages that could not be processed, with the reason; nothing leaves unless replayed or purged (" code { "taskmill dead" } ")." }
            @if parked.is_empty() {
                p { "Empty." }
            } @else {
                @if writable { div.panel { (action_form("/parking/replay", "Replay all", None)) } }
                table {
                    thead { tr { th { "Parked at" } th { "From" } th { "Reason" } th.num { "Bytes" } th { "Body" } @if writable { th {} } } }
                    tbody {
                        @for message in parked {
                            tr {
                                td { (message.parked_at) } td.mono { (message.source_queue) }
                                td.error { (message.reason) } td.num { (message.bytes) }
                                td.mono { (message.body_preview.chars().take(200).collect::<String>()) }
                                @if writable { td { (action_form("/parking/replay", "Replay", Some(&message.id))) } }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A one-paragraph answer: an action's outcome, or why a page could not be made.
pub(super) fn message(title: &str, text: &str, job_id: Option<&str>) -> Markup {
    page(
        title,
        false,
        html! {
            h1 { (title) }
            p { (text) }
            @if let Some(id) = job_id { p { a href=(format!("/jobs/{id}")) { "Back to the job" } } }
        },
    )
}
