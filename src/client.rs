//! The producer side: submit a job request and wait for its job event.
//!
//! Needs only the broker (any AMQP client can do the same, see the README); given a
//! store too, [`Client::wait`] also answers for jobs that ended before it was called.
//! A lost broker connection is re-established on the next call; a submit that fails
//! on a dead connection is retried on a new one for up to a minute, which is safe
//! because the job id is fixed before the first try.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use futures::StreamExt;
use lapin::{Channel, Connection, Consumer};

use crate::broker::{Outgoing, Publisher};
use crate::config::Config;
use crate::error::Error;
use crate::events::EventPublisher;
use crate::link::BrokerLink;
use crate::protocol::{JobEvent, JobRequest};
use crate::retry::Delays;
use crate::store::Store;
use crate::topology::Topology;

/// How long `connect` and `submit` keep trying while the broker is away.
const PATIENCE: Duration = Duration::from_secs(60);

pub struct Client {
    link: Arc<BrokerLink>,
    publisher: tokio::sync::Mutex<Option<Publisher>>,
    topology: Topology,
    store: Option<Store>,
}

/// A subscription to one job's event, made before the job can end so that the event
/// cannot slip past.
pub struct Watch {
    job_id: String,
    channel: Channel,
    consumer: Consumer,
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
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes a job request (confirmed) and returns its job id, generated when the
    /// request has none.
    pub async fn submit(&self, mut request: JobRequest) -> Result<String, Error> {
        let job_id = request
            .job_id
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        request.validate()?;
        let body = serde_json::to_vec(&request).expect("a request serializes");
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
                Ok(()) => return Ok(job_id),
                // Resending is safe: the job id makes a second copy create nothing.
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
    /// without a store.
    pub async fn watch(&self, job_id: &str) -> Result<Watch, Error> {
        let channel = self.connection().await?.create_channel().await?;
        let consumer = self
            .topology
            .subscribe_events(&channel, &Topology::job_binding_key(job_id))
            .await?;
        Ok(Watch {
            job_id: job_id.to_owned(),
            channel,
            consumer,
        })
    }

    /// Waits for the job's event. With a store, a job that already ended answers at
    /// once; without one, only events published after this call are seen.
    pub async fn wait(&self, job_id: &str) -> Result<JobEvent, Error> {
        let watch = self.watch(job_id).await?;
        if let Some(store) = &self.store {
            if let Some(event) = store.job_event(job_id).await? {
                let _ = watch.channel.close(200, "done".into()).await;
                return serde_json::from_value(event.body).map_err(|err| {
                    Error::Other(format!("stored event of {job_id} is unreadable: {err}"))
                });
            }
        }
        watch.event().await
    }

    /// Cancels a running job: its unfinished tasks become `cancelled`, handlers still
    /// running are ignored when they finish, and one `job.cancelled` event goes out.
    /// `None`: the job was not running. Needs a store ([`Client::with_store`]).
    pub async fn cancel(&self, job_id: &str) -> Result<Option<JobEvent>, Error> {
        let store = self.store.as_ref().ok_or_else(|| {
            Error::Config("cancelling a job needs a store: Client::with_store".into())
        })?;
        let Some(event) = store.cancel_job(job_id).await? else {
            return Ok(None);
        };
        EventPublisher::new(
            self.publisher().await?,
            self.topology.clone(),
            store.clone(),
        )
        .publish_or_defer(&event)
        .await;
        serde_json::from_value(event.body)
            .map(Some)
            .map_err(|err| Error::Other(format!("stored event of {job_id} is unreadable: {err}")))
    }

    pub async fn close(self) -> Result<(), Error> {
        if let Some(publisher) = self.publisher.lock().await.take() {
            publisher.close().await;
        }
        self.link.close().await;
        Ok(())
    }
}

impl Watch {
    pub async fn event(mut self) -> Result<JobEvent, Error> {
        while let Some(delivery) = self.consumer.next().await {
            let delivery = delivery?;
            match serde_json::from_slice::<JobEvent>(&delivery.data) {
                Ok(event) if event.job_id == self.job_id => {
                    crate::broker::close_channel(&self.channel).await;
                    if event.is_rejected() {
                        return Err(Error::Rejected {
                            job_id: event.job_id,
                            reason: event.first_error.unwrap_or_default(),
                        });
                    }
                    return Ok(event);
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, "unreadable job event ignored"),
            }
        }
        Err(Error::Other(format!(
            "event stream for job {} ended",
            self.job_id
        )))
    }
}
