//! The Apache Kafka harness: a cluster starts, its listeners authenticate as configured (SCRAM-SHA-256/512
//! and PLAIN over SASL_SSL, client certificates over SSL) and refuse wrong credentials, and a three-node cluster keeps
//! acks=all writes going when a partition leader is SIGKILLed.

#![cfg(feature = "apache-kafka")]

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use test_support::apache::{KafkaCluster, Options};

async fn produce(config: &ClientConfig, topic: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = config
        .clone()
        .set("message.timeout.ms", "15000")
        .set("acks", "all")
        .create()?;
    for i in 0..n {
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&format!("k{i}"))
                    .payload(&format!("v{i}")),
                Duration::from_secs(15),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

fn sasl(cluster: &KafkaCluster, mechanism: &str, user: &str, password: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cluster.sasl_ssl_bootstrap())
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanism", mechanism)
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set("ssl.ca.pem", cluster.ca_pem());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_authenticates_each_listener_and_refuses_wrong_credentials() {
    let cluster = KafkaCluster::start(&Options::default()).expect("start Apache Kafka");
    eprintln!("one node ready in {:.1?}", cluster.started_in());
    cluster.create_topic("auth", 1, 1, &[]).await.unwrap();

    let mut plain = ClientConfig::new();
    plain.set("bootstrap.servers", cluster.bootstrap());
    produce(&plain, "auth", 1).await.expect("PLAINTEXT");
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] {
        produce(
            &sasl(&cluster, mechanism, "relay", "relay-secret"),
            "auth",
            1,
        )
        .await
        .unwrap_or_else(|e| panic!("SASL_SSL {mechanism}: {e}"));
        let mut wrong = sasl(&cluster, mechanism, "relay", "wrong");
        wrong.set("message.timeout.ms", "5000");
        // librdkafka reports the refusal as a client error and the record then times out.
        assert!(
            produce(&wrong, "auth", 1).await.is_err(),
            "{mechanism}: a wrong password is refused"
        );
    }

    let client = cluster.ca().client("relay").unwrap();
    let mut ssl = ClientConfig::new();
    ssl.set("bootstrap.servers", cluster.ssl_bootstrap())
        .set("security.protocol", "SSL")
        .set("ssl.ca.pem", cluster.ca_pem())
        .set("ssl.certificate.pem", &client.cert_pem)
        .set("ssl.key.pem", &client.key_pem);
    produce(&ssl, "auth", 1)
        .await
        .expect("SSL with a client certificate");
    let mut no_cert = ssl.clone();
    no_cert
        .remove("ssl.certificate.pem")
        .remove("ssl.key.pem")
        .set("message.timeout.ms", "5000");
    assert!(
        produce(&no_cert, "auth", 1).await.is_err(),
        "SSL without a client certificate is refused"
    );
    let records = test_support::kafka::read_topic(&cluster.bootstrap(), "auth").unwrap();
    assert_eq!(records.len(), 5, "PLAINTEXT, three SASL mechanisms, SSL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_keep_acks_all_writes_when_the_leader_is_killed() {
    let cluster = KafkaCluster::start(&Options {
        nodes: 3,
        ..Options::default()
    })
    .expect("start Apache Kafka");
    eprintln!("three nodes ready in {:.1?}", cluster.started_in());
    cluster
        .create_topic("replicated", 1, 3, &[("min.insync.replicas", "2")])
        .await
        .unwrap();
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", cluster.bootstrap());
    produce(&config, "replicated", 10).await.unwrap();
    let leader = cluster.leader("replicated", 0).unwrap();
    cluster.kill(leader).unwrap();
    produce(&config, "replicated", 10)
        .await
        .expect("writes go on with two of three replicas");
    let new_leader = test_support::wait_for("a new leader", Duration::from_secs(30), || async {
        cluster
            .leader("replicated", 0)
            .ok()
            .filter(|l| *l != leader)
    })
    .await;
    assert_ne!(new_leader, leader);
    cluster.restart(leader).unwrap();
    let records = test_support::kafka::read_topic(&cluster.bootstrap(), "replicated").unwrap();
    assert_eq!(records.len(), 20, "nothing acknowledged was lost");
}
