//! A job sent in parts: each part request stores its tasks where its offset says, the
//! seal says how many parts and tasks there are, and whichever request finds every
//! part stored after its own commit starts the job (a second start is a no-op).
//!
//! Each part is acked once its rows are stored, so a producer can send a job of any
//! size in requests of bounded size, and the intake holds one part at a time. The
//! feeder starts with the first part: workers run the first tasks while the rest are
//! still on their way. A part that cannot go in (another part under its number, an
//! overlap, a place outside the seal) is parked, which fails the forming job with the
//! reason; parts that never arrive leave the job in formation until the sweeper fails
//! it, naming them.

use serde_json::value::RawValue;

use super::{Intake, Rejection};
use crate::protocol::JobRequest;
use crate::store::{NewJob, PartClaim, PartsState};

impl Intake {
    /// Stores a part, or records a seal, of the job `job`; starts the job once every
    /// part is in.
    pub(super) async fn accept_part(
        &self,
        job: &NewJob,
        task_type: &str,
        request: &JobRequest<Box<RawValue>>,
    ) -> Result<(), Rejection> {
        let store = &self.shared.store;
        self.create_job(job, request.tasks.as_ref().map_or(0, Vec::len))
            .await?;
        if let Some(part) = request.part {
            let tasks = request.tasks.as_deref().unwrap_or_default();
            let claim = store
                .claim_part(&job.id, part, tasks.len() as i64, &request.part_digest())
                .await?;
            match claim {
                PartClaim::Refused(reason) => return Err(Rejection::Park(reason)),
                PartClaim::AlreadyStored => {
                    tracing::info!(job_id = %job.id, part = part.number, "part stored already");
                }
                PartClaim::Store => {
                    self.feeder.feed(&job.id);
                    let stored = self
                        .insert_adaptively(job, task_type, tasks, part.offset as usize)
                        .await;
                    if let Err(refused) = stored {
                        // Two copies of one part store it at once; the job may start
                        // on the other's commit, and then this one finds it formed.
                        let digest = request.part_digest();
                        let claim = store
                            .claim_part(&job.id, part, tasks.len() as i64, &digest)
                            .await?;
                        if !matches!(claim, PartClaim::AlreadyStored) {
                            return Err(refused);
                        }
                        tracing::info!(job_id = %job.id, part = part.number, "part stored by another copy");
                        return Ok(());
                    }
                    store.part_stored(&job.id, part.number).await?;
                    tracing::info!(job_id = %job.id, part = part.number, tasks = tasks.len(), "part stored");
                }
            }
        }
        if let Some(seal) = request.seal {
            if let Some(reason) = store.seal_job(&job.id, seal).await? {
                return Err(Rejection::Park(reason));
            }
            tracing::info!(job_id = %job.id, parts = seal.parts, tasks = seal.tasks, "job sealed");
        }
        match store.parts_state(&job.id).await? {
            PartsState::Started | PartsState::Waiting => Ok(()),
            PartsState::Complete(tasks) => self.start(&job.id, tasks).await,
            PartsState::Never(reason) => Err(Rejection::Park(format!(
                "job {:?} cannot form: {reason}",
                job.id
            ))),
        }
    }
}
