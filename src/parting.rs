//! Cutting a large job into parts and a seal (docs/protocol.md), for every producer
//! path alike: `Client::submit` and `Client::open_job` publish what it cuts,
//! `submit_in` stores it.

use serde_json::value::RawValue;

use crate::error::Error;
use crate::protocol::{JobRequest, Part, Seal};

/// Tasks per part of a job sent in parts; a larger job given to `Client::submit` or
/// `submit_in` is sent in parts.
pub const PART_TASKS: usize = 10_000;
/// Bytes of task JSON per part at most: well under the intake's default limit on a
/// request (16 MiB), whatever the payloads.
pub const PART_BYTES: usize = 4 * 1024 * 1024;

/// Cuts a job's tasks into the requests that carry it: parts of at most
/// [`PART_TASKS`] tasks and [`PART_BYTES`] bytes as they fill, then the seal; or, for
/// a job that never filled a part, one plain request. What `Client::open_job`'s `JobParts`
/// publishes and `submit_in` stores.
pub(crate) struct Parting {
    /// The job's settings, repeated by every part and the seal.
    header: JobRequest<Box<RawValue>>,
    buffer: Vec<Box<RawValue>>,
    buffered_bytes: usize,
    /// Parts cut so far.
    parts: u32,
    /// Tasks in the parts cut so far.
    tasks: u64,
}

impl Parting {
    /// Takes the job's settings from `request` (its `tasks` are ignored; its `job_id`
    /// is generated when absent) and checks them.
    pub fn new(mut request: JobRequest) -> Result<Self, Error> {
        request
            .job_id
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
        let header = JobRequest::<Box<RawValue>> {
            version: request.version,
            job_id: request.job_id,
            job_type: request.job_type,
            task_type: request.task_type,
            pool: request.pool,
            params: request.params,
            tasks: None,
            max_retries: request.max_retries,
            retry_delay_ms: request.retry_delay_ms,
            on_failure: request.on_failure,
            on_complete: request.on_complete,
            task_timeout_ms: request.task_timeout_ms,
            results_in_event: request.results_in_event,
            reduce_shards: request.reduce_shards,
            reduce_per_key: request.reduce_per_key,
            part: None,
            seal: None,
            run_at: request.run_at,
        };
        header.validate()?;
        Ok(Self {
            header,
            buffer: Vec::new(),
            buffered_bytes: 0,
            parts: 0,
            tasks: 0,
        })
    }

    pub fn job_id(&self) -> &str {
        self.header.job_id.as_deref().unwrap_or_default()
    }

    /// Adds a task; returns the part it filled, if it did.
    pub fn push(&mut self, payload: Box<RawValue>) -> Option<JobRequest<Box<RawValue>>> {
        let mut full = None;
        if self.buffered_bytes + payload.get().len() > PART_BYTES && !self.buffer.is_empty() {
            full = Some(self.cut());
        }
        self.buffered_bytes += payload.get().len();
        self.buffer.push(payload);
        if self.buffer.len() >= PART_TASKS {
            // A byte-full part leaves one task behind, never PART_TASKS.
            full = Some(self.cut());
        }
        full
    }

    /// The requests still to send: the job whole if no part was cut, else the last
    /// part (if any task waits) and the seal.
    pub fn finish(mut self) -> Vec<JobRequest<Box<RawValue>>> {
        if self.parts == 0 {
            let mut whole = self.header;
            whole.tasks = Some(self.buffer);
            return vec![whole];
        }
        let mut requests = Vec::with_capacity(2);
        if !self.buffer.is_empty() {
            requests.push(self.cut());
        }
        let mut seal = self.header;
        seal.seal = Some(Seal {
            parts: self.parts,
            tasks: self.tasks,
        });
        requests.push(seal);
        requests
    }

    /// The waiting tasks as the next part.
    fn cut(&mut self) -> JobRequest<Box<RawValue>> {
        let tasks = std::mem::take(&mut self.buffer);
        let mut part = self.header.clone();
        part.part = Some(Part {
            number: self.parts + 1,
            offset: self.tasks,
        });
        self.parts += 1;
        self.tasks += tasks.len() as u64;
        self.buffered_bytes = 0;
        part.tasks = Some(tasks);
        part
    }
}
