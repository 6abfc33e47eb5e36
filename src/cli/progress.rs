//! A job's live progress while a command waits for it: on a terminal, a bar (tasks
//! ended of all, failures, rate, ETA) redrawn in place; otherwise a plain line every
//! few seconds, fit for a log. Read from the job's row, whose counters the workers
//! keep: one indexed read per tick, whatever the job's size.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::store::Store;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

/// How often a bar is redrawn, and how often a plain line is printed.
const BAR_TICK: Duration = Duration::from_millis(250);
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Progress being shown; [`Progress::finish`] stops it.
pub struct Progress {
    bar: ProgressBar,
    poller: JoinHandle<()>,
}

impl Progress {
    /// Follows `job_id` in the database at `database_url` (connected in the
    /// background: a slow database delays the bar, never the command), on stderr.
    pub fn follow(database_url: String, job_id: String) -> Self {
        let on_terminal = std::io::stderr().is_terminal();
        let bar = if on_terminal {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} tasks · {per_sec} · ETA {eta} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        let poller = tokio::spawn({
            let bar = bar.clone();
            async move {
                match Store::connect(&database_url, 1).await {
                    Ok(store) => poll(store, job_id, bar, on_terminal).await,
                    Err(err) => tracing::warn!(%err, "no progress: the database is not reachable"),
                }
            }
        });
        Self { bar, poller }
    }

    /// Stops the polling and clears the bar, so the command's own output follows.
    pub fn finish(self) {
        self.poller.abort();
        self.bar.finish_and_clear();
    }
}

async fn poll(store: Store, job_id: String, bar: ProgressBar, on_terminal: bool) {
    let started = Instant::now();
    let every = if on_terminal { BAR_TICK } else { LINE_EVERY };
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        let Ok(Some(job)) = store.job(&job_id).await else {
            bar.set_message("(forming)");
            bar.tick();
            continue;
        };
        let ended = job.done_count + job.failed_count + job.cancelled_count;
        let total = job.task_count.max(ended);
        let failed = job.failed_count;
        if on_terminal {
            bar.set_length(total as u64);
            bar.set_position(ended as u64);
            let phase = job.phase.map(|p| format!(" · {p}")).unwrap_or_default();
            bar.set_message(if failed > 0 {
                format!("· {failed} failed{phase}")
            } else {
                phase
            });
        } else {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "job {job_id}: {} · {ended}/{total} tasks ended · {failed} failed · {:.0} tasks/s",
                job.stage,
                ended as f64 / secs.max(0.001)
            );
        }
    }
}
