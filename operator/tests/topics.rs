//! The librdkafka topic admin against Apache Kafka 4.4 (one KRaft node shared by this binary,
//! `test_support::apache`): create, duplicate, config, delete, partition growth for real and a decrease
//! refused by the broker, lag from committed offsets, and the admin over SASL_SSL with SCRAM-SHA-512 and
//! over mutual TLS with the settings the operator renders from a ConsumerGroup's `kafka` block.

use std::collections::BTreeMap;
use std::time::Duration;

use operator::topics::{KafkaAdmin, NewTopicPlan, TopicAdmin};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use test_support::apache;

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

/// What `describe` reports once the broker's metadata caught up with a create or a grow (Apache Kafka
/// propagates them asynchronously).
async fn partitions_of(admin: &KafkaAdmin, name: &str, want: i32) -> Option<i32> {
    let names = vec![name.to_string()];
    let mut seen = None;
    for _ in 0..100 {
        seen = admin.describe(&names).await.unwrap().get(name).copied();
        if seen == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_duplicate_config_and_delete() {
    let admin = KafkaAdmin::new(&apache::shared(1).bootstrap(), &[]).unwrap();
    let names = vec!["orders".to_string(), "missing".to_string()];
    assert!(admin.describe(&names).await.unwrap().is_empty());

    admin
        .create(&topic("orders", 6, &[("retention.ms", "3600000")]))
        .await
        .unwrap();
    assert_eq!(partitions_of(&admin, "orders", 6).await, Some(6));
    assert_eq!(
        admin.describe(&names).await.unwrap(),
        BTreeMap::from([("orders".to_string(), 6)]),
        "only the topic asked for and present"
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

/// Partitions grow for real (CreatePartitions), and the broker refuses a decrease with its own message —
/// the planner never asks for one (the CRD's CEL rule refuses it first), this is the last line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_grow_and_a_decrease_is_refused_by_the_broker() {
    let admin = KafkaAdmin::new(&apache::shared(1).bootstrap(), &[]).unwrap();
    let names = vec!["payments".to_string()];
    admin.create(&topic("payments", 2, &[])).await.unwrap();
    assert_eq!(partitions_of(&admin, "payments", 2).await, Some(2));
    admin.grow("payments", 4).await.expect("grow 2 -> 4");
    assert_eq!(
        partitions_of(&admin, "payments", 4).await,
        Some(4),
        "the broker reports 4 partitions"
    );
    let err = admin.grow("payments", 3).await.unwrap_err();
    assert!(
        err.0.contains("payments") && err.0.to_lowercase().contains("partition"),
        "{err}"
    );
    assert_eq!(admin.describe(&names).await.unwrap()["payments"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_high_watermark_minus_committed_offset() {
    let cluster = apache::shared(1);
    let bootstrap = cluster.bootstrap();
    cluster.create_topic("lagging", 2, 1, &[]).await.unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for i in 0..10 {
        let key = i.to_string();
        producer
            .send(
                BaseRecord::to("lagging")
                    .partition(i % 2)
                    .key(&key)
                    .payload("x"),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let admin = KafkaAdmin::new(&bootstrap, &[]).unwrap();
    let topics = vec!["lagging".to_string()];
    // The group coordinator loads (__consumer_offsets is created on first use): NotCoordinator until then,
    // which the autoscaler takes as "no reading this time".
    let mut first = admin.lag("pharmacy", &topics).await;
    for _ in 0..100 {
        if first.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        first = admin.lag("pharmacy", &topics).await;
    }
    assert_eq!(first.unwrap(), 10, "nothing committed: all of it");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "pharmacy")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("lagging", 0, Offset::Offset(4))
        .unwrap();
    tpl.add_partition_offset("lagging", 1, Offset::Offset(5))
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
    let cluster = apache::shared(1);
    let other = TestCa::new("retiring-ca").unwrap();
    let client = cluster.ca().client("outbox-operator").unwrap();
    let kafka: operator::crd::KafkaSpec = serde_json::from_value(serde_json::json!({
        "bootstrap": cluster.ssl_bootstrap(),
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
        (
            key("cluster-ca", "ca.crt"),
            cluster.ca_pem().as_bytes().to_vec(),
        ),
        (
            key("operator-user", "user.crt"),
            client.cert_pem.into_bytes(),
        ),
        (
            key("operator-user", "user.key"),
            client.key_pem.into_bytes(),
        ),
    ]);
    let admin = KafkaAdmin::new(&kafka.bootstrap, &admin_properties(&kafka, &data)).unwrap();
    admin.create(&topic("shipments", 3, &[])).await.unwrap();
    assert_eq!(partitions_of(&admin, "shipments", 3).await, Some(3));
    // Without the client certificate the listener refuses the admin.
    let data_without_cert: SecretData = data
        .into_iter()
        .filter(|((s, _), _)| s != "operator-user")
        .collect();
    let refused = KafkaAdmin::new(
        &kafka.bootstrap,
        &admin_properties(&kafka, &data_without_cert),
    )
    .unwrap();
    let err = refused
        .describe(&["shipments".to_string()])
        .await
        .unwrap_err();
    println!("without a client certificate: {err}");
    // TLS 1.3 sends the broker's "certificate required" alert after the client's handshake finished:
    // librdkafka reports a transport failure, not a handshake failure, so the message cannot say more.
    assert!(err.0.contains("BrokerTransportFailure"), "{err}");
}

/// The topic admin over SASL_SSL with SCRAM-SHA-512, as a Strimzi `KafkaUser` with `scram-sha-512`
/// configures it: the password from its Secret, the cluster CA trusted. A wrong password is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_authenticates_with_scram_sha_512() {
    use operator::connection::{admin_properties, SecretData};
    let cluster = apache::shared(1);
    let kafka: operator::crd::KafkaSpec = serde_json::from_value(serde_json::json!({
        "bootstrap": cluster.sasl_ssl_bootstrap(),
        "tls": {"trustedCertificates": [{"secretName": "cluster-ca", "certificate": "ca.crt"}]},
        "authentication": {"type": "scram-sha-512", "username": "admin",
            "passwordSecret": {"secretName": "admin", "password": "password"}},
    }))
    .unwrap();
    let key = |s: &str, k: &str| (s.to_string(), k.to_string());
    let data = |password: &str| {
        SecretData::from([
            (
                key("cluster-ca", "ca.crt"),
                cluster.ca_pem().as_bytes().to_vec(),
            ),
            (key("admin", "password"), password.as_bytes().to_vec()),
        ])
    };
    let admin = KafkaAdmin::new(
        &kafka.bootstrap,
        &admin_properties(&kafka, &data("admin-secret")),
    )
    .unwrap();
    admin.create(&topic("invoices", 2, &[])).await.unwrap();
    assert_eq!(partitions_of(&admin, "invoices", 2).await, Some(2));
    let wrong =
        KafkaAdmin::new(&kafka.bootstrap, &admin_properties(&kafka, &data("wrong"))).unwrap();
    let err = wrong.describe(&["invoices".to_string()]).await.unwrap_err();
    println!("wrong password: {err}");
    assert!(
        err.0
            .starts_with(r#"the broker refused the SCRAM-SHA-512 login of user "admin""#),
        "the broker's refusal, not a transport error: {err}"
    );
}
