//! Test harness: every test gets its own RabbitMQ vhost and its own database (a SQLite
//! file or a PostgreSQL database), runs the real roles in-process, and removes both
//! when it ends, even when it fails.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use sea_orm::{ConnectionTrait, Database};
use taskmill::amqp::broker::{self, Outgoing, Publisher};
use taskmill::amqp::topology::Topology;
use taskmill::store::{NewJob, NewTask, Store};
use taskmill::{
    builtin, CancellationToken, Client, Config, FailurePolicy, JobEvent, PodBuilder, Roles,
};

/// The longest a test waits for an outcome (a job ending, a message arriving): long
/// enough for a loaded 2-core CI machine, which is far slower than a laptop. A test
/// that passes waits only as long as the outcome takes.
pub const LONG: Duration = Duration::from_secs(120);

/// Role sets the tests give their pods, named for what they run.
pub const INTAKE_ONLY: Roles = Roles {
    intake: true,
    ..Roles::NONE
};
pub const WORKER_ONLY: Roles = Roles {
    worker: true,
    ..Roles::NONE
};
pub const COMPLETION_ONLY: Roles = Roles {
    completion: true,
    ..Roles::NONE
};
pub const SWEEPER_ONLY: Roles = Roles {
    sweeper: true,
    ..Roles::NONE
};
/// Jobs are formed and their tasks run, but nobody ends them.
pub const INTAKE_AND_WORKER: Roles = Roles {
    intake: true,
    worker: true,
    ..Roles::NONE
};
pub const WORKER_AND_COMPLETION: Roles = Roles {
    worker: true,
    completion: true,
    ..Roles::NONE
};
pub const COMPLETION_AND_SWEEPER: Roles = Roles {
    completion: true,
    sweeper: true,
    ..Roles::NONE
};
pub const NO_INTAKE: Roles = Roles {
    intake: false,
    ..Roles::ALL
};
pub const NO_SWEEPER: Roles = Roles {
    sweeper: false,
    ..Roles::ALL
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs a scenario `async fn name(backend: Backend)` once per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$scenario($crate::common::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$scenario($crate::common::Backend::Postgres).await
                }
            }
        )*
    };
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

fn rabbit_api() -> String {
    env_or("TEST_RABBITMQ_API", "http://127.0.0.1:15672/api")
}

fn rabbit_auth() -> String {
    // guest:guest, the broker's default local account.
    env_or("TEST_RABBITMQ_AUTH", "Basic Z3Vlc3Q6Z3Vlc3Q=")
}

fn postgres_admin_url() -> String {
    env_or(
        "TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

fn postgres_url_for(database: &str) -> String {
    let admin = postgres_admin_url();
    let base = admin
        .rsplit_once('/')
        .map(|(base, _)| base)
        .unwrap_or(&admin);
    format!("{base}/{database}")
}

/// One test's private database, removed when dropped: all a test of the store alone
/// needs (no broker).
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub store: Store,
    name: String,
    sqlite_path: Option<std::path::PathBuf>,
}

impl TestDb {
    /// A new database, migrated.
    pub async fn new(backend: Backend) -> Self {
        let db = Self::unmigrated(backend, &format!("tm_{}", uuid::Uuid::new_v4().simple())).await;
        db.store.migrate().await.expect("migrations apply");
        db
    }

    /// A new, empty database named `name`.
    async fn unmigrated(backend: Backend, name: &str) -> Self {
        log_warnings();
        let (url, sqlite_path) = match backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{name}.db"));
                (format!("sqlite://{}?mode=rwc", path.display()), Some(path))
            }
            Backend::Postgres => {
                let admin = Database::connect(postgres_admin_url())
                    .await
                    .expect("PostgreSQL reachable");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                admin.close().await.unwrap();
                (postgres_url_for(name), None)
            }
        };
        let store = Store::connect(&url, 8).await.expect("database reachable");
        Self {
            backend,
            url,
            store,
            name: name.to_owned(),
            sqlite_path,
        }
    }

    /// Runs each statement, in order.
    pub async fn execute_sql(&self, statements: &[&str]) {
        let db = Database::connect(&self.url).await.expect("connect");
        for statement in statements {
            db.execute_unprepared(statement)
                .await
                .unwrap_or_else(|err| panic!("{statement}: {err}"));
        }
        db.close().await.unwrap();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let backend = self.backend;
        let sqlite_path = self.sqlite_path.take();
        // Async cleanup cannot run in drop; a plain thread with its own runtime can.
        std::thread::spawn(move || match backend {
            Backend::Sqlite => {
                if let Some(path) = sqlite_path {
                    for suffix in ["", "-wal", "-shm"] {
                        let mut file = path.clone().into_os_string();
                        file.push(suffix);
                        let _ = std::fs::remove_file(file);
                    }
                }
            }
            Backend::Postgres => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok(admin) = Database::connect(postgres_admin_url()).await {
                        let _ = admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                        let _ = admin.close().await;
                    }
                });
            }
        })
        .join()
        .unwrap();
    }
}

/// One test's private broker vhost and database.
pub struct TestEnv {
    pub backend: Backend,
    pub config: Config,
    pub store: Store,
    pub name: String,
    pub db: TestDb,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> Self {
        let env = Self::unmigrated(backend).await;
        env.store.migrate().await.expect("migrations apply");
        env
    }

    /// [`Self::new`] with an empty database: for a test of the migrations.
    pub async fn unmigrated(backend: Backend) -> Self {
        log_warnings();
        let name = format!("tm_{}", uuid::Uuid::new_v4().simple());
        let vhost = name.clone();
        tokio::task::spawn_blocking({
            let vhost = vhost.clone();
            move || create_vhost(&vhost)
        })
        .await
        .unwrap();
        let db = TestDb::unmigrated(backend, &name).await;
        let config = Config {
            amqp_url: format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"),
            database_url: db.url.clone(),
            prefix: "tm".to_owned(),
            // `TASKMILL_QUEUE_TYPE=quorum` runs a suite on quorum queues.
            queue_type: Config::from_env()
                .expect("TASKMILL_QUEUE_TYPE is classic or quorum")
                .queue_type,
            grace_period: Duration::from_secs(5),
            // Tests run many pods at once; those that look at the endpoint choose a port.
            http_addr: None,
            ..Config::default()
        };
        Self {
            backend,
            config,
            store: db.store.clone(),
            name,
            db,
        }
    }

    /// This test's configuration with the pod's endpoint on a free port, and its base
    /// URL.
    pub fn config_with_http(&self) -> (Config, String) {
        let addr = free_addr();
        let config = Config {
            http_addr: Some(addr),
            ..self.config.clone()
        };
        (config, format!("http://{addr}"))
    }

    pub fn topology(&self) -> Topology {
        Topology::new(self.config.prefix.clone(), self.config.queue_type)
    }

    /// Runs the `taskmill` binary against the test's broker and database; its
    /// trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_command(args);
        assert!(
            output.status.success(),
            "taskmill {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// Runs the `taskmill` binary, which must fail; its stderr.
    pub fn cli_fails(&self, args: &[&str]) -> String {
        let output = self.cli_command(args);
        assert!(!output.status.success(), "taskmill {args:?} succeeded");
        String::from_utf8(output.stderr).unwrap()
    }

    /// The `taskmill` binary, pointed at this test's broker, database and prefix.
    pub fn taskmill(&self) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_taskmill"));
        command
            .env("AMQP_URL", &self.config.amqp_url)
            .env("DATABASE_URL", &self.config.database_url)
            .env("TASKMILL_PREFIX", &self.config.prefix);
        command
    }

    fn cli_command(&self, args: &[&str]) -> std::process::Output {
        self.taskmill()
            .args(args)
            .env("TASKMILL_LOG_FORMAT", "text")
            .env_remove("TASKMILL_RETENTION")
            .env_remove("TASKMILL_RETENTION_FAILED")
            .env_remove("TASKMILL_PARKING_MAX")
            .output()
            .unwrap()
    }

    /// A pod builder wired to this test's broker and database.
    pub fn pod(&self) -> PodBuilder {
        taskmill::Pod::builder()
            .config(self.config.clone())
            .store(self.store.clone().into())
    }

    pub fn start(&self, builder: PodBuilder) -> Pod {
        let token = CancellationToken::new();
        let handle = tokio::spawn(builder.build().run(token.clone()));
        Pod { token, handle }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.config)
            .await
            .expect("client connects")
            .with_store(self.store.clone().into())
    }

    pub async fn connection(&self) -> Arc<Connection> {
        broker::connect(&self.config.amqp_url)
            .await
            .expect("broker reachable")
    }

    /// Submits a job of `job_type` with these task payloads at the request's defaults;
    /// its id.
    pub async fn submit(&self, job_type: &str, tasks: Vec<serde_json::Value>) -> String {
        let client = self.client().await;
        let id = client
            .submit(taskmill::JobRequest::new(job_type, tasks))
            .await
            .unwrap();
        client.close().await.unwrap();
        id
    }

    /// Collects every job event published from now on, in a queue of its own.
    pub async fn event_log(&self) -> EventLog {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        let topology = self.topology();
        topology.declare_core(&channel).await.unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.name().clone(),
                topology.events_exchange().as_str().into(),
                "job.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        EventLog {
            _connection: connection,
            channel,
            queue: queue.name().to_string(),
            store: self.store.clone(),
            events: Mutex::default(),
        }
    }

    /// Runs SQL of the test's own (a trigger that injects a fault, say) on its database.
    pub async fn execute_sql(&self, statements: &[&str]) {
        self.db.execute_sql(statements).await
    }

    /// How many leases whose name starts with `prefix` are held now (a feed lease is
    /// `feed:<job id>`).
    pub async fn live_leases(&self, prefix: &str) -> i64 {
        self.count(&format!(
            "SELECT count(*) AS n FROM leases WHERE name LIKE '{prefix}%'"
        ))
        .await
    }

    /// The number `sql` selects as `n` (`SELECT count(*) AS n ...`), on the test's
    /// database.
    pub async fn count(&self, sql: &str) -> i64 {
        let rows = self.rows(sql).await;
        rows.first().expect("a count").try_get("", "n").unwrap()
    }

    /// The first column of every row `sql` returns, as text, on the test's database.
    pub async fn texts(&self, sql: &str) -> Vec<String> {
        let rows = self.rows(sql).await;
        rows.iter()
            .map(|row| row.try_get_by_index::<String>(0).unwrap())
            .collect()
    }

    async fn rows(&self, sql: &str) -> Vec<sea_orm::QueryResult> {
        let admin = Database::connect(&self.config.database_url)
            .await
            .expect("database reachable");
        let rows = admin
            .query_all_raw(sea_orm::Statement::from_string(
                admin.get_database_backend(),
                sql.to_owned(),
            ))
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
        admin.close().await.unwrap();
        rows
    }

    /// On PostgreSQL, waits until a partition of the tasks table covers jobs created
    /// from now on (the cleaner makes them a moment ahead): so that a test's jobs are
    /// filed in a partition, not the default one.
    pub async fn wait_for_partition(&self) {
        if self.backend != Backend::Postgres {
            return;
        }
        wait_until(Duration::from_secs(60), || async {
            self.count(
                "SELECT COUNT(*) AS n FROM task_partitions \
                 WHERE starts_at <= now() AND ends_at > now() + interval '200 milliseconds'",
            )
            .await
                > 0
        })
        .await;
    }

    /// The rows of each table that names the job: jobs, tasks, job_events, job_parts.
    pub async fn rows_of_job(&self, job_id: &str) -> [i64; 4] {
        let mut rows = [0; 4];
        for (n, (table, column)) in [
            ("jobs", "id"),
            ("tasks", "job_id"),
            ("job_events", "job_id"),
            ("job_parts", "job_id"),
        ]
        .into_iter()
        .enumerate()
        {
            rows[n] = self
                .count(&format!(
                    "SELECT COUNT(*) AS n FROM {table} WHERE {column} = '{job_id}'"
                ))
                .await;
        }
        rows
    }

    /// Publishes raw bytes (confirmed) with the given content type.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) {
        let connection = self.connection().await;
        let publisher = Publisher::open(&connection).await.unwrap();
        let topology = self.topology();
        topology
            .declare_core(&publisher.channel().await.unwrap())
            .await
            .unwrap();
        topology
            .declare_work_queue(&publisher.channel().await.unwrap(), "default")
            .await
            .unwrap();
        let mut properties = lapin::BasicProperties::default();
        if let Some(kind) = content_type {
            properties = properties.with_content_type(kind.into());
        }
        publisher
            .send_with(
                Outgoing {
                    exchange,
                    routing_key,
                    body,
                    mandatory: true,
                    headers: None,
                },
                properties,
            )
            .await
            .unwrap()
            .confirmed()
            .await
            .unwrap();
        connection.close(200, "done".into()).await.unwrap();
    }

    /// Declares a durable queue in this test's vhost and returns its name.
    pub async fn declare_queue(&self, name: &str) -> String {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        connection.close(200, "done".into()).await.unwrap();
        name.to_owned()
    }

    /// A durable queue bound to every job event: an audit log that survives broker
    /// restarts, read at the end with [`Self::drain_queue`].
    pub async fn audit_events(&self) -> String {
        let name = self.declare_queue("audit.events").await;
        let connection = self.connection().await;
        let publisher = Publisher::open(&connection).await.unwrap();
        let topology = self.topology();
        topology
            .declare_core(&publisher.channel().await.unwrap())
            .await
            .unwrap();
        publisher
            .channel()
            .await
            .unwrap()
            .queue_bind(
                name.as_str().into(),
                topology.events_exchange().as_str().into(),
                "job.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        connection.close(200, "done".into()).await.unwrap();
        name
    }

    /// Names of every queue in this test's vhost (from the management API).
    pub fn queue_names(&self) -> Vec<String> {
        let body: serde_json::Value = ureq::get(&format!(
            "{}/queues/{}?columns=name",
            rabbit_api(),
            self.name
        ))
        .header("Authorization", &rabbit_auth())
        .call()
        .expect("list queues")
        .body_mut()
        .read_json()
        .expect("queue list is JSON");
        body.as_array()
            .expect("a list")
            .iter()
            .filter_map(|queue| queue["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// Open channels in this test's vhost (from the management API, whose figures lag
    /// a few seconds behind).
    pub fn channel_count(&self) -> usize {
        let body: serde_json::Value = ureq::get(&format!(
            "{}/vhosts/{}/channels?columns=name",
            rabbit_api(),
            self.name
        ))
        .header("Authorization", &rabbit_auth())
        .call()
        .expect("list channels")
        .body_mut()
        .read_json()
        .expect("channel list is JSON");
        body.as_array().map_or(0, Vec::len)
    }

    /// A list from the management API, of this test's vhost: `what` is the path after
    /// `/vhosts/<vhost>/`, with its query.
    fn vhost_list(&self, what: &str) -> Vec<serde_json::Value> {
        let body: serde_json::Value =
            ureq::get(&format!("{}/vhosts/{}/{what}", rabbit_api(), self.name))
                .header("Authorization", &rabbit_auth())
                .call()
                .expect("a management API list")
                .body_mut()
                .read_json()
                .expect("the list is JSON");
        match body {
            serde_json::Value::Array(items) => items,
            _ => Vec::new(),
        }
    }

    /// Waits until the management API's channel list is current: it lags, for the
    /// broker collects its figures every few seconds. A probe channel is opened and
    /// awaited in the list: the collection that took it took every channel opened
    /// before it. The probe is then closed and awaited out of the list, which is left
    /// as it was.
    pub async fn wait_for_current_channel_list(&self) {
        let probe = format!("{}-stats-probe", self.name);
        let properties =
            lapin::ConnectionProperties::default().with_connection_name(probe.clone().into());
        let connection = Connection::connect(&self.config.amqp_url, properties)
            .await
            .expect("broker reachable");
        let channel = connection.create_channel().await.unwrap();
        // The API names a channel's connection by its address, not by the name the
        // client gave it, which only the connection list shows.
        let has_probe_channel = |connection: &str| {
            self.vhost_list("channels?columns=connection_details")
                .iter()
                .any(|channel| channel["connection_details"]["name"] == connection)
        };
        let connection_name = wait_for_value(LONG, || async {
            let name = self
                .vhost_list("connections?columns=name,user_provided_name")
                .into_iter()
                .find(|listed| listed["user_provided_name"] == probe.as_str())?
                .get("name")?
                .as_str()?
                .to_owned();
            has_probe_channel(&name).then_some(name)
        })
        .await;
        channel.close(200, "done".into()).await.unwrap();
        connection.close(200, "done".into()).await.unwrap();
        wait_until(LONG, || async { !has_probe_channel(&connection_name) }).await;
    }

    /// Ready messages in a queue, exactly (a passive declare, not the API's sampled stats).
    pub async fn message_count(&self, queue: &str) -> u32 {
        self.passive_declare(queue).await.message_count()
    }

    /// Ready messages in a queue, exactly; `None` while the queue does not exist.
    pub async fn message_count_if_declared(&self, queue: &str) -> Option<u32> {
        self.try_passive_declare(queue)
            .await
            .ok()
            .map(|queue| queue.message_count())
    }

    /// Consumers of a queue right now.
    pub async fn consumer_count(&self, queue: &str) -> u32 {
        self.passive_declare(queue).await.consumer_count()
    }

    /// Consumers of a queue right now; `None` while the queue does not exist.
    pub async fn consumers_if_declared(&self, queue: &str) -> Option<u32> {
        self.try_passive_declare(queue)
            .await
            .ok()
            .map(|queue| queue.consumer_count())
    }

    async fn passive_declare(&self, queue: &str) -> lapin::Queue {
        self.try_passive_declare(queue).await.expect("queue exists")
    }

    async fn try_passive_declare(&self, queue: &str) -> Result<lapin::Queue, lapin::Error> {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        let declared = taskmill::amqp::topology::declare_passive(&channel, queue).await;
        taskmill::amqp::broker::close_connection(&connection).await;
        declared
    }

    /// Takes every message from a queue: (body, reason header).
    pub async fn drain_queue(&self, queue: &str) -> Vec<(Vec<u8>, Option<String>)> {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        let mut messages = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let reason = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|headers| {
                    headers
                        .inner()
                        .get(taskmill::amqp::parking::REASON_HEADER)
                        .cloned()
                })
                .and_then(|value| match value {
                    lapin::types::AMQPValue::LongString(text) => Some(text.to_string()),
                    _ => None,
                });
            messages.push((message.delivery.data.clone(), reason));
        }
        connection.close(200, "done".into()).await.unwrap();
        messages
    }

    /// Waits until the job runs with its feeder holding the default pool's queue more
    /// than half full: the feeder has started and, with no worker, waits for room.
    pub async fn wait_for_feeding(&self, job_id: &str, timeout: Duration) {
        let queue = self.topology().work_queue("default");
        wait_until(timeout, || async {
            let job = self.store.job(job_id).await.unwrap();
            job.is_some_and(|job| job.stage == "running")
                && self
                    .message_count_if_declared(&queue)
                    .await
                    .is_some_and(|ready| ready > taskmill::roles::FEED_DEPTH / 2)
        })
        .await;
    }

    /// Polls the store until the job has left `running`/`formation`.
    pub async fn wait_for_end(
        &self,
        job_id: &str,
        timeout: Duration,
    ) -> taskmill::store::job::Model {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(job) = self.store.job(job_id).await.unwrap() {
                if job
                    .stage
                    .parse::<taskmill::JobStage>()
                    .unwrap()
                    .is_terminal()
                {
                    return job;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {job_id} did not end within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let name = self.name.clone();
        // The database goes with `db`, dropped after this.
        std::thread::spawn(move || delete_vhost(&name))
            .join()
            .unwrap();
    }
}

/// Warnings and errors go to the test's captured output, shown when it fails: the
/// reason a message was parked, a retry that gave up. `RUST_LOG` widens them.
fn log_warnings() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

fn create_vhost(vhost: &str) {
    let api = rabbit_api();
    ureq::put(&format!("{api}/vhosts/{vhost}"))
        .header("Authorization", &rabbit_auth())
        .send_empty()
        .expect("create vhost (is the management plugin enabled?)");
    ureq::put(&format!("{api}/permissions/{vhost}/guest"))
        .header("Authorization", &rabbit_auth())
        .send_json(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .expect("grant vhost permissions");
}

fn delete_vhost(vhost: &str) {
    let _ = ureq::delete(&format!("{}/vhosts/{vhost}", rabbit_api()))
        .header("Authorization", &rabbit_auth())
        .call();
}

/// A pod running in this process.
pub struct Pod {
    pub token: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), taskmill::Error>>,
}

impl Pod {
    pub async fn stop(self) {
        self.token.cancel();
        self.handle.await.unwrap().expect("pod stops cleanly");
    }
}

/// Job events as they reach the events exchange.
pub struct EventLog {
    _connection: Arc<Connection>,
    channel: lapin::Channel,
    queue: String,
    store: Store,
    events: Mutex<Vec<JobEvent>>,
}

impl EventLog {
    /// Every event received so far.
    pub async fn all(&self) -> Vec<JobEvent> {
        while let Some(message) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let event =
                serde_json::from_slice(&message.delivery.data).expect("events are JobEvents");
            self.events.lock().unwrap().push(event);
        }
        self.events.lock().unwrap().clone()
    }

    /// Waits until at least `count` events arrived and no job event is left
    /// unpublished in the outbox. An event is marked published only after the broker
    /// confirmed it into this queue, so the list returned is complete: a duplicate
    /// would be in it, no grace period needed.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<JobEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let settled = self.store.unpublished_event_count().await.unwrap() == 0;
            let events = self.all().await;
            if settled && events.len() >= count {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {count} events within {timeout:?}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A free port on loopback: bound, read, released (another process could take it in
/// between, which this machine's tests do not).
pub fn free_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Polls `check` until it is true.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for_value(timeout, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `produce` until it yields a value.
pub async fn wait_for_value<T, F, Fut>(timeout: Duration, mut produce: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = produce().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy in front of the broker that can stop passing bytes while keeping its
/// sockets open: a broker that no longer answers, as a network partition leaves it.
pub struct FreezableProxy {
    pub port: u16,
    frozen: tokio::sync::watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    pub async fn start(upstream: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, watch) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, watch.clone()));
                tokio::spawn(pump(server_read, client_write, watch.clone()));
            }
        });
        Self {
            port,
            frozen,
            accept,
        }
    }

    /// From now on no byte passes in either direction; connections stay open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// An AMQP URL for `vhost` through this proxy.
    pub fn amqp_url(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.port)
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if *frozen.borrow() {
            // Hold both sockets open and silent for as long as the test runs.
            let _ = frozen.wait_for(|frozen| !frozen).await;
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = frozen.changed() => continue,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if *frozen.borrow() || to.write_all(&buffer[..n]).await.is_err() {
                    // Frozen between read and write: drop the bytes, as a cut link would.
                    if *frozen.borrow() {
                        let _ = frozen.wait_for(|frozen| !frozen).await;
                    }
                    return;
                }
            }
        }
    }
}

/// A job row as the intake creates it, in `formation`.
pub fn echo_job(id: &str, on_failure: FailurePolicy) -> NewJob {
    NewJob {
        id: id.into(),
        job_type: builtin::ECHO.into(),
        queue: "default".into(),
        params: serde_json::Value::Null,
        max_retries: 3,
        retry_delay_ms: 100,
        on_failure,
        on_complete: None,
        request_digest: format!("digest of {id}"),
        task_timeout_ms: None,
        results_in_event: false,
        stage_plan: None,
        run_at: None,
    }
}

/// Task rows for [`echo_job`] from ordinal `from` on, each ordinal its payload.
pub fn echo_tasks(from: i32, count: i32) -> Vec<NewTask> {
    (from..from + count)
        .map(|n| NewTask {
            ordinal: n,
            task_type: builtin::ECHO.into(),
            payload: serde_json::json!(n),
        })
        .collect()
}
