//! The local stack: database, broker and the product's processes, wired together on loopback.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use test_support::apache::KafkaCluster;
use test_support::kafka::{mock_cluster, Mock, ProxiedTansu};

/// The broker a stack started itself.
enum Broker {
    // Held so the cluster lives as long as the stack.
    #[allow(dead_code)]
    Mock(Mock),
    Proxied(ProxiedTansu),
    Apache(Box<KafkaCluster>),
}

/// Which broker a stack starts when it is not given one ([`Options::kafka_bootstrap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kafka {
    /// librdkafka's mock cluster, in process.
    #[default]
    Mock,
    /// tansu behind a proxy that can cut every connection ([`Stack::broker_outage`]).
    ProxiedTansu,
    /// An Apache Kafka cluster of this many KRaft nodes ([`Stack::apache`]); topics get replication factor
    /// min(nodes, 3), and with three nodes `min.insync.replicas=2`.
    Apache(usize),
}
use test_support::pg::{Durability, PgServer};

use crate::bins::bin;
use crate::proc::{Proc, Spec};

/// The topic the demo API writes `OrderCreated` events to.
pub const ORDERS_TOPIC: &str = "orders";
/// A topic the stack creates and no consumer group reads (the soak's poison events go there; its
/// `.dlq` is not created, so their DLQ copies may find no topic).
pub const SCRATCH_TOPIC: &str = "scratch";

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Use this database instead of a throwaway server.
    pub database_url: Option<String>,
    /// Use this Kafka instead of the in-process mock cluster.
    pub kafka_bootstrap: Option<String>,
    /// Partitions of the orders topic (when the stack creates it).
    pub partitions: i32,
    /// Pharmacy consumers (one group).
    pub pharmacy: usize,
    /// Notification consumers (another group).
    pub notification: usize,
    /// Let `POST /orders?crash=after-commit` exit the API.
    pub allow_crash: bool,
    /// Print every process's log lines, prefixed with its name.
    pub echo: bool,
    /// Port of the demo API (0: any free port).
    pub api_port: u16,
    /// Consumer group session timeout (how soon a killed consumer's partitions move).
    pub session_timeout: &'static str,
    /// Environment every process gets besides the stack's (e.g. `DATABASE_CA_FILE`, `KAFKA_TLS`).
    pub extra_env: Vec<(String, String)>,
    /// librdkafka properties of the stack's own admin client (topic creation on a secured broker).
    pub kafka_admin_config: Vec<(String, String)>,
    /// Relay processes: one is named `relay`; more are `relay-1`, `relay-2`, … sharing the outbox through
    /// their coordination mode (`relay_args`).
    pub relays: usize,
    /// Arguments every relay gets besides the stack's (e.g. `--coordination lease …`).
    pub relay_args: Vec<String>,
    /// Environment only the relays get (e.g. `KUBECONFIG`, `POD_NAMESPACE` for lease mode).
    pub relay_env: Vec<(String, String)>,
    /// Durability of the throwaway PostgreSQL server.
    pub durability: Durability,
    /// The broker to start (without [`Options::kafka_bootstrap`]).
    pub kafka: Kafka,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            database_url: None,
            kafka_bootstrap: None,
            partitions: 6,
            pharmacy: 2,
            notification: 1,
            allow_crash: false,
            echo: false,
            api_port: 0,
            session_timeout: "6s",
            extra_env: Vec::new(),
            kafka_admin_config: Vec::new(),
            relays: 1,
            relay_args: Vec::new(),
            relay_env: Vec::new(),
            durability: Durability::Throwaway,
            kafka: Kafka::Mock,
        }
    }
}

/// A running stack. Dropping it kills the processes and removes a throwaway database.
pub struct Stack {
    /// The database every process uses.
    pub database_url: String,
    /// The broker.
    pub bootstrap: String,
    /// Base URL of the demo API.
    pub api: String,
    /// A pool on the database (for ledgers and reports).
    pub pool: PgPool,
    /// Processes by name.
    pub procs: BTreeMap<String, Proc>,
    opts: Options,
    // Field order matters on drop: processes go first (above), then the broker, then the database.
    _mock: Option<Broker>,
    _pg: Option<PgServer>,
}

fn port_or_free(p: u16) -> u16 {
    if p == 0 {
        test_support::free_port()
    } else {
        p
    }
}

impl Stack {
    /// Starts everything and waits until every process is ready.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        let (pg, database_url) = match &opts.database_url {
            Some(url) => (None, url.clone()),
            None => {
                let durability = opts.durability;
                let pg = tokio::task::spawn_blocking(move || PgServer::start(durability)).await??;
                let url = pg.create_database().await?;
                (Some(pg), url)
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url)
            .await
            .with_context(|| format!("connect {database_url}"))?;
        let topics = [
            (ORDERS_TOPIC, opts.partitions),
            ("orders.dlq", 1),
            (SCRATCH_TOPIC, 1),
        ];
        let (mock, bootstrap) = match (&opts.kafka_bootstrap, opts.kafka) {
            (Some(b), _) => {
                create_topics(b, &opts.kafka_admin_config, &topics, 1).await?;
                (None, b.clone())
            }
            (None, Kafka::ProxiedTansu) => {
                let broker = tokio::task::spawn_blocking(ProxiedTansu::start).await??;
                let b = broker.bootstrap_servers();
                create_topics(&b, &opts.kafka_admin_config, &topics, 1).await?;
                (Some(Broker::Proxied(broker)), b)
            }
            (None, Kafka::Apache(nodes)) => {
                let cluster = tokio::task::spawn_blocking(move || {
                    KafkaCluster::start(&test_support::apache::Options {
                        nodes,
                        ..Default::default()
                    })
                })
                .await??;
                println!(
                    "stack: Apache Kafka ({nodes} node{}) ready in {:.1?}",
                    if nodes == 1 { "" } else { "s" },
                    cluster.started_in()
                );
                let b = cluster.bootstrap();
                let replication = nodes.min(3) as i32;
                create_topics(&b, &opts.kafka_admin_config, &topics, replication).await?;
                (Some(Broker::Apache(Box::new(cluster))), b)
            }
            (None, Kafka::Mock) => {
                let mock = mock_cluster(1, &topics);
                let b = mock.bootstrap_servers();
                (Some(Broker::Mock(mock)), b)
            }
        };
        let api_port = port_or_free(opts.api_port);
        let mut stack = Self {
            api: format!("http://127.0.0.1:{api_port}"),
            database_url,
            bootstrap,
            pool,
            procs: BTreeMap::new(),
            opts: opts.clone(),
            _mock: mock,
            _pg: pg,
        };
        // The API migrates the outbox and shop schemas; the others wait for it to be ready.
        stack.spawn(stack.api_spec(api_port)?)?;
        stack.wait_ready(&["api"], Duration::from_secs(60)).await?;
        for name in stack.relay_names() {
            stack.spawn(stack.relay_spec_named(&name)?)?;
        }
        for i in 1..=opts.pharmacy {
            stack.spawn(stack.consumer_spec("pharmacy", i)?)?;
        }
        for i in 1..=opts.notification {
            stack.spawn(stack.consumer_spec("notification", i)?)?;
        }
        let names: Vec<String> = stack.procs.keys().cloned().collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        stack.wait_ready(&names, Duration::from_secs(60)).await?;
        if opts.kafka_bootstrap.is_none() {
            for group in ["pharmacy", "notification"] {
                stack
                    .wait_assigned(group, opts.partitions, Duration::from_secs(60))
                    .await?;
            }
        }
        Ok(stack)
    }

    /// Waits until every order has exactly one effect per group (failing on any duplicate effect), or panics
    /// with the ledger and every process's last lines after `timeout`.
    pub async fn settle(&self, timeout: Duration) -> crate::ledger::Ledger {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let l = crate::ledger::ledger(&self.pool).await.unwrap();
            assert!(l.no_duplicates(), "a duplicate effect: {l:?}");
            if l.complete() {
                return l;
            }
            if tokio::time::Instant::now() > deadline {
                let logs: Vec<String> = self
                    .procs
                    .iter()
                    .map(|(n, p)| format!("--- {n}\n{}", p.logs().join("\n")))
                    .collect();
                panic!(
                    "ledger incomplete after {timeout:?}: {l:?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the members of `group` together own `partitions` partitions (the group has settled).
    pub async fn wait_assigned(
        &self,
        group: &str,
        partitions: i32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let owned = self
                .metric_sum(group, "outbox_consumer_assigned_partitions")
                .await;
            if owned as i32 == partitions {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("group {group} owns {owned} of {partitions} partitions after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn common_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("KAFKA_BOOTSTRAP".into(), self.bootstrap.clone()),
            (
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ];
        env.extend(self.opts.extra_env.iter().cloned());
        env
    }

    fn api_spec(&self, port: u16) -> anyhow::Result<Spec> {
        let mut env = self.common_env();
        if self.opts.allow_crash {
            env.push(("DEMO_ALLOW_CRASH".into(), "1".into()));
        }
        Ok(Spec {
            name: "api".into(),
            program: bin("demo-api")?,
            args: vec!["--http-addr".into(), format!("127.0.0.1:{port}")],
            env,
            http_port: port,
        })
    }

    /// The relays' process names.
    pub fn relay_names(&self) -> Vec<String> {
        match self.opts.relays {
            1 => vec!["relay".into()],
            n => (1..=n).map(|i| format!("relay-{i}")).collect(),
        }
    }

    /// The throwaway PostgreSQL server (none when the stack uses a given database).
    pub fn postgres(&self) -> Option<&PgServer> {
        self._pg.as_ref()
    }

    /// The broker behind its proxy, to take it down and up (only with [`Kafka::ProxiedTansu`]).
    pub fn broker_outage(&self) -> Option<&ProxiedTansu> {
        match &self._mock {
            Some(Broker::Proxied(m)) => Some(m),
            _ => None,
        }
    }

    /// The Apache Kafka cluster, to kill, pause and restart its nodes (only with [`Kafka::Apache`]).
    pub fn apache(&self) -> Option<&KafkaCluster> {
        match &self._mock {
            Some(Broker::Apache(c)) => Some(c),
            _ => None,
        }
    }

    /// How the relay is started (also used to restart it).
    pub fn relay_spec(&self) -> anyhow::Result<Spec> {
        self.relay_spec_named("relay")
    }

    /// How relay `name` is started.
    pub fn relay_spec_named(&self, name: &str) -> anyhow::Result<Spec> {
        let port = test_support::free_port();
        let args: Vec<String> = [
            "run",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--retention",
            "archive",
            "--dlq",
            "true",
            "--poll-interval",
            "100ms",
            "--instance-id",
            name,
        ]
        .map(String::from)
        .to_vec();
        let mut args = args;
        args.extend(self.opts.relay_args.iter().cloned());
        let mut env = self.common_env();
        env.extend(self.opts.relay_env.iter().cloned());
        Ok(Spec {
            name: name.into(),
            program: bin("outbox-relay")?,
            args,
            env,
            http_port: port,
        })
    }

    /// How consumer `role`-`i` is started.
    pub fn consumer_spec(&self, role: &str, i: usize) -> anyhow::Result<Spec> {
        let port = test_support::free_port();
        let name = format!("{role}-{i}");
        let mut args: Vec<String> = [
            "--role",
            role,
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--instance-id",
            &name,
            "--session-timeout",
            self.opts.session_timeout,
            // A quarter of the default: the soak's runs are short, its restarts many.
            "--rejoin-timeout",
            "15s",
            "--backoff-base",
            "100ms",
            "--max-attempts",
            "3",
        ]
        .map(String::from)
        .to_vec();
        if matches!(self._mock, Some(Broker::Mock(_))) {
            // The mock broker answers an empty fetch only at fetch.wait.max.ms (500 ms by default), where
            // a real broker answers as soon as data arrives: keep the demo's latency figures honest.
            args.extend(["--kafka-config".into(), "fetch.wait.max.ms=20".into()]);
        }
        Ok(Spec {
            program: bin("demo-consumer")?,
            args,
            name,
            env: self.common_env(),
            http_port: port,
        })
    }

    /// Starts a process (replacing a stopped one of the same name).
    pub fn spawn(&mut self, spec: Spec) -> anyhow::Result<()> {
        let p = Proc::start(spec, self.opts.echo)?;
        self.procs.insert(p.spec.name.clone(), p);
        Ok(())
    }

    /// Waits until each named process answers 200 on /readyz; fails early when one exits.
    pub async fn wait_ready(&mut self, names: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let http = reqwest::Client::new();
        for name in names {
            loop {
                let p = self
                    .procs
                    .get_mut(*name)
                    .with_context(|| format!("no process {name}"))?;
                if let Some(status) = p.exited() {
                    bail!(
                        "{name} exited during start-up ({status}); its last lines:\n{}",
                        p.logs().join("\n")
                    );
                }
                let url = format!("http://127.0.0.1:{}/readyz", p.spec.http_port);
                if let Ok(r) = http.get(&url).send().await {
                    if r.status().is_success() {
                        break;
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "{name} not ready within {timeout:?}; its last lines:\n{}",
                        p.logs().join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// SIGKILLs a process (a crash).
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self
            .procs
            .get_mut(name)
            .with_context(|| format!("no process {name}"))?;
        p.kill().await;
        Ok(())
    }

    /// Starts a killed or stopped process again with its original settings and waits until it is ready.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let spec = self
            .procs
            .get(name)
            .with_context(|| format!("no process {name}"))?
            .spec
            .clone();
        self.spawn(spec)?;
        self.wait_ready(&[name], Duration::from_secs(60)).await
    }

    /// The /metrics text of a process.
    pub async fn metrics(&self, name: &str) -> anyhow::Result<String> {
        let p = self
            .procs
            .get(name)
            .with_context(|| format!("no process {name}"))?;
        Ok(
            reqwest::get(format!("http://127.0.0.1:{}/metrics", p.spec.http_port))
                .await?
                .text()
                .await?,
        )
    }

    /// Sum of a metric over the processes whose name starts with `prefix`.
    pub async fn metric_sum(&self, prefix: &str, metric: &str) -> f64 {
        let mut total = 0.0;
        for name in self.procs.keys().filter(|n| n.starts_with(prefix)) {
            if let Ok(text) = self.metrics(name).await {
                total += test_support::metric_value(&text, metric);
            }
        }
        total
    }

    /// Processes that exited, with their status (a supervisor reports these).
    pub fn exited(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        self.procs
            .iter_mut()
            .filter_map(|(n, p)| p.exited().map(|s| (n.clone(), s)))
            .collect()
    }

    /// Sends `signal` to a running process (e.g. SIGSTOP / SIGCONT: a paused process keeps its sockets).
    pub fn signal(&self, name: &str, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        self.procs
            .get(name)
            .with_context(|| format!("no process {name}"))?
            .signal(signal)
    }

    /// Stops every process with SIGTERM (consumers and API first, the relays last).
    pub async fn stop(&mut self) -> Vec<(String, Option<std::process::ExitStatus>)> {
        let mut out = Vec::new();
        let mut names: Vec<String> = self.procs.keys().cloned().collect();
        names.sort_by_key(|n| n.starts_with("relay"));
        for name in names {
            if let Some(p) = self.procs.get_mut(&name) {
                out.push((name, p.stop(Duration::from_secs(15)).await));
            }
        }
        out
    }
}

/// Creates the topics on a real Kafka; existing ones are left as they are.
async fn create_topics(
    bootstrap: &str,
    config: &[(String, String)],
    topics: &[(&str, i32)],
    replication: i32,
) -> anyhow::Result<()> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in config {
        c.set(k, v);
    }
    let admin: AdminClient<DefaultClientContext> = c.create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(&new, &opts).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("creating topic {t} on {bootstrap}: {e}"),
        }
    }
    Ok(())
}
