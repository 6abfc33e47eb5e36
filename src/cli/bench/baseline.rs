//! The machine's own limits, measured the way taskmill would use the services.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::database::BenchDb;
use crate::amqp::broker::{self, Outgoing, Publisher};
use crate::Config;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde::Serialize;

const CONFIRM_WINDOW: usize = 1_000;
const ACK_EVERY: u64 = 100;
const DB_CONNECTIONS: i64 = 8;
const DB_ROWS: i64 = 10_000;

#[derive(Clone, Debug, Serialize)]
pub struct BrokerBaseline {
    pub messages: usize,
    pub seconds: f64,
    pub messages_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DatabaseBaseline {
    pub single_row_updates_per_s: f64,
    pub batched_rows_per_s: f64,
}

/// Persistent messages through a durable queue: confirms pipelined 1,000 deep, a
/// consumer on its own connection acking with `multiple` every 100.
pub async fn broker(config: &Config, messages: usize) -> anyhow::Result<BrokerBaseline> {
    let queue = format!("{}.baseline", config.prefix);
    let producer = broker::connect(&config.amqp_url).await?;
    let consumer_connection = broker::connect(&config.amqp_url).await?;
    let publisher = Publisher::open(&producer).await?;
    publisher
        .channel()
        .await?
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let channel = consumer_connection.create_channel().await?;
    channel
        .basic_qos(CONFIRM_WINDOW as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let drained = Arc::new(tokio::sync::Notify::new());
    let done = drained.clone();
    let total = messages as u64;
    let drain = tokio::spawn(async move {
        let mut received = 0u64;
        while let Some(Ok(delivery)) = consumer.next().await {
            received += 1;
            if received.is_multiple_of(ACK_EVERY) || received == total {
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await?;
            }
            if received == total {
                done.notify_one();
                break;
            }
        }
        Ok::<_, lapin::Error>(Instant::now())
    });

    let body = serde_json::to_vec(&serde_json::json!({ "version": 1, "payload": "x".repeat(64) }))?;
    let started = Instant::now();
    let mut window = VecDeque::with_capacity(CONFIRM_WINDOW);
    for _ in 0..messages {
        if window.len() >= CONFIRM_WINDOW {
            let pending: broker::Pending = window.pop_front().expect("window is full");
            pending.confirmed().await?;
        }
        window.push_back(publisher.send(Outgoing::to_queue(&queue, &body)).await?);
    }
    broker::all_confirmed(window.into_iter().collect()).await?;
    drained.notified().await;
    let finished = drain.await??;
    let seconds = (finished - started).as_secs_f64();

    publisher
        .channel()
        .await?
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    publisher.close().await;
    let _ = producer.close(200, "done".into()).await;
    let _ = consumer_connection.close(200, "done".into()).await;
    Ok(BrokerBaseline {
        messages,
        seconds,
        messages_per_s: messages as f64 / seconds,
    })
}

/// Single-row UPDATEs by key from 8 connections, then the same rows 100 per statement.
pub async fn database(db: &BenchDb) -> anyhow::Result<DatabaseBaseline> {
    db.prepare(DB_ROWS).await?;
    let per_connection = DB_ROWS / DB_CONNECTIONS;

    let started = Instant::now();
    let single = futures::future::try_join_all((0..DB_CONNECTIONS).map(|c| async move {
        for i in 0..per_connection {
            db.update_one(c * per_connection + i + 1).await?;
        }
        Ok::<_, anyhow::Error>(())
    }))
    .await;
    single?;
    let single_row_updates_per_s =
        (DB_CONNECTIONS * per_connection) as f64 / started.elapsed().as_secs_f64();

    let rounds = 10;
    let started = Instant::now();
    futures::future::try_join_all((0..DB_CONNECTIONS).map(|c| async move {
        let ids: Vec<i64> = (c * per_connection + 1..=(c + 1) * per_connection).collect();
        for _ in 0..rounds {
            for chunk in ids.chunks(100) {
                db.update_many(chunk).await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    }))
    .await?;
    let batched_rows_per_s =
        (DB_CONNECTIONS * per_connection * rounds) as f64 / started.elapsed().as_secs_f64();
    Ok(DatabaseBaseline {
        single_row_updates_per_s,
        batched_rows_per_s,
    })
}
