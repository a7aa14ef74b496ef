//! Kafka-protocol brokers for tests: librdkafka's mock cluster (in-process, real TCP, fault injection)
//! and tansu (a separate, independent implementation with admin APIs).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// An in-process mock cluster; its brokers listen on 127.0.0.1 ports other processes can reach.
pub type Mock = MockCluster<'static, DefaultProducerContext>;

/// Starts a mock cluster with `brokers` brokers and creates `topics` (name, partitions) on it.
pub fn mock_cluster(brokers: i32, topics: &[(&str, i32)]) -> Mock {
    let mock = MockCluster::new(brokers).expect("start librdkafka mock cluster");
    for (name, partitions) in topics {
        mock.create_topic(name, *partitions, 1)
            .expect("create mock topic");
    }
    mock
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    /// Partition it was in.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Key as text (the outbox writes text keys).
    pub key: Option<String>,
    /// Value bytes.
    pub payload: Vec<u8>,
    /// Headers, values as text.
    pub headers: HashMap<String, String>,
}

/// Reads every record of `topic`: at least up to each partition's high watermark at call time, then on
/// until no record arrives for a second (tansu 0.6 under-reports high watermarks). Sorted by partition
/// then offset. Blocking (librdkafka's own threads do the IO).
pub fn read_topic(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<Record>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-support-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut remaining = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            remaining.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_record = Instant::now();
    while !remaining.is_empty() || last_record.elapsed() < Duration::from_secs(1) {
        if Instant::now() > deadline {
            bail!(
                "reading {topic}: partitions {:?} not read to their end",
                remaining.keys()
            );
        }
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = match msg {
            // A broker restarting (a test killed it): librdkafka reconnects by itself.
            Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown,
            )) => continue,
            other => other?,
        };
        last_record = Instant::now();
        let headers = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (partition, offset) = (msg.partition(), msg.offset());
        out.push(Record {
            partition,
            offset,
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: msg.payload().unwrap_or_default().to_vec(),
            headers,
        });
        if remaining
            .get(&partition)
            .is_some_and(|high| offset + 1 >= *high)
        {
            remaining.remove(&partition);
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// Where the tansu binary is: `$TANSU_BIN`, else the cache `make setup` installs into.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return p.into();
    }
    crate::cache_dir().join("tansu-0.6.0/bin/tansu")
}

/// A tansu broker process with in-memory storage on a loopback port.
pub struct Tansu {
    port: u16,
    child: Child,
}

impl Tansu {
    /// Starts tansu and waits until it answers metadata requests.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_advertising(None)
    }

    /// Starts tansu advertising `127.0.0.1:advertised` (a proxy's port) instead of its own listener.
    pub fn start_advertising(advertised: Option<u16>) -> anyhow::Result<Self> {
        let bin = tansu_bin();
        if !bin.exists() {
            bail!(
                "tansu not found at {} (run `make setup`, or set TANSU_BIN)",
                bin.display()
            );
        }
        let port = crate::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port));
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        crate::reaper::watch(child.id(), "TERM", None);
        let broker = Self { port, child };
        let client: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .create()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .inner()
            .fetch_metadata(None, Duration::from_secs(1))
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("tansu did not answer on {}", broker.bootstrap());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(broker)
    }

    /// `bootstrap.servers` for clients.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates a SCRAM user (`tansu user create`; `sha512` false for SCRAM-SHA-256).
    pub fn create_scram_user(
        &self,
        name: &str,
        password: &str,
        sha512: bool,
    ) -> anyhow::Result<()> {
        let out = Command::new(tansu_bin())
            .args(["user", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args([
                "--mechanism",
                if sha512 { "scram512" } else { "scram256" },
                name,
                password,
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "tansu user create {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Creates a topic through the admin API.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let client: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()?;
        let res = client
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        for r in res {
            r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tansu broker reachable only through a TLS listener (stunnel from Debian's `stunnel4` package) that
/// terminates TLS and, with a client CA, requires a client certificate signed by it (mutual TLS). Tansu
/// advertises the listener's port, so every connection a client makes after bootstrap goes through it too.
pub struct TlsTansu {
    port: u16,
    stunnel: Child,
    broker: Tansu,
    dir: tempfile::TempDir,
}

/// The stunnel binary: `$STUNNEL`, else `stunnel4` or `stunnel` on the PATH.
pub fn stunnel_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("STUNNEL") {
        return Ok(p.into());
    }
    for name in ["stunnel4", "stunnel"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            if dir.join(name).is_file() {
                return Ok(dir.join(name));
            }
        }
    }
    bail!("stunnel not found (run `make setup`, which installs Debian's stunnel4, or set STUNNEL)")
}

impl TlsTansu {
    /// Starts tansu and stunnel with this server certificate and key (PEM); with `client_ca_pem`, clients
    /// must present a certificate that CA signed.
    pub fn start(
        cert_pem: &str,
        key_pem: &str,
        client_ca_pem: Option<&str>,
    ) -> anyhow::Result<Self> {
        let stunnel_bin = stunnel_bin()?;
        let port = crate::free_port();
        let broker = Tansu::start_advertising(Some(port))?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-stunnel-")
            .tempdir()?;
        let file = |name: &str, text: &str| -> anyhow::Result<String> {
            let p = dir.path().join(name);
            std::fs::write(&p, text)?;
            Ok(p.display().to_string())
        };
        let mut conf = format!(
            "foreground = yes\npid =\ndebug = warning\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{}\ncert = {}\nkey = {}\n",
            broker.port,
            file("server.crt", cert_pem)?,
            file("server.key", key_pem)?,
        );
        if let Some(ca) = client_ca_pem {
            conf.push_str(&format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                file("client-ca.crt", ca)?
            ));
        }
        let conf_path = file("stunnel.conf", &conf)?;
        let log = std::fs::File::create(dir.path().join("stunnel.log"))?;
        let stunnel = Command::new(&stunnel_bin)
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", stunnel_bin.display()))?;
        crate::reaper::watch(stunnel.id(), "TERM", None);
        let mut me = Self {
            port,
            stunnel,
            broker,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = me.stunnel.try_wait()? {
                bail!("stunnel exited ({status}): {}", me.log());
            }
            if Instant::now() > deadline {
                bail!("stunnel did not listen on 127.0.0.1:{port}: {}", me.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    /// `bootstrap.servers` of the TLS listener.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's own plaintext port (clients that bootstrap there are still sent to the TLS port).
    pub fn plain_port(&self) -> u16 {
        self.broker.port
    }

    /// What stunnel logged (handshake failures, refused client certificates).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stunnel.log")).unwrap_or_default()
    }
}

impl Drop for TlsTansu {
    fn drop(&mut self) {
        let _ = self.stunnel.kill();
        let _ = self.stunnel.wait();
    }
}

/// A tansu broker that clients reach through a loopback TCP proxy (tansu advertises the proxy), so a broker
/// outage can be made at the proxy: every connection cut, new ones closed at once, while the broker keeps its
/// topics, offsets and groups — what clients see when a broker with durable storage restarts or a network
/// partition heals. Not the mock cluster: after its own `broker_down`/`broker_up` requests on the re-made
/// connections went unanswered for up to a minute (a plain librdkafka consumer shows it too), and cutting
/// its connections mid-rebalance aborts the process (`rd_kafka_mock_cgrp_classic_member_add: Assertion
/// '!member->resp' failed`).
pub struct ProxiedTansu {
    // Field order matters on drop: the proxy first, then the broker.
    proxy: crate::delay_proxy::DelayProxy,
    broker: Tansu,
}

impl ProxiedTansu {
    /// Starts tansu advertising a proxy on a free port, and the proxy.
    pub fn start() -> anyhow::Result<Self> {
        let proxy_port = crate::free_port();
        let broker = Tansu::start_advertising(Some(proxy_port))?;
        let target: std::net::SocketAddr = broker.bootstrap().parse()?;
        let proxy = crate::delay_proxy::DelayProxy::start_on(proxy_port, target, Duration::ZERO)?;
        Ok(Self { proxy, broker })
    }

    /// The bootstrap address clients use (the proxy).
    pub fn bootstrap_servers(&self) -> String {
        self.proxy.addr().to_string()
    }

    /// The broker's own address (bypassing the proxy).
    pub fn direct(&self) -> String {
        self.broker.bootstrap()
    }

    /// Starts an outage: connections cut and refused until [`ProxiedTansu::restore`].
    pub fn cut(&self) {
        self.proxy.cut();
    }

    /// Ends an outage.
    pub fn restore(&self) {
        self.proxy.restore();
    }
}
