//! Multi-stage jobs: the map → reduce → finalize shape, as plain data the intake
//! writes on the job row and the completion check reads.
//!
//! A job type registered with a reduce handler (a `JobType` in the registry) runs its
//! tasks as the **map** stage; each map task returns a JSON object of key → value (or
//! `null` for no output). When every map task is done, the completion check groups the
//! map output by key and creates the **reduce** tasks in the transaction that moves the
//! job to the next phase: one per key (`per_key`), else up to `shards` tasks, keys dealt
//! round-robin in key order. A registered finalizer then runs as one **finalize** task
//! over the reduce stage's merged output; its result (else that merged output) is the
//! job's result. The job stays `running` through its phases: its stage changes once.

use serde::{Deserialize, Serialize};

/// Reduce tasks per job when neither the job type nor the request says.
pub const DEFAULT_REDUCE_SHARDS: u32 = 16;
/// The most reduce shards a request may ask for.
pub const MAX_REDUCE_SHARDS: u32 = 10_000;

/// What a multi-stage job runs after its map stage, kept on its row (`stage_plan`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhasePlan {
    /// The reduce stage.
    pub reduce: ReducePlan,
    /// The finalize stage, when the job type has a finalizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalize: Option<FinalizePlan>,
}

/// How the map output becomes reduce tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReducePlan {
    /// The reduce handler's task type: `<job type>.reduce`.
    pub task_type: String,
    /// Reduce tasks at most, when not `per_key`.
    pub shards: u32,
    /// One reduce task per key instead of shards.
    #[serde(default)]
    pub per_key: bool,
}

/// The one task that turns the reduce output into the job's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalizePlan {
    /// The finalizer's task type: `<job type>.finalize`.
    pub task_type: String,
}

/// The phase a multi-stage job is in while `running` (`jobs.phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The job's own tasks run; each returns key → value output.
    Map,
    /// One task per key or per shard of keys reduces the map output.
    Reduce,
    /// One task turns the merged reduce output into the job's result.
    Finalize,
}

impl Phase {
    /// The phase's name in `jobs.phase`, `taskmill status` and `job.stage` events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Map => "map",
            Self::Reduce => "reduce",
            Self::Finalize => "finalize",
        }
    }

    /// Reads what [`Self::as_str`] writes.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Map, Self::Reduce, Self::Finalize]
            .into_iter()
            .find(|phase| phase.as_str() == name)
    }
}

impl PhasePlan {
    /// The phase after `phase`; `None`: the job ends.
    pub fn after(&self, phase: Phase) -> Option<Phase> {
        match phase {
            Phase::Map => Some(Phase::Reduce),
            Phase::Reduce => self.finalize.as_ref().map(|_| Phase::Finalize),
            Phase::Finalize => None,
        }
    }
}

/// The task type of a job type's reduce handler.
pub fn reduce_task_type(job_type: &str) -> String {
    format!("{job_type}.reduce")
}

/// The task type of a job type's finalizer.
pub fn finalize_task_type(job_type: &str) -> String {
    format!("{job_type}.finalize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_plan() {
        let mut plan = PhasePlan {
            reduce: ReducePlan {
                task_type: reduce_task_type("wc"),
                shards: 4,
                per_key: false,
            },
            finalize: None,
        };
        assert_eq!(plan.after(Phase::Map), Some(Phase::Reduce));
        assert_eq!(plan.after(Phase::Reduce), None);
        plan.finalize = Some(FinalizePlan {
            task_type: finalize_task_type("wc"),
        });
        assert_eq!(plan.after(Phase::Reduce), Some(Phase::Finalize));
        assert_eq!(plan.after(Phase::Finalize), None);
        for phase in [Phase::Map, Phase::Reduce, Phase::Finalize] {
            assert_eq!(Phase::parse(phase.as_str()), Some(phase));
        }
    }
}
