//! The producer side: submit a job request, wait for its job event, read its results.
//!
//! Needs only the broker (any AMQP client can do the same, see the README); given a
//! store too, [`Client::wait`] also answers for jobs that ended before it was called.
//! A lost broker connection is re-established on the next call; a submit that fails
//! on a dead connection is retried on a new one for up to a minute, which is safe
//! because the job id is fixed before the first try.

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use crate::amqp::broker::{Outgoing, Publisher};
use crate::amqp::link::BrokerLink;
use crate::amqp::topology::Topology;
use crate::config::Config;
use crate::error::Error;
use crate::operations;
use crate::parting::Parting;
pub use crate::parting::PART_TASKS;
use crate::protocol::{JobEvent, JobRequest, TaskResult};
use crate::retry::Delays;
use crate::state::TaskStatus;
use crate::database;
use crate::store::Store;

/// How long `connect` and `submit` keep trying while the broker is away.
const PATIENCE: Duration = Duration::from_secs(60);
/// A producer's handle on taskmill: submits job requests, waits for their events, and
/// (given a store) cancels jobs.
pub struct Client {
    link: Arc<BrokerLink>,
    publisher: tokio::sync::Mutex<Option<Publisher>>,
    topology: Topology,
    store: Option<Store>,
}

/// How long a watch queue outlives its last consumer: long enough for a producer to
/// ride out a broker outage, short enough that abandoned watches clean themselves up.
pub const WATCH_EXPIRES: Duration = Duration::from_secs(3600);

/// A subscription to one job's event, made before the job can end so that the event
/// cannot slip past.
pub struct Watch {
    link: Arc<BrokerLink>,
    store: Option<Store>,
    job_id: String,
    queue: String,
}

impl Client {
    /// Connects to the broker and declares the exchanges and the intake queue, so
    /// that a request submitted before any pod starts waits for one.
    pub async fn connect(config: &Config) -> Result<Self, Error> {
        let client = Self {
            link: Arc::new(BrokerLink::new(config.amqp_url.clone())),
            publisher: tokio::sync::Mutex::new(None),
            topology: Topology::new(config.prefix.clone(), config.queue_type),
            store: None,
        };
        client.publisher().await?;
        Ok(client)
    }

    /// The live connection, waiting up to [`PATIENCE`] for the broker.
    async fn connection(&self) -> Result<Arc<Connection>, Error> {
        let gave_up = CancellationToken::new();
        let timer = {
            let gave_up = gave_up.clone();
            tokio::spawn(async move {
                tokio::time::sleep(PATIENCE).await;
                gave_up.cancel();
            })
        };
        let connection = self.link.connection(&gave_up).await;
        timer.abort();
        connection
            .ok_or_else(|| Error::Other(format!("the broker was unreachable for {PATIENCE:?}")))
    }

    /// A publisher on a live connection, with the topology declared on it.
    async fn publisher(&self) -> Result<Publisher, Error> {
        let mut current = self.publisher.lock().await;
        if let Some(publisher) = current.as_ref() {
            if publisher.connection().status().connected() {
                return Ok(publisher.clone());
            }
        }
        let connection = self.connection().await?;
        let publisher = Publisher::open(&connection).await?;
        self.topology.forget_declared();
        self.topology
            .declare_core(&publisher.channel().await?)
            .await?;
        *current = Some(publisher.clone());
        Ok(publisher)
    }

    /// Lets [`Client::wait`] read the outcome of jobs that already ended.
    pub fn with_store(mut self, store: database::Store) -> Self {
        self.store = Some(store.0);
        self
    }

    /// The exchange and queue names the client uses.
    pub(crate) fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes a job request (confirmed) and returns its job id, generated when the
    /// request has none. A job of more than [`PART_TASKS`] tasks goes in parts
    /// ([`Client::open_job`]), so that no request outgrows the intake's limit.
    pub async fn submit(&self, mut request: JobRequest) -> Result<String, Error> {
        let job_id = request
            .job_id
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        match request.tasks.take() {
            Some(tasks) if tasks.len() > PART_TASKS => {
                let mut job = self.open_job(request)?;
                for task in &tasks {
                    job.push(task).await?;
                }
                job.seal().await
            }
            tasks => {
                request.tasks = tasks;
                self.publish_request(&request).await?;
                Ok(job_id)
            }
        }
    }

    /// Opens a job to send in parts: push its tasks one by one ([`JobParts::push`]),
    /// each part going out as it fills, then [`JobParts::seal`] it. The request gives
    /// the job's settings (its `tasks` are ignored; its `job_id` is generated when
    /// absent). Memory holds one part at a time, whatever the job's size.
    pub fn open_job(&self, request: JobRequest) -> Result<JobParts<'_>, Error> {
        Ok(JobParts {
            client: self,
            parting: Parting::new(request)?,
        })
    }

    /// Publishes one request (confirmed), retrying on a new connection while the
    /// broker is away for up to [`PATIENCE`].
    async fn publish_request<T: serde::Serialize>(
        &self,
        request: &JobRequest<T>,
    ) -> Result<(), Error> {
        request.validate()?;
        let body = serde_json::to_vec(request).expect("a request serializes");
        let exchange = self.topology.jobs_exchange();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut delays = Delays::reconnect(Duration::from_secs(5));
        loop {
            let sent = match self.publisher().await {
                Ok(publisher) => publisher
                    .publish(Outgoing {
                        exchange: &exchange,
                        routing_key: &request.job_type,
                        body: &body,
                        mandatory: true,
                        headers: None,
                    })
                    .await
                    .map_err(Error::from),
                Err(err) => Err(err),
            };
            match sent {
                Ok(()) => return Ok(()),
                // Resending is safe: the job id (and a part's number) makes a second
                // copy create nothing.
                Err(err)
                    if err.is_broker_connection() && tokio::time::Instant::now() < deadline =>
                {
                    self.link.report(&err);
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Subscribes to the event of `job_id`. Call before [`Client::submit`] to wait
    /// without a store. The subscription is a queue of its own on the broker, durable
    /// and removed once unused for [`WATCH_EXPIRES`]: an event published while the
    /// connection is down waits there, and [`Watch::event`] reconnects to take it.
    pub async fn watch(&self, job_id: &str) -> Result<Watch, Error> {
        let queue = self.topology.watch_queue(job_id);
        let channel = self.connection().await?.create_channel().await?;
        let declared = self
            .topology
            .declare_watch_queue(&channel, &queue, job_id, WATCH_EXPIRES)
            .await;
        crate::amqp::broker::close_channel(&channel).await;
        declared?;
        Ok(Watch {
            link: self.link.clone(),
            store: self.store.clone(),
            job_id: job_id.to_owned(),
            queue,
        })
    }

    /// Waits for the job's event. With a store, a job that already ended answers at
    /// once; without one, only events published after this call are seen.
    pub async fn wait(&self, job_id: &str) -> Result<JobEvent, Error> {
        self.watch(job_id).await?.event().await
    }

    /// Cancels a running job, or one still forming (a job in parts whose first parts
    /// run): its unfinished tasks become `cancelled`, handlers still running are
    /// ignored when they finish, and one `job.cancelled` event goes out; parts sent
    /// after it are refused. `None`: the job had ended (or never was). Needs a store
    /// ([`Client::with_store`]).
    pub async fn cancel(&self, job_id: &str) -> Result<Option<JobEvent>, Error> {
        let store = self.store.as_ref().ok_or_else(|| {
            Error::Config("cancelling a job needs a store: Client::with_store".into())
        })?;
        operations::cancel_job(store, &self.publisher().await?, &self.topology, job_id).await
    }

    /// Runs a failed job again: its failed and cancelled tasks start over with fresh
    /// attempts, the job goes back to `running` in its next run and ends once more,
    /// with one new event (its `run` says which). Returns how many tasks run again.
    /// [`Error::UnknownJob`] for no such job; [`Error::NotRetried`] with the reason for
    /// a job that is not `failed`, failed in formation, failed as a whole (no task to
    /// run again), or whose last event is still being delivered. The tasks are sent by
    /// the pods' feeders (the intakes' orphan scan finds the job within seconds), not
    /// by this call: a retry that returned has nothing left to send. Needs a store
    /// ([`Client::with_store`]).
    pub async fn retry(&self, job_id: &str) -> Result<u64, Error> {
        let store = self.store.as_ref().ok_or_else(|| {
            Error::Config("retrying a job needs a store: Client::with_store".into())
        })?;
        operations::retry_job(store, job_id).await
    }

    /// The job's task results and errors in task order, read from the store a page at
    /// a time as the stream is polled (a job of a million tasks needs little memory);
    /// only tasks in `status` when given. A task that has not ended comes with its
    /// status and no result. Needs a store ([`Client::with_store`]).
    pub async fn results(
        &self,
        job_id: &str,
        status: Option<TaskStatus>,
    ) -> Result<BoxStream<'static, Result<TaskResult, Error>>, Error> {
        let store = self.store.as_ref().ok_or_else(|| {
            Error::Config("reading results needs a store: Client::with_store".into())
        })?;
        let results = store
            .results(job_id, status)
            .await?
            .ok_or_else(|| Error::UnknownJob(job_id.to_owned()))?;
        Ok(results.map_err(Error::from).boxed())
    }

    /// A multi-stage job's result (map → reduce → finalize): `None` while it runs, for a job of
    /// one stage, or one that did not end `done`. Needs a store.
    pub async fn job_result(&self, job_id: &str) -> Result<Option<serde_json::Value>, Error> {
        let store = self.store.as_ref().ok_or_else(|| {
            Error::Config("reading a job's result needs a store: Client::with_store".into())
        })?;
        let job = store
            .job(job_id)
            .await?
            .ok_or_else(|| Error::UnknownJob(job_id.to_owned()))?;
        Ok(job.result)
    }

    /// Closes the publishing channel and the broker connection.
    pub async fn close(self) -> Result<(), Error> {
        if let Some(publisher) = self.publisher.lock().await.take() {
            publisher.close().await;
        }
        self.link.close().await;
        Ok(())
    }
}

impl Watch {
    /// Where a request's `on_complete` can point so that its answer reaches this watch
    /// whatever it is: the stored event of a job that ended before (a resubmission
    /// hears it on its own target only), or the rejection of a request that reuses
    /// another job's id.
    pub(crate) fn reply_target(&self) -> crate::protocol::Target {
        crate::protocol::Target {
            exchange: String::new(),
            routing_key: self.queue.clone(),
        }
    }

    /// Waits for the job's event, riding out lost connections (it reconnects and
    /// consumes its queue again) for as long as it takes; wrap it in a timeout to
    /// bound the wait. A rejected request is [`Error::Rejected`].
    pub async fn event(self) -> Result<JobEvent, Error> {
        let mut delays = Delays::reconnect(Duration::from_secs(5));
        let event = loop {
            match self.receive().await {
                Ok(event) => break event,
                Err(err) if err.is_transient() => {
                    self.link.report(&err);
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
                }
                Err(err) => return Err(err),
            }
        };
        if event.is_rejected() {
            return Err(Error::Rejected {
                job_id: event.job_id,
                reason: event.first_error.unwrap_or_default(),
            });
        }
        Ok(event)
    }

    /// One connection's worth of waiting: the stored event if the job already ended,
    /// else the first event of this job from the watch queue (which is then removed).
    async fn receive(&self) -> Result<JobEvent, Error> {
        let never = CancellationToken::new();
        let connection = self
            .link
            .connection(&never)
            .await
            .ok_or_else(|| Error::Other("the broker link closed".into()))?;
        let channel = connection.create_channel().await?;
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        if let Some(stored) = self.stored_event().await? {
            self.finish(&channel).await;
            return Ok(stored);
        }
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            match serde_json::from_slice::<JobEvent>(&delivery.data) {
                // A multi-stage job's progress: the end is still to come.
                Ok(event) if event.is_progress() => {}
                Ok(event) if event.job_id == self.job_id => {
                    self.finish(&channel).await;
                    return Ok(event);
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, "unreadable job event ignored"),
            }
        }
        Err(Error::Other(format!(
            "the event stream of job {} ended; consuming again",
            self.job_id
        )))
    }

    async fn stored_event(&self) -> Result<Option<JobEvent>, Error> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let Some(row) = store.job_event(&self.job_id).await? else {
            return Ok(None);
        };
        serde_json::from_value(row.body)
            .map(Some)
            .map_err(|err| Error::unreadable_event(&self.job_id, &err))
    }

    /// Removes the watch queue: it has served its purpose.
    async fn finish(&self, channel: &Channel) {
        let _ = channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        crate::amqp::broker::close_channel(channel).await;
    }
}

/// A job being sent in parts ([`Client::open_job`]).
pub struct JobParts<'a> {
    client: &'a Client,
    parting: Parting,
}

impl JobParts<'_> {
    /// The job's id.
    pub fn job_id(&self) -> &str {
        self.parting.job_id()
    }

    /// Adds a task; sends a part once [`PART_TASKS`] tasks or
    /// [`PART_BYTES`](crate::parting::PART_BYTES) bytes are
    /// waiting.
    pub async fn push(&mut self, payload: &serde_json::Value) -> Result<(), Error> {
        let raw = serde_json::value::to_raw_value(payload).expect("a JSON value serializes");
        self.push_raw(raw).await
    }

    /// [`JobParts::push`] for a payload that is JSON text already.
    pub async fn push_raw(&mut self, payload: Box<RawValue>) -> Result<(), Error> {
        if let Some(part) = self.parting.push(payload) {
            self.client.publish_request(&part).await?;
        }
        Ok(())
    }

    /// Sends what is waiting and seals the job; returns its id. A job that fits in
    /// one part goes as one plain request instead.
    pub async fn seal(self) -> Result<String, Error> {
        let job_id = self.job_id().to_owned();
        for request in self.parting.finish() {
            self.client.publish_request(&request).await?;
        }
        Ok(job_id)
    }
}
