//! The producer side: submit a job request and wait for its job event.
//!
//! Needs only the broker (any AMQP client can do the same, see the README); given a
//! store too, [`Client::wait`] also answers for jobs that ended before it was called.

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use crate::broker::{self, Outgoing, Publisher};
use crate::config::Config;
use crate::error::Error;
use crate::protocol::{JobEvent, JobRequest};
use crate::store::Store;
use crate::topology::Topology;

pub struct Client {
    connection: Connection,
    publisher: Publisher,
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
        let connection = broker::connect(&config.amqp_url).await?;
        let publisher = Publisher::open(&connection).await?;
        let topology = Topology::new(config.prefix.clone(), config.queue_type);
        topology.declare_core(publisher.channel()).await?;
        Ok(Self {
            connection,
            publisher,
            topology,
            store: None,
        })
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
        self.publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: &request.job_type,
                body: &body,
                mandatory: true,
                headers: None,
            })
            .await?;
        Ok(job_id)
    }

    /// Subscribes to the event of `job_id`. Call before [`Client::submit`] to wait
    /// without a store.
    pub async fn watch(&self, job_id: &str) -> Result<Watch, Error> {
        let channel = self.connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                self.topology.events_exchange().as_str().into(),
                Topology::job_binding_key(job_id).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
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

    pub async fn close(self) -> Result<(), Error> {
        self.publisher.close().await;
        self.connection.close(200, "bye".into()).await?;
        Ok(())
    }
}

impl Watch {
    pub async fn event(mut self) -> Result<JobEvent, Error> {
        while let Some(delivery) = self.consumer.next().await {
            let delivery = delivery?;
            match serde_json::from_slice::<JobEvent>(&delivery.data) {
                Ok(event) if event.job_id == self.job_id => {
                    let _ = self.channel.close(200, "done".into()).await;
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
