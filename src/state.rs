//! Job stages and task statuses: the two small types every state change is written in.

use std::fmt;
use std::str::FromStr;

/// A job's stage, as stored in `jobs.stage`. A job is created in `formation` and ends in
/// one of the three terminal stages, normally by way of `running`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStage {
    /// Waiting for its request's `run_at`: no task row yet, its request kept in the
    /// outbox of requests until then.
    Scheduled,
    /// Its task rows are being stored; tasks already stored may run.
    Formation,
    /// Every task row is stored and the task count set; its tasks run.
    Running,
    /// Ended: every task ended `done`.
    Done,
    /// Ended: a task failed for good (at once under `fail_fast`, once every task ended
    /// under `continue`), or its formation never finished.
    Failed,
    /// Ended: cancelled while running; its unfinished tasks were cancelled.
    Cancelled,
}

impl JobStage {
    /// The stage's name in the database and in job events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Formation => "formation",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended: `done`, `failed` or `cancelled`.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    /// The job event kind published when a job ends in this stage.
    pub(crate) const fn event_kind(self) -> &'static str {
        match self {
            Self::Failed => "job.failed",
            Self::Cancelled => "job.cancelled",
            _ => "job.done",
        }
    }
}

/// A task's status, as stored in `tasks.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    /// Not claimed yet: its first attempt waits for a worker.
    Pending,
    /// An attempt is claimed and runs under a lease.
    Running,
    /// An attempt failed retryably; the next one waits in the delay ladder.
    Retrying,
    /// Ended: the handler succeeded and its result is stored.
    Done,
    /// Ended: failed for good (a permanent error, its retries used up, or a crash loop).
    Failed,
    /// Ended unfinished: its job failed fast, failed in formation, or was cancelled.
    Cancelled,
}

impl TaskStatus {
    /// Every status, the non-terminal ones first.
    pub const ALL: [TaskStatus; 6] = [
        Self::Pending,
        Self::Running,
        Self::Retrying,
        Self::Done,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The status's name in the database and in messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the task has ended: `done`, `failed` or `cancelled`.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// A name that is no [`JobStage`] or [`TaskStatus`]: the error of parsing one.
#[derive(Debug, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for JobStage {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Scheduled,
            Self::Formation,
            Self::Running,
            Self::Done,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|stage| stage.as_str() == s)
        .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl FromStr for TaskStatus {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl fmt::Display for JobStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
