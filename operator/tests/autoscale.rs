//! `spec.autoscaling` on the real control plane, with the lag read from a Kafka-protocol broker (librdkafka's
//! mock cluster: real produce, real committed offsets): a burst scales a 6-partition group up to at most 6,
//! drained lag brings it to `minReplicas` (0) after the scale-down window, new lag wakes it, and a manual
//! `kubectl scale` is overwritten with an Event. The decision rule itself is unit-tested in
//! `operator::autoscale`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::Api;
use operator::crd::ConsumerGroup;
use operator::metrics::Metrics;
use operator::plan::Defaults;
use operator::reconcile::{reconcile_consumer, Context, AUTOSCALER_FIELD_MANAGER};
use operator::topics::{AdminError, KafkaAdmin, MemoryAdmin, NewTopicPlan, TopicAdmin};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use test_support::kafka::mock_cluster;

/// Topic management in memory (the mock cluster has no admin API), lag from the mock cluster.
struct MockLag {
    topics: MemoryAdmin,
    lag: KafkaAdmin,
}

impl TopicAdmin for MockLag {
    fn describe<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<std::collections::BTreeMap<String, i32>, AdminError>> {
        self.topics.describe(names)
    }
    fn create<'a>(&'a self, topic: &'a NewTopicPlan) -> BoxFuture<'a, Result<(), AdminError>> {
        self.topics.create(topic)
    }
    fn grow<'a>(&'a self, name: &'a str, total: i32) -> BoxFuture<'a, Result<(), AdminError>> {
        self.topics.grow(name, total)
    }
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        self.topics.delete(name)
    }
    fn lag<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<i64, AdminError>> {
        self.lag.lag(group, topics)
    }
}

struct Bed {
    admin_client: kube::Client,
    ns: String,
    ctx: Arc<Context>,
    bootstrap: String,
    _mock: test_support::kafka::Mock,
}

async fn bed() -> Bed {
    let plane = common::plane();
    let admin_client = plane.client().await;
    common::install_crds(&admin_client).await;
    let client = common::operator_client(plane).await;
    let ns = plane.namespace("autoscale").await;
    common::put_secret(
        &admin_client,
        &ns,
        "orders-db",
        &[("url", "postgres://outbox@db/shop")],
    )
    .await;
    let mock = mock_cluster(1, &[("orders", 6)]);
    let bootstrap = mock.bootstrap_servers();
    let admin = Arc::new(MockLag {
        topics: MemoryAdmin::default(),
        lag: KafkaAdmin::new(&bootstrap, &[]).unwrap(),
    });
    let ctx = Context::with_admins(
        client,
        Defaults {
            relay_image: "outbox-relay:test".into(),
        },
        Arc::new(Metrics::default()),
        Box::new(move |_, _| Ok(admin.clone() as Arc<dyn TopicAdmin>)),
    );
    Bed {
        admin_client,
        ns,
        ctx: Arc::new(ctx),
        bootstrap,
        _mock: mock,
    }
}

impl Bed {
    fn groups(&self) -> Api<ConsumerGroup> {
        Api::namespaced(self.admin_client.clone(), &self.ns)
    }

    async fn create(&self, autoscaling: serde_json::Value) {
        let cg: ConsumerGroup = serde_json::from_value(json!({
            "apiVersion": "outbox.dev/v1alpha1", "kind": "ConsumerGroup",
            "metadata": {"name": "pharmacy"},
            "spec": {
                "groupId": "pharmacy", "image": "demo-consumer:1", "replicas": 1,
                "kafka": {"bootstrap": self.bootstrap},
                "database": {"secretRef": {"name": "orders-db", "key": "url"}},
                "topics": [{"name": "orders", "partitions": 6}],
                "autoscaling": autoscaling,
            }
        }))
        .unwrap();
        self.groups()
            .create(&Default::default(), &cg)
            .await
            .unwrap();
    }

    async fn reconcile(&self) -> Action {
        let cg = self.groups().get("pharmacy").await.unwrap();
        reconcile_consumer(Arc::new(cg), self.ctx.clone())
            .await
            .unwrap()
    }

    /// (spec.replicas, the Deployment's replicas, status.autoscaling.reason).
    async fn replicas(&self) -> (i32, i32, String) {
        let cg = self.groups().get("pharmacy").await.unwrap();
        let dep = Api::<Deployment>::namespaced(self.admin_client.clone(), &self.ns)
            .get("pharmacy-consumer")
            .await
            .unwrap();
        let reason = cg
            .status
            .and_then(|s| s.autoscaling)
            .map(|a| a.reason)
            .unwrap_or_default();
        (
            cg.spec.replicas,
            dep.spec.unwrap().replicas.unwrap(),
            reason,
        )
    }

    fn produce(&self, n: usize) {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        for i in 0..n {
            let key = format!("k{i}");
            producer
                .send(
                    BaseRecord::to("orders")
                        .partition((i % 6) as i32)
                        .key(&key)
                        .payload("x"),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// What consumers that processed everything do: commit every partition at its high watermark.
    fn drain(&self) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", "pharmacy")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..6 {
            let (_, high) = consumer
                .fetch_watermarks("orders", p, Duration::from_secs(10))
                .unwrap();
            tpl.add_partition_offset("orders", p, Offset::Offset(high))
                .unwrap();
        }
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
    }

    async fn events(&self, reason: &str) -> Vec<String> {
        Api::<Event>::namespaced(self.admin_client.clone(), &self.ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.note.unwrap_or_default())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_up_to_the_partitions_drained_lag_goes_to_zero_and_new_lag_wakes_it() {
    let b = bed().await;
    b.create(
        json!({"minReplicas": 0, "maxReplicas": 10, "lagPerReplica": 100, "activationLag": 10,
        "scaleDownStabilizationSeconds": 2, "pollIntervalSeconds": 1}),
    )
    .await;
    // No lag yet: one replica (spec) is more than needed, but the scale-down window holds it for 2 s.
    assert_eq!(
        b.reconcile().await,
        Action::requeue(Duration::from_secs(1)),
        "decisions every pollIntervalSeconds"
    );
    assert_eq!(b.replicas().await, (1, 1, "ScaleDownStabilizing".into()));

    // A burst of 1,200 records with the consumers stopped: 12 replicas' worth, capped at 6 partitions.
    b.produce(1_200);
    b.reconcile().await;
    assert_eq!(b.replicas().await, (6, 6, "ScaleUp".into()));
    let up = b.events("ScaledUp").await;
    assert!(
        up.iter()
            .any(|n| n.contains("from 1 to 6 replicas (lag 1200")),
        "{up:?}"
    );
    let status = b.groups().get("pharmacy").await.unwrap().status.unwrap();
    let auto = status.autoscaling.unwrap();
    assert_eq!(
        (auto.desired_replicas, auto.recommended_replicas, auto.lag),
        (6, 6, 1_200)
    );
    assert!(auto.last_scale_time.is_some());
    let metrics = b.ctx.metrics.render();
    assert!(
        metrics.contains(&format!(
            "outbox_operator_consumergroup_desired_replicas{{namespace=\"{}\",name=\"pharmacy\"}} 6",
            b.ns
        )),
        "{metrics}"
    );
    assert!(metrics.contains("outbox_operator_autoscale_decisions_total{reason=\"ScaleUp\"} 1"));
    assert!(
        metrics.contains(&format!(
            "outbox_operator_consumergroup_lag{{namespace=\"{}\",name=\"pharmacy\"}} 1200",
            b.ns
        )),
        "{metrics}"
    );
    // Still lagging: steady at the partition count.
    b.reconcile().await;
    assert_eq!(b.replicas().await, (6, 6, "AtPartitions".into()));

    // The consumers drain it: held for the scale-down window, then down to minReplicas = 0.
    b.drain();
    b.reconcile().await;
    assert_eq!(b.replicas().await, (6, 6, "ScaleDownStabilizing".into()));
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    b.reconcile().await;
    assert_eq!(b.replicas().await, (0, 0, "ScaleDown".into()));
    assert!(b
        .events("ScaledDown")
        .await
        .iter()
        .any(|n| n.contains("from 6 to 0 replicas (lag 0")));

    // Below the activation lag a group at 0 stays there; at it, it wakes.
    b.produce(6);
    b.reconcile().await;
    assert_eq!(b.replicas().await, (0, 0, "BelowActivation".into()));
    b.produce(150);
    b.reconcile().await;
    assert_eq!(
        b.replicas().await,
        (2, 2, "Activated".into()),
        "lag 156 → 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_scale_is_overwritten_at_the_next_decision_and_an_event_says_so() {
    let b = bed().await;
    b.create(json!({"minReplicas": 1, "maxReplicas": 6, "lagPerReplica": 100}))
        .await;
    b.produce(300);
    b.reconcile().await;
    assert_eq!(b.replicas().await.0, 3);
    // A person scales by hand: `kubectl scale` where kubectl is on PATH, else the same /scale subresource.
    let args = ["scale", "cg", "pharmacy", "--replicas=5", "-n", &b.ns];
    match common::plane().kubectl(&args) {
        Some(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        None => {
            eprintln!("kubectl not on PATH: scaling through patch_scale");
            b.groups()
                .patch_scale(
                    "pharmacy",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": 5}})),
                )
                .await
                .unwrap();
        }
    }
    assert_eq!(b.groups().get("pharmacy").await.unwrap().spec.replicas, 5);
    b.reconcile().await;
    assert_eq!(b.replicas().await.0, 3, "the autoscaler owns spec.replicas");
    let notes = b.events("ManualScaleOverwritten").await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("set to 5 by someone else") && n.contains("sets 3")),
        "{notes:?}"
    );
    let cg = b.groups().get("pharmacy").await.unwrap();
    assert_eq!(
        common::field_managers(&cg.metadata, "/f:spec/f:replicas"),
        [AUTOSCALER_FIELD_MANAGER],
        "who set the replicas"
    );

    // Autoscaling removed: spec.replicas is the user's again and its status goes.
    b.groups()
        .patch(
            "pharmacy",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"autoscaling": null, "replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(
        b.reconcile().await,
        Action::requeue(Duration::from_secs(30))
    );
    let (spec, dep, _) = b.replicas().await;
    assert_eq!((spec, dep), (4, 4));
    let cg = b.groups().get("pharmacy").await.unwrap();
    assert!(cg.status.unwrap().autoscaling.is_none());
}
