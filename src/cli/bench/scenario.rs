//! Running one scenario: fresh worker processes, jobs submitted at once, every job
//! event awaited, then costs read from the database's and the broker's own counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::amqp::topology;
use crate::config::DEFAULT_QUEUE;
use crate::store::Store;
use crate::{builtin, Client, Config, JobEvent, JobRequest};
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use serde::Serialize;
use serde_json::json;

use super::cpu::CpuSeconds;
use super::database::{BenchDb, ServerCounters};
use super::fleet::Fleet;

/// How long fresh workers may take to start consuming.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// How long the broker's and PostgreSQL's statistics may lag behind.
pub const STATS_SETTLE: Duration = Duration::from_secs(6);
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(900);
/// S4's failed attempts wait this long (attempt 1 × this) in the delay ladder.
const RETRY_DELAY_MS: i64 = 100;

pub struct Spec {
    pub name: String,
    pub title: String,
    jobs: usize,
    tasks_per_job: usize,
    workers: usize,
    fail_every: Option<usize>,
    /// A map → reduce word count with this many reduce shards instead of echo tasks.
    reduce_shards: Option<u32>,
    /// Submitted as a user would: `taskmill submit --tasks-file` in a process of its
    /// own (whose memory is measured), the file streamed in parts.
    through_cli: bool,
    /// Submitted with `crate::submit_in`, each job in a database transaction of
    /// its own, which the request relay publishes after the commit.
    in_transactions: bool,
}

impl Spec {
    pub fn new(
        name: &str,
        title: String,
        jobs: usize,
        tasks_per_job: usize,
        workers: usize,
    ) -> Self {
        Self {
            name: name.to_owned(),
            title,
            jobs,
            tasks_per_job,
            workers,
            fail_every: None,
            reduce_shards: None,
            through_cli: false,
            in_transactions: false,
        }
    }

    /// Submit each job with `crate::submit_in` in a transaction of its own.
    pub fn in_transactions(mut self) -> Self {
        self.in_transactions = true;
        self
    }

    /// Submit with `taskmill submit --tasks-file` instead of the library.
    pub fn through_cli(mut self) -> Self {
        self.through_cli = true;
        self
    }

    /// The job is the built-in word count: each task counts the words of a short text,
    /// and `shards` reduce tasks and a finalizer follow.
    pub fn map_reduce(mut self, shards: u32) -> Self {
        self.reduce_shards = Some(shards);
        self
    }

    pub fn failing_every(mut self, k: usize) -> Self {
        self.fail_every = Some(k);
        self
    }

    fn request(&self) -> JobRequest {
        if let Some(shards) = self.reduce_shards {
            // One word per text, from a vocabulary of 1,000: payloads and results the
            // size of S1's, so that the ratio to S1 is the cost of the stages.
            let tasks = (0..self.tasks_per_job)
                .map(|n| json!({ "text": format!("w{}", n * 7 % 1_000) }))
                .collect();
            let mut request = JobRequest::new(builtin::WORDCOUNT, tasks);
            request.reduce_shards = Some(shards);
            request.job_id = Some(uuid::Uuid::new_v4().to_string());
            return request;
        }
        let tasks = (0..self.tasks_per_job)
            .map(|n| match self.fail_every {
                Some(k) => json!({ "n": n, "times": u8::from(n % k == 0) }),
                None => json!({ "n": n }),
            })
            .collect();
        let task_type = if self.fail_every.is_some() {
            builtin::FAIL
        } else {
            builtin::ECHO
        };
        let mut request = JobRequest::new(task_type, tasks);
        request.retry_delay_ms = RETRY_DELAY_MS as u64;
        request.job_id = Some(uuid::Uuid::new_v4().to_string());
        request
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub title: String,
    pub workers: usize,
    pub jobs: usize,
    pub tasks: usize,
    pub seconds: f64,
    pub tasks_per_s: f64,
    pub jobs_per_s: f64,
    pub task_latency_p50_ms: f64,
    pub task_latency_p99_ms: f64,
    pub job_latency_p50_ms: f64,
    pub job_latency_p99_ms: f64,
    /// Transactions per task, PostgreSQL only.
    pub db_transactions_per_task: Option<f64>,
    /// Rows inserted, updated or deleted per task, PostgreSQL only.
    pub db_rows_written_per_task: Option<f64>,
    /// Bytes of WAL written per task (the whole server's), PostgreSQL only.
    pub db_wal_bytes_per_task: Option<f64>,
    /// Bytes the `tasks` table (with indexes) grew by per task, PostgreSQL only.
    pub db_table_bytes_per_task: Option<f64>,
    /// Messages published to the broker per task (management API).
    pub broker_messages_per_task: Option<f64>,
    pub worker_peak_rss_mib: Option<f64>,
    /// From the first submit to the first task finishing.
    pub first_task_ms: Option<f64>,
    /// From spawning the worker processes until each consumed, before the clock
    /// started.
    pub workers_ready_ms: f64,
    /// The `taskmill submit` process's peak resident set, when it submitted.
    pub submit_peak_rss_mib: Option<f64>,
    /// CPU seconds per 100,000 tasks, by process, from submit to the last event.
    pub cpu_s_per_100k_tasks: CpuSeconds,
    pub all_done: bool,
}

pub struct Bench {
    pub(super) config: Config,
    counters: BenchDb,
    pub(super) client: Client,
    /// Every job event seen, by job id, with when it arrived.
    pub(super) events: Arc<Mutex<HashMap<String, (Instant, JobEvent)>>>,
    /// The bench's own connection (events, clean-up, readiness checks).
    pub(super) listener: std::sync::Arc<Connection>,
    api: Option<ManagementApi>,
}

impl Bench {
    pub async fn start(config: &Config, counters: BenchDb) -> anyhow::Result<Self> {
        let client = Client::connect(config).await?;
        let listener = crate::amqp::broker::connect(&config.amqp_url).await?;
        let channel = listener.create_channel().await?;
        let mut consumer = client
            .topology()
            .subscribe_events(&channel, "job.#")
            .await?;
        let events: Arc<Mutex<HashMap<String, (Instant, JobEvent)>>> = Arc::default();
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let event = serde_json::from_slice::<JobEvent>(&delivery.data);
                // A multi-stage job's progress is not its end.
                if let Some(event) = event.ok().filter(|event| !event.is_progress()) {
                    sink.lock()
                        .expect("events lock")
                        .insert(event.job_id.clone(), (Instant::now(), event));
                }
            }
        });
        Ok(Self {
            config: config.clone(),
            counters,
            client,
            events,
            listener,
            api: ManagementApi::from_url(&config.amqp_url),
        })
    }

    pub async fn run(&self, spec: &Spec) -> anyhow::Result<ScenarioResult> {
        let fleet = Fleet::spawn(&self.config, spec.workers)?;
        let workers_ready = self.until_consumed(spec.workers).await?;
        let cpu_before = CpuSeconds::now(&fleet.pids());
        let db_before = self.counters.server_counters().await?;
        let published_before = self.api.as_ref().and_then(ManagementApi::published);

        let requests: Vec<JobRequest> = (0..spec.jobs).map(|_| spec.request()).collect();
        let tasks_file = match spec.through_cli {
            true => Some(TasksFile::write(&requests)?),
            false => None,
        };
        let started = Instant::now();
        let started_at = chrono::Utc::now();
        let mut submit_peak_rss_mib = None;
        let submitted: Vec<(String, Instant)> = match &tasks_file {
            Some(file) => {
                let (ids, rss) = file.submit(&self.config, &requests).await?;
                submit_peak_rss_mib = rss;
                ids.into_iter().map(|id| (id, Instant::now())).collect()
            }
            None if spec.in_transactions => self.submit_in_transactions(requests).await?,
            None => {
                futures::stream::iter(requests)
                    .map(|request| async move {
                        let id = self.client.submit(request).await?;
                        Ok::<_, anyhow::Error>((id, Instant::now()))
                    })
                    .buffer_unordered(64)
                    .try_collect()
                    .await?
            }
        };
        drop(tasks_file);
        let deadline = Instant::now() + SCENARIO_TIMEOUT;
        loop {
            let arrived = {
                let events = self.events.lock().expect("events lock");
                submitted
                    .iter()
                    .filter(|(id, _)| events.contains_key(id))
                    .count()
            };
            if arrived == submitted.len() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: only {arrived} of {} jobs ended",
                spec.name,
                submitted.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rss = fleet.peak_rss_mib();
        let cpu_after = CpuSeconds::now(&fleet.pids());
        fleet.stop().await;

        let (mut job_latencies, mut last_event, mut all_done) = (Vec::new(), started, true);
        // Every task the jobs ran: a multi-stage job's reduce and finalize tasks count.
        let mut tasks = 0;
        {
            let events = self.events.lock().expect("events lock");
            for (id, submitted_at) in &submitted {
                let (at, event) = &events[id];
                job_latencies.push((*at - *submitted_at).as_secs_f64() * 1000.0);
                last_event = last_event.max(*at);
                all_done &= event.is_done();
                tasks += event.task_count as usize;
            }
        }
        let seconds = (last_event - started).as_secs_f64();

        // Worker backends exited with their processes, which flushed their statistics;
        // the broker's are sampled every 5 s.
        tokio::time::sleep(STATS_SETTLE).await;
        let per_task = |delta: i64| delta as f64 / tasks as f64;
        let db_after = self.counters.server_counters().await?;
        // What one of PostgreSQL's counters moved by during the scenario, per task.
        let db_per_task = |counter: fn(&ServerCounters) -> i64| {
            db_before
                .zip(db_after)
                .map(|(before, after)| per_task(counter(&after) - counter(&before)))
        };
        let published_after = self.api.as_ref().and_then(ManagementApi::published);

        // Read latencies on a pool of their own, so its reads land in no later window.
        let reader = Store::connect(&self.config.database_url, 4).await?;
        let mut task_latencies = Vec::new();
        let mut first_finished: Option<chrono::DateTime<chrono::Utc>> = None;
        for (id, _) in &submitted {
            let job = reader
                .job(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("job {id} vanished"))?;
            // The intake publishes a job's first tasks right after creating it.
            let published = job.created_at;
            let finished_at = reader.tasks_of_job(id).await?.into_iter();
            for finished in finished_at.filter_map(|task| task.finished_at) {
                first_finished = Some(first_finished.map_or(finished, |first| first.min(finished)));
                task_latencies
                    .push((finished - published).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
        reader.close().await?;
        Ok(ScenarioResult {
            name: spec.name.clone(),
            title: spec.title.clone(),
            workers: spec.workers,
            jobs: spec.jobs,
            tasks,
            seconds,
            tasks_per_s: tasks as f64 / seconds,
            jobs_per_s: spec.jobs as f64 / seconds,
            task_latency_p50_ms: percentile(&mut task_latencies, 0.50),
            task_latency_p99_ms: percentile(&mut task_latencies, 0.99),
            job_latency_p50_ms: percentile(&mut job_latencies, 0.50),
            job_latency_p99_ms: percentile(&mut job_latencies, 0.99),
            db_transactions_per_task: db_per_task(|c| c.transactions),
            db_rows_written_per_task: db_per_task(|c| c.rows_written),
            db_wal_bytes_per_task: db_per_task(|c| c.wal_bytes),
            db_table_bytes_per_task: db_per_task(|c| c.tasks_bytes),
            broker_messages_per_task: published_before
                .zip(published_after)
                .map(|(b, a)| per_task(a - b)),
            worker_peak_rss_mib: rss,
            first_task_ms: first_finished
                .map(|first| (first - started_at).num_microseconds().unwrap_or(0) as f64 / 1000.0),
            submit_peak_rss_mib,
            workers_ready_ms: workers_ready.as_secs_f64() * 1000.0,
            cpu_s_per_100k_tasks: cpu_after.per_100k_tasks(cpu_before, tasks),
            all_done,
        })
    }

    /// Each request in a transaction of its own, as an application would write it
    /// beside its own rows, 16 at once; each job's clock starts at its commit.
    async fn submit_in_transactions(
        &self,
        requests: Vec<JobRequest>,
    ) -> anyhow::Result<Vec<(String, Instant)>> {
        use sea_orm::TransactionTrait;
        let db = sea_orm::Database::connect(&self.config.database_url).await?;
        let submitted = futures::stream::iter(requests)
            .map(|request| {
                let db = &db;
                async move {
                    let txn = db.begin().await?;
                    let id = crate::submit_in(&txn, request).await?;
                    txn.commit().await?;
                    Ok::<_, anyhow::Error>((id, Instant::now()))
                }
            })
            .buffer_unordered(16)
            .try_collect()
            .await;
        db.close().await?;
        submitted
    }

    /// The ready messages in the deployment's queues now, queue by queue (those not
    /// empty). Counted by passive declares rather than the management API, whose
    /// figures are samples up to seconds old: on a loaded machine a sample taken
    /// before an earlier scenario's queues drained outlives the idle window.
    pub(super) async fn queued_messages(&self) -> anyhow::Result<BTreeMap<String, u32>> {
        let topology = self.client.topology();
        let mut queues = topology.fixed_queues();
        queues.push(topology.work_queue(DEFAULT_QUEUE));
        let mut queued = BTreeMap::new();
        for queue in queues {
            // A missing queue closes the channel: one channel per queue.
            let channel = self.listener.create_channel().await?;
            if let Ok(ready) = topology::ready_in(&channel, &queue).await {
                if ready > 0 {
                    queued.insert(queue, ready);
                }
                let _ = channel.close(200, "counted".into()).await;
            }
        }
        Ok(queued)
    }

    /// Removes what the scenarios declared: the names they use over AMQP (the
    /// management API may be off), then anything else under the prefix through the API.
    pub async fn stop(self) {
        let topology = self.client.topology().clone();
        if let Ok(channel) = self.listener.create_channel().await {
            let mut queues = topology.fixed_queues();
            queues.push(topology.work_queue(DEFAULT_QUEUE));
            for queue in queues {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for exchange in topology.exchanges() {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = self.listener.close(200, "done".into()).await;
        if let Some(api) = &self.api {
            api.delete_prefixed(topology.prefix());
        }
        let _ = self.client.close().await;
    }
}

/// The tasks of a scenario's jobs as `taskmill submit --tasks-file` reads them: one
/// JSON payload per line, in a temporary file removed on drop.
struct TasksFile {
    path: std::path::PathBuf,
}

impl TasksFile {
    fn write(requests: &[JobRequest]) -> anyhow::Result<Self> {
        use std::io::Write as _;
        let path =
            std::env::temp_dir().join(format!("taskmill-bench-{}.jsonl", uuid::Uuid::new_v4()));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for task in requests.iter().flat_map(|r| r.tasks.iter().flatten()) {
            serde_json::to_writer(&mut out, task)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(Self { path })
    }

    /// Runs `taskmill submit` once per request (each with the whole file: the
    /// scenarios that use it have one job), sampling its resident set until it exits.
    /// Returns the job ids and the largest peak.
    async fn submit(
        &self,
        config: &Config,
        requests: &[JobRequest],
    ) -> anyhow::Result<(Vec<String>, Option<f64>)> {
        let exe = std::env::current_exe()?;
        let (mut ids, mut peak) = (Vec::new(), None::<f64>);
        for request in requests {
            let id = request
                .job_id
                .clone()
                .expect("bench requests carry a job id");
            let task_type = request.task_type().to_owned();
            let mut child = tokio::process::Command::new(&exe)
                .args([
                    "submit",
                    "--type",
                    &request.job_type,
                    "--task-type",
                    &task_type,
                ])
                .arg("--tasks-file")
                .arg(&self.path)
                .args(["--job-id", &id])
                .env("AMQP_URL", &config.amqp_url)
                .env("TASKMILL_PREFIX", &config.prefix)
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            let pid = child.id();
            let status = loop {
                if let Some(rss) = pid.and_then(super::fleet::peak_rss_mib_of) {
                    peak = Some(peak.map_or(rss, |p| p.max(rss)));
                }
                tokio::select! {
                    status = child.wait() => break status?,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            };
            anyhow::ensure!(status.success(), "taskmill submit failed: {status}");
            ids.push(id);
        }
        Ok((ids, peak))
    }
}

impl Drop for TasksFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(super) fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() - 1) as f64 * q).round() as usize;
    values[rank]
}

/// RabbitMQ's management API, for the publish counter and the clean-up.
struct ManagementApi {
    base: String,
    vhost: String,
    auth: String,
}

impl ManagementApi {
    fn from_url(amqp_url: &str) -> Option<Self> {
        let uri: lapin::uri::AMQPUri = amqp_url.parse().ok()?;
        let base = std::env::var("TASKMILL_RABBITMQ_API")
            .unwrap_or_else(|_| format!("http://{}:15672/api", uri.authority.host));
        let credentials = format!(
            "{}:{}",
            uri.authority.userinfo.username, uri.authority.userinfo.password
        );
        Some(Self {
            base,
            vhost: uri.vhost.replace('/', "%2F"),
            auth: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(credentials)
            ),
        })
    }

    fn get(&self, path: &str) -> Option<serde_json::Value> {
        ureq::get(&format!("{}/{path}", self.base))
            .header("Authorization", &self.auth)
            .call()
            .ok()?
            .body_mut()
            .read_json()
            .ok()
    }

    /// Messages published in the vhost so far.
    fn published(&self) -> Option<i64> {
        self.get(&format!("vhosts/{}", self.vhost))?["message_stats"]["publish"].as_i64()
    }

    /// Removes the queues and exchanges of one prefix.
    fn delete_prefixed(&self, prefix: &str) {
        for (kind, list) in [("queues", "queues"), ("exchanges", "exchanges")] {
            let Some(items) = self.get(&format!("{list}/{}?columns=name", self.vhost)) else {
                continue;
            };
            for name in items
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| item["name"].as_str())
            {
                if name.starts_with(&format!("{prefix}.")) {
                    let _ = ureq::delete(&format!("{}/{kind}/{}/{}", self.base, self.vhost, name))
                        .header("Authorization", &self.auth)
                        .call();
                }
            }
        }
    }
}

impl Bench {
    /// Waits until the intake, work and completion queues each have a consumer from
    /// every one of `workers` fresh processes, and returns how long that took: a
    /// scenario's clock starts once its workers are up, as a running deployment's are,
    /// so that no timing measures a process starting.
    pub(super) async fn until_consumed(&self, workers: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while !self.all_consumed(workers).await? {
            anyhow::ensure!(
                started.elapsed() < READY_WITHIN,
                "the worker processes did not all start consuming within {READY_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(started.elapsed())
    }

    async fn all_consumed(&self, workers: usize) -> anyhow::Result<bool> {
        let topology = self.client.topology();
        let queues = [
            topology.intake_queue(),
            topology.work_queue(DEFAULT_QUEUE),
            topology.completion_queue(),
        ];
        let channel = self.listener.create_channel().await?;
        for queue in queues {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            // A passive declare of a queue not declared yet fails and closes the channel.
            let declared = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await;
            if !declared.is_ok_and(|queue| queue.consumer_count() as usize >= workers) {
                return Ok(false);
            }
        }
        let _ = channel.close(200, "ready".into()).await;
        Ok(true)
    }
}
