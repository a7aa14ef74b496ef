//! The librdkafka topic admin against real Kafka-protocol brokers: tansu for create, duplicate, config and
//! delete; the librdkafka mock cluster for lag (committed offsets and watermarks). Neither implements
//! CreatePartitions: growth is covered through the trait's in-memory implementation (tests/reconcile.rs)
//! and on a real cluster by `make kind-e2e`.

use std::collections::BTreeMap;
use std::time::Duration;

use operator::topics::{KafkaAdmin, NewTopicPlan, TopicAdmin};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use test_support::kafka::{mock_cluster, Tansu};

fn topic(name: &str, partitions: i32, config: &[(&str, &str)]) -> NewTopicPlan {
    NewTopicPlan {
        name: name.into(),
        partitions,
        replication_factor: 1,
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_duplicate_config_and_delete_on_tansu() {
    let broker = Tansu::start().expect("tansu is installed by `make setup`");
    let admin = KafkaAdmin::new(&broker.bootstrap(), &[]).unwrap();
    let names = vec!["orders".to_string(), "missing".to_string()];
    assert!(admin.describe(&names).await.unwrap().is_empty());

    admin
        .create(&topic("orders", 6, &[("retention.ms", "3600000")]))
        .await
        .unwrap();
    assert_eq!(
        admin.describe(&names).await.unwrap(),
        BTreeMap::from([("orders".to_string(), 6)])
    );
    // A duplicate create (a race with another reconcile) is not an error and changes nothing.
    admin.create(&topic("orders", 3, &[])).await.unwrap();
    assert_eq!(admin.describe(&names).await.unwrap()["orders"], 6);

    let config = admin.topic_config("orders").await.unwrap();
    assert_eq!(
        config.get("retention.ms").map(String::as_str),
        Some("3600000"),
        "{config:?}"
    );

    admin.delete("orders").await.unwrap();
    let gone = async {
        for _ in 0..50 {
            if admin.describe(&names).await.unwrap().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(gone.await, "deleted");
    admin
        .delete("orders")
        .await
        .expect("deleting a missing topic is fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_carry_the_brokers_message() {
    let broker = Tansu::start().expect("tansu is installed by `make setup`");
    let admin = KafkaAdmin::new(&broker.bootstrap(), &[]).unwrap();
    admin.create(&topic("orders", 2, &[])).await.unwrap();
    // tansu does not implement CreatePartitions: the broker's refusal comes back as the error text.
    let err = admin.grow("orders", 4).await.unwrap_err();
    assert!(!err.0.is_empty());
    println!("grow on tansu: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_high_watermark_minus_committed_offset() {
    let mock = mock_cluster(1, &[("orders", 2)]);
    let bootstrap = mock.bootstrap_servers();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for i in 0..10 {
        let key = i.to_string();
        producer
            .send(
                BaseRecord::to("orders")
                    .partition(i % 2)
                    .key(&key)
                    .payload("x"),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let admin = KafkaAdmin::new(&bootstrap, &[]).unwrap();
    let topics = vec!["orders".to_string()];
    assert_eq!(
        admin.lag("pharmacy", &topics).await.unwrap(),
        10,
        "nothing committed: all of it"
    );

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "pharmacy")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("orders", 0, Offset::Offset(4))
        .unwrap();
    tpl.add_partition_offset("orders", 1, Offset::Offset(5))
        .unwrap();
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
    assert_eq!(
        admin.lag("pharmacy", &topics).await.unwrap(),
        1,
        "(5-4) + (5-5)"
    );
}

/// The topic admin over mutual TLS with the settings a ConsumerGroup's `kafka.tls` and
/// `kafka.authentication: {type: tls}` render, the PEM inline as the operator reads it from the Secrets —
/// with a CA bundle of two certificates (another CA first), as during a Strimzi CA renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_manages_topics_over_mutual_tls_with_the_secrets_inline() {
    use operator::connection::{admin_properties, SecretData};
    use test_support::tls::TestCa;
    let ca = TestCa::new("outbox-test-ca").unwrap();
    let other = TestCa::new("retiring-ca").unwrap();
    let server = ca.loopback_server().unwrap();
    let client = ca.client("outbox-operator").unwrap();
    let broker =
        test_support::kafka::TlsTansu::start(&server.cert_pem, &server.key_pem, Some(ca.pem()))
            .unwrap();
    let kafka: operator::crd::KafkaSpec = serde_json::from_value(serde_json::json!({
        "bootstrap": broker.bootstrap(),
        "tls": {"trustedCertificates": [
            {"secretName": "old-ca", "certificate": "ca.crt"},
            {"secretName": "cluster-ca", "certificate": "ca.crt"}]},
        "authentication": {"type": "tls", "certificateAndKey":
            {"secretName": "operator-user", "certificate": "user.crt", "key": "user.key"}},
    }))
    .unwrap();
    let key = |s: &str, k: &str| (s.to_string(), k.to_string());
    let data = SecretData::from([
        (key("old-ca", "ca.crt"), other.pem().as_bytes().to_vec()),
        (key("cluster-ca", "ca.crt"), ca.pem().as_bytes().to_vec()),
        (
            key("operator-user", "user.crt"),
            client.cert_pem.into_bytes(),
        ),
        (
            key("operator-user", "user.key"),
            client.key_pem.into_bytes(),
        ),
    ]);
    let admin = KafkaAdmin::new(&broker.bootstrap(), &admin_properties(&kafka, &data)).unwrap();
    admin.create(&topic("orders", 3, &[])).await.unwrap();
    assert_eq!(
        admin.describe(&["orders".to_string()]).await.unwrap(),
        BTreeMap::from([("orders".to_string(), 3)])
    );
    // Without the client certificate the listener refuses the admin; the error says so.
    let data_without_cert: SecretData = data
        .into_iter()
        .filter(|((s, _), _)| s != "operator-user")
        .collect();
    let refused = KafkaAdmin::new(
        &broker.bootstrap(),
        &admin_properties(&kafka, &data_without_cert),
    )
    .unwrap();
    let err = refused.describe(&["orders".to_string()]).await.unwrap_err();
    assert!(!err.to_string().is_empty());
    assert!(
        broker.log().contains("peer did not return a certificate"),
        "{}",
        broker.log()
    );
}
