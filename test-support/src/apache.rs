//! Apache Kafka for tests (feature `apache-kafka`): a KRaft cluster of 1 or 3 combined broker+controller
//! nodes, run from the jars `make setup` fetches from Maven Central (or `$KAFKA_HOME/libs`), on free
//! loopback ports in a temp dir, each node under the reaper's watchdog.
//!
//! Every node has four listeners: `PLAINTEXT` (tests, inter-broker), `SASL_SSL` (SCRAM-SHA-256,
//! SCRAM-SHA-512 and PLAIN for the users in [`USERS`], created at format time), `SSL` (a client
//! certificate from [`KafkaCluster::ca`] is required; the principal is its CN) and `CONTROLLER`. With
//! [`Options::acls`], the `StandardAuthorizer` refuses what no ACL allows, except to the super user
//! `admin` and to the `PLAINTEXT` listener's anonymous principal.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use crate::tls::{self, TestCa};

/// The Apache Kafka version `make setup` fetches (scripts/kafka/pom.xml).
pub const KAFKA_VERSION: &str = "4.4.0";

/// SASL users created at format time: `(name, password)`, each for SCRAM-SHA-256, SCRAM-SHA-512 and
/// PLAIN. `admin` is a super user when ACLs are on.
pub const USERS: &[(&str, &str)] = &[
    ("admin", "admin-secret"),
    ("relay", "relay-secret"),
    ("consumer", "consumer-secret"),
];

/// How a cluster starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes, each broker and controller (1 or 3).
    pub nodes: usize,
    /// Turn on the `StandardAuthorizer`: without an ACL only `admin` and `PLAINTEXT` clients may act.
    pub acls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 1,
            acls: false,
        }
    }
}

/// Where the broker's jars are: `$KAFKA_HOME/libs`, else the cache `make setup` fills.
pub fn libs_dir() -> PathBuf {
    match std::env::var_os("KAFKA_HOME") {
        Some(home) => PathBuf::from(home).join("libs"),
        None => crate::cache_dir()
            .join(format!("kafka-{KAFKA_VERSION}"))
            .join("libs"),
    }
}

fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin/java"))
        .unwrap_or_else(|| "java".into())
}

struct Node {
    id: usize,
    plain: u16,
    sasl: u16,
    ssl: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn props(&self) -> PathBuf {
        self.dir.join("server.properties")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

/// A running Apache Kafka cluster. Dropping it stops every node; a shared one ([`shared`]) is stopped by
/// the reaper when the test process ends.
pub struct KafkaCluster {
    nodes: Mutex<Vec<Node>>,
    ca: TestCa,
    ca_path: PathBuf,
    started_in: Duration,
    // Removed last: the nodes' data and logs.
    _dir: tempfile::TempDir,
}

/// A short random id: Kafka's cluster id is 16 bytes, base64url without padding.
fn cluster_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = Vec::with_capacity(16);
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        bytes.extend_from_slice(&h.finish().to_le_bytes());
    }
    use base64::Engine as _;
    let mut id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    // An id starting with '-' reads as an option to the storage tool's argument parser (seen in CI).
    if id.starts_with('-') {
        id.replace_range(0..1, "A");
    }
    id
}

impl KafkaCluster {
    /// Formats and starts a cluster, and waits until every broker is in the metadata.
    pub fn start(options: &Options) -> anyhow::Result<Self> {
        let begun = Instant::now();
        let libs = libs_dir();
        if !libs
            .join(format!("kafka_2.13-{KAFKA_VERSION}.jar"))
            .exists()
            && std::env::var_os("KAFKA_HOME").is_none()
        {
            bail!(
                "Apache Kafka {KAFKA_VERSION} not found in {} (run `make setup`, or set KAFKA_HOME)",
                libs.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("apache-kafka-").tempdir()?;
        let ca = TestCa::new("outbox-test-kafka-ca")?;
        let ca_path = tls::write(dir.path(), "ca.pem", ca.pem())?;
        let server = ca.loopback_server()?;
        let keystore = tls::write(
            dir.path(),
            "broker.pem",
            &format!("{}{}", server.key_pem, server.cert_pem),
        )?;
        fs::write(dir.path().join("log4j2.properties"), LOG4J2)?;

        let n = options.nodes;
        let controllers: Vec<u16> = (0..n).map(|_| crate::free_port()).collect();
        let voters = controllers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, controller) in controllers.iter().enumerate() {
            let node = Node {
                id: i + 1,
                plain: crate::free_port(),
                sasl: crate::free_port(),
                ssl: crate::free_port(),
                dir: dir.path().join(format!("node-{}", i + 1)),
                child: None,
            };
            fs::create_dir_all(&node.dir)?;
            let props = server_properties(
                &node,
                *controller,
                &voters,
                n,
                options.acls,
                &keystore,
                &ca_path,
            );
            fs::write(node.props(), props)?;
            nodes.push(node);
        }

        // Formatting starts a JVM per node: in parallel.
        let id = cluster_id();
        let formats = nodes
            .iter()
            .map(|node| {
                let mut cmd = Command::new(java());
                cmd.arg("-cp")
                    .arg(libs.join("*"))
                    .args(["kafka.tools.StorageTool", "format", "-t", &id, "-c"])
                    .arg(node.props());
                for (name, password) in USERS {
                    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
                        cmd.arg("--add-scram")
                            .arg(format!("{mechanism}=[name={name},password={password}]"));
                    }
                }
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .with_context(|| format!("format node {}", node.id))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (node, format) in nodes.iter().zip(formats) {
            let out = format.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "kafka-storage format node {}: {}{}",
                    node.id,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }

        for node in &mut nodes {
            node.child = Some(spawn(node, dir.path())?);
        }
        let mut cluster = Self {
            nodes: Mutex::new(nodes),
            ca,
            ca_path,
            started_in: Duration::ZERO,
            _dir: dir,
        };
        cluster.wait_for_brokers(n, Duration::from_secs(90))?;
        cluster.started_in = begun.elapsed();
        Ok(cluster)
    }

    /// How long [`KafkaCluster::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The cluster's size.
    pub fn size(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Node>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn listeners(&self, port: impl Fn(&Node) -> u16) -> String {
        self.lock()
            .iter()
            .map(|n| format!("127.0.0.1:{}", port(n)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `bootstrap.servers` of the `PLAINTEXT` listeners.
    pub fn bootstrap(&self) -> String {
        self.listeners(|n| n.plain)
    }

    /// `bootstrap.servers` of the `SASL_SSL` listeners (SCRAM-SHA-256/512, PLAIN; CA: [`Self::ca_pem`]).
    pub fn sasl_ssl_bootstrap(&self) -> String {
        self.listeners(|n| n.sasl)
    }

    /// `bootstrap.servers` of the `SSL` listeners, which require a client certificate from [`Self::ca`].
    pub fn ssl_bootstrap(&self) -> String {
        self.listeners(|n| n.ssl)
    }

    /// The CA that signed the brokers' certificate; it issues client certificates for the `SSL` listener.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.pem()
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// An admin client on the `PLAINTEXT` listeners.
    pub fn admin(&self) -> anyhow::Result<AdminClient<DefaultClientContext>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()?)
    }

    fn wait_for_brokers(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let admin = self.admin()?;
        let deadline = Instant::now() + timeout;
        loop {
            match admin.inner().fetch_metadata(None, Duration::from_secs(2)) {
                Ok(md) if md.brokers().len() >= n => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!(
                        "Apache Kafka: {n} brokers not up in {timeout:?}\n{}",
                        self.logs()
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Creates a topic with `partitions` and `replication`, extra configs `(name, value)`.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication: i32,
        config: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
        for (k, v) in config {
            topic = topic.set(k, v);
        }
        let res = self
            .admin()?
            .create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
            )
            .await?;
        for r in res {
            r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
        }
        Ok(())
    }

    /// The node leading `topic`'s `partition`, from the metadata of the `PLAINTEXT` listeners.
    pub fn leader(&self, topic: &str, partition: i32) -> anyhow::Result<usize> {
        let md = self
            .admin()?
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let t = md.topics().first().context("no such topic")?;
        let p = t
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .with_context(|| format!("{topic} has no partition {partition}"))?;
        usize::try_from(p.leader()).context("the partition has no leader")
    }

    fn with_node<T>(
        &self,
        id: usize,
        f: impl FnOnce(&mut Node, &Path) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let dir = self._dir.path().to_path_buf();
        let mut nodes = self.lock();
        let node = nodes
            .iter_mut()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))?;
        f(node, &dir)
    }

    /// SIGKILLs node `id` (its data stays for [`Self::restart`]).
    pub fn kill(&self, id: usize) -> anyhow::Result<()> {
        self.with_node(id, |node, _| {
            if let Some(mut child) = node.child.take() {
                child.kill()?;
                child.wait()?;
            }
            Ok(())
        })
    }

    /// Starts node `id` again on its ports and data, after [`Self::kill`].
    pub fn restart(&self, id: usize) -> anyhow::Result<()> {
        self.with_node(id, |node, dir| {
            if node.child.is_none() {
                node.child = Some(spawn(node, dir)?);
            }
            Ok(())
        })
    }

    /// SIGSTOPs (`pause`) or SIGCONTs node `id`.
    pub fn pause(&self, id: usize, pause: bool) -> anyhow::Result<()> {
        self.with_node(id, |node, _| {
            let child = node.child.as_ref().context("node is not running")?;
            let signal = if pause {
                nix::sys::signal::Signal::SIGSTOP
            } else {
                nix::sys::signal::Signal::SIGCONT
            };
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
            Ok(())
        })
    }

    /// The last `lines` of node `id`'s log.
    pub fn log_tail(&self, id: usize, lines: usize) -> String {
        let path = self.with_node(id, |node, _| Ok(node.log())).ok();
        let text = path
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every node's log tail, for a failing test.
    pub fn logs(&self) -> String {
        let ids: Vec<usize> = self.lock().iter().map(|n| n.id).collect();
        ids.into_iter()
            .map(|id| {
                format!(
                    "--- Apache Kafka node {id} (last 40 lines) ---\n{}",
                    self.log_tail(id, 40)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for node in self.lock().iter_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn(node: &Node, dir: &Path) -> anyhow::Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.log())?;
    let child = Command::new(java())
        // Small heaps: three nodes share a test machine with PostgreSQL and the control plane.
        .args(["-Xms128m", "-Xmx512m", "-XX:+UseG1GC"])
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            dir.join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(libs_dir().join("*"))
        .arg("kafka.Kafka")
        .arg(node.props())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {} (Java 17+ needed)", java().display()))?;
    // The data goes with the test process, whichever node's watchdog gets there first.
    crate::reaper::watch(child.id(), "KILL", Some(dir));
    Ok(child)
}

fn server_properties(
    node: &Node,
    controller: u16,
    voters: &str,
    nodes: usize,
    acls: bool,
    keystore: &Path,
    ca: &Path,
) -> String {
    let plain_users: String = USERS
        .iter()
        .map(|(u, p)| format!(" user_{u}=\"{p}\""))
        .collect();
    let replicas = nodes.min(3);
    let min_isr = if nodes >= 3 { 2 } else { 1 };
    let mut props = format!(
        "process.roles=broker,controller\n\
         node.id={id}\n\
         controller.quorum.voters={voters}\n\
         listeners=PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{sasl},SSL://127.0.0.1:{ssl},CONTROLLER://127.0.0.1:{controller}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{sasl},SSL://127.0.0.1:{ssl}\n\
         controller.listener.names=CONTROLLER\n\
         listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL,CONTROLLER:PLAINTEXT\n\
         inter.broker.listener.name=PLAINTEXT\n\
         log.dirs={data}\n\
         default.replication.factor={replicas}\n\
         min.insync.replicas={min_isr}\n\
         offsets.topic.replication.factor={replicas}\n\
         offsets.topic.num.partitions=10\n\
         transaction.state.log.replication.factor={replicas}\n\
         transaction.state.log.min.isr={min_isr}\n\
         share.coordinator.state.topic.replication.factor={replicas}\n\
         share.coordinator.state.topic.min.isr={min_isr}\n\
         group.initial.rebalance.delay.ms=0\n\
         sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN\n\
         listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
         listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
         listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required{plain_users};\n\
         ssl.keystore.type=PEM\n\
         ssl.keystore.location={keystore}\n\
         ssl.truststore.type=PEM\n\
         ssl.truststore.location={ca}\n\
         listener.name.ssl.ssl.client.auth=required\n\
         ssl.principal.mapping.rules=RULE:^CN=([^,]*).*$/$1/,DEFAULT\n",
        id = node.id,
        plain = node.plain,
        sasl = node.sasl,
        ssl = node.ssl,
        data = node.dir.join("data").display(),
        keystore = keystore.display(),
        ca = ca.display(),
    );
    if acls {
        props.push_str(
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n\
             super.users=User:admin;User:ANONYMOUS\n\
             allow.everyone.if.no.acl.found=false\n",
        );
    }
    props
}

const LOG4J2: &str = "status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.kafka.name = org.apache.kafka
logger.kafka.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
";

static SHARED: OnceLock<KafkaCluster> = OnceLock::new();

/// The cluster of `nodes` shared by every test in this process, started on first use (a later call's size
/// must match). A test that panics prints the nodes' log tails.
pub fn shared(nodes: usize) -> &'static KafkaCluster {
    let cluster = SHARED.get_or_init(|| {
        let cluster = KafkaCluster::start(&Options {
            nodes,
            ..Options::default()
        })
        .unwrap_or_else(|e| panic!("start Apache Kafka: {e:#}"));
        eprintln!(
            "Apache Kafka {KAFKA_VERSION} ({nodes} node{}) at {} ready in {:.1?}",
            if nodes == 1 { "" } else { "s" },
            cluster.bootstrap(),
            cluster.started_in()
        );
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if let Some(c) = SHARED.get() {
                eprintln!("{}", c.logs());
            }
        }));
        cluster
    });
    assert_eq!(cluster.size(), nodes, "one shared cluster size per process");
    cluster
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_ids_are_22_characters_and_never_start_with_a_dash() {
        for _ in 0..2_000 {
            let id = super::cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
        }
    }
}
