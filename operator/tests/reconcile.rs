//! Reconcile tests on the real control plane of the test bed (kube-apiserver, kube-controller-manager,
//! etcd), with the operator's client authenticated as its ServiceAccount under the chart's ClusterRole
//! (rendered by Helm's library), and the in-memory topic admin. kube-fake-client stays for what a real
//! server cannot be made to do: fail a write on demand, or store a spec its CEL rules refuse.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use kube_fake_client::{interceptor, ClientBuilder};
use operator::crd::{ConsumerGroup, OutboxRelay};
use operator::metrics::Metrics;
use operator::plan::Defaults;
use operator::reconcile::{
    error_policy, reconcile_consumer, reconcile_relay, Context, Namespaced, TOPIC_FINALIZER,
};
use operator::topics::{MemoryAdmin, TopicAdmin};
use serde_json::json;

/// The namespace of the kube-fake-client harness.
const FAKE_NS: &str = "shop";

/// A fixture relay with two replicas, `extra` merged over its spec.
fn relay(name: &str, extra: serde_json::Value) -> OutboxRelay {
    let mut spec = json!({"replicas": 2});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    contract::fixtures::relay(name, spec)
}

/// A fixture group (group id = `name`) with two replicas, `extra` merged over its spec.
fn group(name: &str, extra: serde_json::Value) -> ConsumerGroup {
    let mut spec = json!({"replicas": 2});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    contract::fixtures::group(name, spec)
}

/// (bootstrap, librdkafka properties) per topic admin requested.
type Connections = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// The operator's own client (its ServiceAccount on the real server) is inside `ctx`.
struct Harness {
    /// An admin client: what a user with `kubectl` does, and the test's own reads.
    admin_client: kube::Client,
    /// Where this test's objects live.
    ns: String,
    /// Whether this is the real control plane (a kubelet stand-in is needed for pod readiness).
    real: bool,
    ctx: Arc<Context>,
    admin: Arc<MemoryAdmin>,
    /// (bootstrap, librdkafka properties) of every topic admin the reconciler asked for.
    connections: Connections,
}

fn context(client: &kube::Client) -> (Arc<Context>, Arc<MemoryAdmin>, Connections) {
    let admin = Arc::new(MemoryAdmin::default());
    let a = admin.clone();
    let connections: Connections = Arc::default();
    let c = connections.clone();
    let ctx = Context::with_admins(
        client.clone(),
        Defaults {
            relay_image: "outbox-relay:test".into(),
        },
        Arc::new(Metrics::default()),
        Box::new(move |bootstrap, props| {
            c.lock()
                .unwrap()
                .push((bootstrap.to_owned(), props.to_vec()));
            Ok(a.clone() as Arc<dyn TopicAdmin>)
        }),
    );
    (Arc::new(ctx), admin, connections)
}

/// On the real control plane: a fresh namespace, the CRDs, and the operator running as its ServiceAccount.
async fn harness() -> Harness {
    let plane = common::plane();
    let admin_client = plane.client().await;
    common::install_crds(&admin_client).await;
    let client = common::operator_client(plane).await;
    let ns = plane.namespace("reconcile").await;
    let (ctx, admin, connections) = context(&client);
    let h = Harness {
        admin_client,
        ns,
        real: true,
        ctx,
        admin,
        connections,
    };
    h.create_database_secret().await;
    h
}

/// On kube-fake-client, for faults the real server cannot be made to produce.
async fn fake_harness(builder: ClientBuilder) -> Harness {
    let client = common::with_crds(builder)
        .with_status_subresource::<Deployment>()
        .build()
        .await
        .unwrap();
    let (ctx, admin, connections) = context(&client);
    let h = Harness {
        admin_client: client.clone(),
        ns: FAKE_NS.into(),
        real: false,
        ctx,
        admin,
        connections,
    };
    h.create_database_secret().await;
    h
}

impl Harness {
    /// The Secret every resource of these tests references (`orders-db`, key `url`).
    async fn create_database_secret(&self) {
        self.put_secret("orders-db", &[("url", "postgres://outbox@db:5432/shop")])
            .await;
    }

    /// Creates or replaces Secret `name` with these keys.
    async fn put_secret(&self, name: &str, data: &[(&str, &str)]) {
        common::put_secret(&self.admin_client, &self.ns, name, data).await;
    }

    /// `K` in this test's namespace, as the admin sees it.
    fn api<K: Namespaced>(&self) -> Api<K> {
        Api::namespaced(self.admin_client.clone(), &self.ns)
    }

    /// Whether the object `name` of kind `K` is controlled by `owner`.
    async fn owned<K: Namespaced>(&self, name: &str, owner: &impl Resource) -> bool {
        owned_by(self.api::<K>().get(name).await.unwrap().meta(), owner)
    }

    async fn create_relay(&self, cr: &OutboxRelay) -> Arc<OutboxRelay> {
        let mut cr = cr.clone();
        cr.metadata.namespace = Some(self.ns.clone());
        let cr = &cr;
        Arc::new(
            self.api::<OutboxRelay>()
                .create(&Default::default(), cr)
                .await
                .unwrap(),
        )
    }

    async fn create_group(&self, cr: &ConsumerGroup) -> Arc<ConsumerGroup> {
        let mut cr = cr.clone();
        cr.metadata.namespace = Some(self.ns.clone());
        let cr = &cr;
        Arc::new(
            self.api::<ConsumerGroup>()
                .create(&Default::default(), cr)
                .await
                .unwrap(),
        )
    }

    async fn relay(&self, name: &str) -> Arc<OutboxRelay> {
        Arc::new(self.api::<OutboxRelay>().get(name).await.unwrap())
    }

    async fn group(&self, name: &str) -> Arc<ConsumerGroup> {
        Arc::new(self.api::<ConsumerGroup>().get(name).await.unwrap())
    }

    async fn reconcile_relay(&self, name: &str) -> Action {
        reconcile_relay(self.relay(name).await, self.ctx.clone())
            .await
            .unwrap()
    }

    async fn reconcile_group(&self, name: &str) -> Action {
        reconcile_consumer(self.group(name).await, self.ctx.clone())
            .await
            .unwrap()
    }

    /// `ready` of the Deployment's `replicas` pods become Ready. On the real server the controller-manager
    /// made the pods; a kubelet stand-in marks them, and the Deployment controller counts them. On the fake,
    /// the Deployment status is written directly.
    async fn set_ready(&self, deployment: &str, replicas: i32, ready: i32) {
        if !self.real {
            self.api::<Deployment>()
                .patch_status(
                    deployment,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"status": {"replicas": replicas, "readyReplicas": ready}}),
                    ),
                )
                .await
                .unwrap();
            return;
        }
        let dep = self.api::<Deployment>().get(deployment).await.unwrap();
        let labels = dep.spec.unwrap().selector.match_labels.unwrap_or_default();
        let selector = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods =
            Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.admin_client.clone(), &self.ns);
        test_support::wait_for("the Deployment's pods", Duration::from_secs(30), || async {
            let n = pods
                .list(&kube::api::ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .len();
            (n == replicas as usize).then_some(())
        })
        .await;
        test_support::control_plane::mark_pods_ready(
            &self.admin_client,
            &self.ns,
            &selector,
            ready as usize,
        )
        .await
        .unwrap();
        let api = self.api::<Deployment>();
        test_support::wait_for(
            "the Deployment to count its ready pods",
            Duration::from_secs(30),
            || async {
                let st = api.get(deployment).await.ok()?.status?;
                (st.replicas == Some(replicas) && st.ready_replicas.unwrap_or(0) == ready)
                    .then_some(())
            },
        )
        .await;
    }

    /// The operator's Events (the controller-manager records its own too).
    async fn events(&self) -> Vec<(String, String)> {
        self.api::<Event>()
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reporting_controller.as_deref() == Some(operator::plan::FIELD_MANAGER))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Whether an event with `reason` whose note contains `note` was recorded.
    async fn has_event(&self, reason: &str, note: &str) -> bool {
        let events = self.events().await;
        let found = events.iter().any(|(r, n)| r == reason && n.contains(note));
        if !found {
            eprintln!("no {reason} event containing {note:?} among {events:?}");
        }
        found
    }

    fn metrics(&self) -> String {
        self.ctx.metrics.render()
    }
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn owned_by(meta: &kube::api::ObjectMeta, owner: &impl Resource) -> bool {
    meta.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| Some(&r.uid) == owner.meta().uid.as_ref() && r.controller == Some(true))
    })
}

#[tokio::test]
async fn a_relay_gets_its_children_with_owner_refs_and_a_status() {
    let h = harness().await;
    let cr = h.create_relay(&relay("orders", json!({}))).await;
    let action = h.reconcile_relay("orders").await;
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(30)),
        "status refresh"
    );

    let dep = h.api::<Deployment>().get("orders-relay").await.unwrap();
    assert!(owned_by(&dep.metadata, cr.as_ref()));
    assert_eq!(dep.spec.as_ref().unwrap().replicas, Some(2));
    assert!(h.owned::<ServiceAccount>("orders-relay", cr.as_ref()).await);
    assert!(h.owned::<Role>("orders-relay", cr.as_ref()).await);
    assert!(h.owned::<RoleBinding>("orders-relay", cr.as_ref()).await);
    assert!(h.owned::<Service>("orders-relay", cr.as_ref()).await);
    assert!(
        h.owned::<PodDisruptionBudget>("orders-relay", cr.as_ref())
            .await
    );

    let st = h.relay("orders").await.status.clone().unwrap();
    assert_eq!(st.observed_generation, cr.metadata.generation);
    let ready = condition(&st.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        ("False", "0/2 pods ready")
    );
    assert_eq!(
        condition(&st.conditions, "Reconciling").unwrap().status,
        "True"
    );
    assert!(h.has_event("Created", "orders-relay with 2 replicas").await);

    // Pods come up and a relay holds the Lease: Ready, leader and epoch in the status.
    h.set_ready("orders-relay", 2, 2).await;
    let lease: k8s_openapi::api::coordination::v1::Lease = serde_json::from_value(json!({
        "metadata": {"name": "orders-relay", "namespace": h.ns},
        "spec": {"holderIdentity": "orders-relay-abc", "leaseTransitions": 4}
    }))
    .unwrap();
    h.api::<k8s_openapi::api::coordination::v1::Lease>()
        .create(&Default::default(), &lease)
        .await
        .unwrap();
    h.reconcile_relay("orders").await;
    let st = h.relay("orders").await.status.clone().unwrap();
    assert_eq!(condition(&st.conditions, "Ready").unwrap().status, "True");
    assert!(condition(&st.conditions, "Reconciling").is_none());
    assert_eq!(st.leader.as_deref(), Some("orders-relay-abc"));
    assert_eq!(st.lease_transitions, Some(4));
    assert!(h
        .metrics()
        .contains("outbox_operator_reconciles_total{kind=\"OutboxRelay\"} 2"));
}

#[tokio::test]
async fn reconciling_twice_changes_nothing() {
    let h = harness().await;
    h.create_relay(&relay("orders", json!({}))).await;
    h.create_group(&group("pharmacy", json!({}))).await;
    h.reconcile_relay("orders").await;
    h.reconcile_group("pharmacy").await;
    // The spec and metadata the operator writes, with `generation` (which a real API server bumps only for a
    // changed spec). Not the status nor resourceVersion, nor the Deployment controller's revision
    // annotation: the controller-manager writes those whenever it gets to them, before or after our reads.
    fn content<K: serde::Serialize>(obj: K) -> serde_json::Value {
        let mut v = serde_json::to_value(obj).unwrap();
        v.as_object_mut().unwrap().remove("status");
        if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.remove("managedFields");
            m.remove("resourceVersion");
            if let Some(a) = m.get_mut("annotations").and_then(|a| a.as_object_mut()) {
                a.remove("deployment.kubernetes.io/revision");
                if a.is_empty() {
                    m.remove("annotations");
                }
            }
        }
        v
    }
    let versions = || async {
        (
            content(h.api::<Deployment>().get("orders-relay").await.unwrap()),
            content(h.api::<Service>().get("orders-relay").await.unwrap()),
            content(h.api::<Role>().get("orders-relay").await.unwrap()),
            content(
                h.api::<Deployment>()
                    .get("pharmacy-consumer")
                    .await
                    .unwrap(),
            ),
            content(
                h.api::<PodDisruptionBudget>()
                    .get("pharmacy-consumer")
                    .await
                    .unwrap(),
            ),
        )
    };
    let before = versions().await;
    let events = h.events().await.len();
    let topics = h.admin.state().log.clone();
    h.reconcile_relay("orders").await;
    h.reconcile_group("pharmacy").await;
    assert_eq!(
        versions().await,
        before,
        "a second apply of the same objects changes nothing"
    );
    assert_eq!(h.events().await.len(), events, "no new events");
    assert_eq!(h.admin.state().log, topics, "no topic changes");
}

#[tokio::test]
async fn spec_changes_update_children_and_drift_is_repaired() {
    let h = harness().await;
    h.create_relay(&relay("orders", json!({}))).await;
    h.reconcile_relay("orders").await;

    // Someone edits the Deployment by hand: the next reconcile puts the spec's values back.
    h.api::<Deployment>()
        .patch(
            "orders-relay",
            &PatchParams::apply("kubectl-edit").force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "orders-relay"},
                "spec": {"replicas": 7}
            })),
        )
        .await
        .unwrap();
    h.reconcile_relay("orders").await;
    let dep = h.api::<Deployment>().get("orders-relay").await.unwrap();
    assert_eq!(dep.spec.unwrap().replicas, Some(2), "drift repaired");

    // The spec changes: one replica (no PDB any more), another batch size.
    let mut cr = (*h.relay("orders").await).clone();
    cr.spec.replicas = 1;
    cr.spec.batch_size = 250;
    h.api::<OutboxRelay>()
        .replace("orders", &Default::default(), &cr)
        .await
        .unwrap();
    h.reconcile_relay("orders").await;
    let dep = h.api::<Deployment>().get("orders-relay").await.unwrap();
    let spec = dep.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    let env = spec.template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(env
        .iter()
        .any(|e| e.name == "RELAY_BATCH_SIZE" && e.value.as_deref() == Some("250")));
    assert!(
        h.api::<PodDisruptionBudget>()
            .get_opt("orders-relay")
            .await
            .unwrap()
            .is_none(),
        "PDB removed at 1 replica"
    );
    // Events of one reason form a series (kube-runtime's recorder): the first note stays, the count grows.
    assert!(h.has_event("Scaled", "from 7 to 2").await);
}

#[tokio::test]
async fn a_paused_object_is_left_alone_and_says_so() {
    let h = harness().await;
    h.create_group(&group("pharmacy", json!({}))).await;
    h.reconcile_group("pharmacy").await;
    h.api::<ConsumerGroup>()
        .patch(
            "pharmacy",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"outbox.dev/paused": "true"}}, "spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    let action = h.reconcile_group("pharmacy").await;
    assert_eq!(action, Action::await_change());
    let dep = h
        .api::<Deployment>()
        .get("pharmacy-consumer")
        .await
        .unwrap();
    assert_eq!(
        dep.spec.unwrap().replicas,
        Some(2),
        "not reconciled while paused"
    );
    let st = h.group("pharmacy").await.status.clone().unwrap();
    let paused = condition(&st.conditions, "Paused").unwrap();
    assert_eq!(paused.status, "True");
    assert!(paused.message.contains("outbox.dev/paused"));

    h.api::<ConsumerGroup>()
        .patch(
            "pharmacy",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"outbox.dev/paused": null}}})),
        )
        .await
        .unwrap();
    h.reconcile_group("pharmacy").await;
    let dep = h
        .api::<Deployment>()
        .get("pharmacy-consumer")
        .await
        .unwrap();
    assert_eq!(dep.spec.unwrap().replicas, Some(5), "resumed");
    assert!(condition(
        &h.group("pharmacy").await.status.clone().unwrap().conditions,
        "Paused"
    )
    .is_none());
}

#[tokio::test]
async fn a_group_creates_topics_runs_pods_and_reports_scale_status() {
    let h = harness().await;
    h.admin.with(|s| {
        s.lag.insert("pharmacy".into(), 42);
    });
    let cr = h
        .create_group(&group(
            "pharmacy",
            json!({"env": [{"name": "DEMO_ROLE", "value": "pharmacy"}]}),
        ))
        .await;
    h.reconcile_group("pharmacy").await;
    assert_eq!(h.admin.state().log, ["create orders 6"]);
    let dep = h
        .api::<Deployment>()
        .get("pharmacy-consumer")
        .await
        .unwrap();
    assert!(owned_by(&dep.metadata, cr.as_ref()));
    h.set_ready("pharmacy-consumer", 2, 2).await;
    h.reconcile_group("pharmacy").await;
    let st = h.group("pharmacy").await.status.clone().unwrap();
    assert_eq!(st.replicas, 2);
    assert_eq!(st.ready_replicas, 2);
    assert_eq!(
        st.selector,
        "app.kubernetes.io/instance=pharmacy,app.kubernetes.io/name=outbox-consumer"
    );
    assert_eq!(st.partitions.get("orders"), Some(&6));
    assert_eq!(st.total_partitions, 6);
    assert_eq!(st.lag, Some(42));
    assert_eq!(condition(&st.conditions, "Ready").unwrap().status, "True");
    assert!(
        h.has_event("TopicCreated", "orders with 6 partitions")
            .await
    );
}

#[tokio::test]
async fn more_replicas_than_partitions_are_capped_or_grow_the_topic() {
    let h = harness().await;
    h.create_group(&group("pharmacy", json!({"replicas": 9})))
        .await;
    h.reconcile_group("pharmacy").await;
    let dep = h
        .api::<Deployment>()
        .get("pharmacy-consumer")
        .await
        .unwrap();
    assert_eq!(
        dep.spec.unwrap().replicas,
        Some(6),
        "Cap: effective replicas = partitions"
    );
    assert!(h.has_event("ScaleCapped", "9 replicas requested").await);

    h.create_group(&group(
        "billing",
        json!({"replicas": 9, "partitionPolicy": "GrowPartitions",
        "topics": [{"name": "invoices", "partitions": 3}]}),
    ))
    .await;
    h.reconcile_group("billing").await;
    assert_eq!(
        h.admin.state().topics["invoices"].0,
        9,
        "created with max(partitions, replicas)"
    );
    // Scale up further: the topic grows, never shrinks.
    h.api::<ConsumerGroup>()
        .patch(
            "billing",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 12}})),
        )
        .await
        .unwrap();
    h.reconcile_group("billing").await;
    assert!(h
        .admin
        .state()
        .log
        .contains(&"grow invoices 12".to_string()));
    let dep = h.api::<Deployment>().get("billing-consumer").await.unwrap();
    assert_eq!(dep.spec.unwrap().replicas, Some(12));
    assert!(h.has_event("PartitionsIncreased", "9 → 12").await);
}

#[tokio::test]
async fn a_partition_decrease_is_refused_and_the_topic_left_untouched() {
    let h = harness().await;
    h.admin.with(|s| {
        s.topics.insert("orders".into(), (12, Default::default()));
    });
    h.create_group(&group("pharmacy", json!({}))).await;
    h.reconcile_group("pharmacy").await;
    assert_eq!(h.admin.state().topics["orders"].0, 12, "untouched");
    assert!(h.admin.state().log.is_empty());
    let st = h.group("pharmacy").await.status.clone().unwrap();
    let ready = condition(&st.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NotSupported")
    );
    assert!(
        ready
            .message
            .contains("has 12 partitions; the spec asks for 6"),
        "{}",
        ready.message
    );
    assert_eq!(condition(&st.conditions, "Stalled").unwrap().status, "True");
    assert!(h.has_event("PartitionsRefused", "").await);
    // The consumers still run.
    assert!(h
        .api::<Deployment>()
        .get_opt("pharmacy-consumer")
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn broker_errors_surface_with_the_brokers_message_and_back_off() {
    let h = harness().await;
    h.admin
        .with(|s| s.fail = Some("Broker: Cluster authorization failed".into()));
    let cr = h.create_group(&group("pharmacy", json!({}))).await;
    let err = reconcile_consumer(cr.clone(), h.ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "KafkaError");
    let st = h.group("pharmacy").await.status.clone().unwrap();
    let ready = condition(&st.conditions, "Ready").unwrap();
    assert_eq!(ready.reason, "KafkaError");
    assert_eq!(ready.message, "Broker: Cluster authorization failed");
    let delays: Vec<Action> = (0..3)
        .map(|_| error_policy(cr.clone(), &err, h.ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s))),
        "exponential per object"
    );
    assert!(h.metrics().contains(
        "outbox_operator_reconcile_failures_total{kind=\"ConsumerGroup\",reason=\"KafkaError\"} 1"
    ));
    // The broker recovers: success resets the backoff.
    h.admin.with(|s| s.fail = None);
    h.reconcile_group("pharmacy").await;
    assert_eq!(
        error_policy(cr, &err, h.ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
}

#[tokio::test]
async fn injected_api_errors_fail_the_reconcile_without_a_crash_and_it_recovers() {
    let failing = Arc::new(AtomicUsize::new(2));
    let f = failing.clone();
    let builder =
        ClientBuilder::new().with_interceptor_funcs(interceptor::Funcs::new().patch(move |ctx| {
            if ctx.name == "orders-relay" && f.load(Ordering::SeqCst) > 0 {
                f.fetch_sub(1, Ordering::SeqCst);
                return Err(kube_fake_client::Error::Internal(
                    "etcdserver: request timed out".into(),
                ));
            }
            Ok(None)
        }));
    let h = fake_harness(builder).await;
    let cr = h.create_relay(&relay("orders", json!({}))).await;
    for expected in [1, 2] {
        let err = reconcile_relay(cr.clone(), h.ctx.clone())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "KubeApi");
        assert!(err.to_string().contains("request timed out"), "{err}");
        assert_eq!(
            error_policy(cr.clone(), &err, h.ctx.clone()),
            Action::requeue(Duration::from_secs(expected))
        );
    }
    h.reconcile_relay("orders").await;
    assert!(h
        .api::<Deployment>()
        .get_opt("orders-relay")
        .await
        .unwrap()
        .is_some());
    assert!(h.metrics().contains("reason=\"KubeApi\"} 2"));
}

#[tokio::test]
async fn bad_specs_stall_with_a_message_naming_the_field() {
    let h = harness().await;
    h.create_group(&group(
        "pharmacy",
        json!({"env": [{"name": "CONSUMER_GROUP_ID", "value": "x"}]}),
    ))
    .await;
    assert_eq!(h.reconcile_group("pharmacy").await, Action::await_change());
    let st = h.group("pharmacy").await.status.clone().unwrap();
    let ready = condition(&st.conditions, "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidSpec");
    assert_eq!(
        ready.message,
        "spec.env[0].name: CONSUMER_GROUP_ID is set by the operator from the spec"
    );
    assert!(
        h.api::<Deployment>()
            .get_opt("pharmacy-consumer")
            .await
            .unwrap()
            .is_none(),
        "nothing half-written"
    );
    assert!(h.admin.state().log.is_empty());

    // Lease timings that do not nest: the real API server refuses them (CEL, tested in crds_server.rs);
    // the operator still checks, for a server that let them through — only the fake can store them.
    let h = fake_harness(ClientBuilder::new()).await;
    h.create_relay(&relay(
        "orders",
        json!({"coordination": {"leaseDurationSeconds": 5, "renewDeadlineSeconds": 8}}),
    ))
    .await;
    h.reconcile_relay("orders").await;
    let st = h.relay("orders").await.status.clone().unwrap();
    assert!(condition(&st.conditions, "Stalled")
        .unwrap()
        .message
        .starts_with("spec.coordination: lease duration (5s)"));
}

#[tokio::test]
async fn delete_policy_topics_get_a_finalizer_and_go_with_the_group() {
    let h = harness().await;
    let topics = json!({"topics": [
        {"name": "orders", "partitions": 6},
        {"name": "scratch", "partitions": 1, "deletionPolicy": "Delete"}
    ]});
    h.create_group(&group("pharmacy", topics.clone())).await;
    h.reconcile_group("pharmacy").await;
    assert_eq!(h.group("pharmacy").await.finalizers(), [TOPIC_FINALIZER]);
    // Retain only: no finalizer (and a Delete topic turned Retain loses it).
    h.create_group(&group("notification", json!({}))).await;
    h.reconcile_group("notification").await;
    assert!(h.group("notification").await.finalizers().is_empty());

    // A real deletion: the API server sets deletionTimestamp and keeps the object while the finalizer stays.
    h.admin.with(|s| {
        s.topics.insert("orders".into(), (6, Default::default()));
        s.topics.insert("scratch".into(), (1, Default::default()));
    });
    h.api::<ConsumerGroup>()
        .delete("pharmacy", &Default::default())
        .await
        .unwrap();
    let held = h.group("pharmacy").await;
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "held by the finalizer"
    );
    assert_eq!(h.reconcile_group("pharmacy").await, Action::await_change());
    let topics = h.admin.state().topics;
    assert!(
        !topics.contains_key("scratch"),
        "Delete policy topic deleted"
    );
    assert!(topics.contains_key("orders"), "Retain policy topic kept");
    assert!(
        h.api::<ConsumerGroup>()
            .get_opt("pharmacy")
            .await
            .unwrap()
            .is_none(),
        "gone once the finalizer is removed"
    );
    assert!(h.has_event("TopicDeleted", "scratch").await);
}

#[tokio::test]
async fn kafka_properties_come_from_the_referenced_secret() {
    let h = harness().await;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "kafka-auth"},
        "data": {"props": "c2FzbC5tZWNoYW5pc209UExBSU4sIHNhc2wudXNlcm5hbWU9b3V0Ym94"}
    }))
    .unwrap();
    h.api::<k8s_openapi::api::core::v1::Secret>()
        .create(&Default::default(), &secret)
        .await
        .unwrap();
    let kafka = json!({"kafka": {"bootstrap": "kafka:9092", "configSecretRef": {"name": "kafka-auth", "key": "props"}}});
    h.create_group(&group("pharmacy", kafka)).await;
    h.reconcile_group("pharmacy").await;
    assert_eq!(
        h.connections.lock().unwrap().last().cloned(),
        Some((
            "kafka:9092".to_string(),
            vec![
                ("sasl.mechanism".to_string(), "PLAIN".to_string()),
                ("sasl.username".to_string(), "outbox".to_string())
            ]
        )),
        "`sasl.mechanism=PLAIN, sasl.username=outbox` from the Secret"
    );

    // A missing key: the reconcile fails with SecretError, named in the condition; no topic is touched.
    let missing = json!({"kafka": {"bootstrap": "kafka:9092", "configSecretRef": {"name": "kafka-auth", "key": "nope"}}});
    let cr = h.create_group(&group("billing", missing)).await;
    let err = reconcile_consumer(cr, h.ctx.clone()).await.unwrap_err();
    assert_eq!(err.reason(), "SecretError");
    let st = h.group("billing").await.status.clone().unwrap();
    let ready = condition(&st.conditions, "Ready").unwrap();
    assert_eq!(ready.reason, "SecretError");
    assert_eq!(
        ready.message,
        "spec.kafka.configSecretRef: Secret `kafka-auth` has no key `nope`"
    );
    assert!(h
        .api::<Deployment>()
        .get_opt("billing-consumer")
        .await
        .unwrap()
        .is_none());
}

/// Figures, not assertions on speed: reconcile latency for 100 objects on the real API server.
#[tokio::test]
async fn hundred_objects_reconcile() {
    let h = harness().await;
    for i in 0..50 {
        h.create_relay(&relay(&format!("r{i}"), json!({}))).await;
        h.create_group(&group(&format!("g{i}"), json!({}))).await;
    }
    let mut took = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        h.reconcile_relay(&format!("r{i}")).await;
        took.push(t.elapsed());
        let t = Instant::now();
        h.reconcile_group(&format!("g{i}")).await;
        took.push(t.elapsed());
    }
    took.sort();
    assert_eq!(
        h.api::<Deployment>()
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        100
    );
    println!(
        "100 CRs on kube-apiserver {}: reconcile p50 {:?}, p99 {:?}",
        test_support::control_plane::KUBERNETES_VERSION,
        took[49],
        took[98]
    );
}

#[tokio::test]
async fn scale_through_the_subresource_and_kubectl_reaches_the_deployment() {
    let h = harness().await;
    h.create_group(&group("pharmacy", json!({}))).await;
    h.reconcile_group("pharmacy").await;
    h.set_ready("pharmacy-consumer", 2, 2).await;
    h.reconcile_group("pharmacy").await;
    let groups = h.api::<ConsumerGroup>();
    let scale = groups.get_scale("pharmacy").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    let status = scale.status.unwrap();
    assert_eq!(status.replicas, 2);
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=pharmacy,app.kubernetes.io/name=outbox-consumer"),
        "HPA and KEDA find the pods through the scale subresource"
    );

    groups
        .patch_scale(
            "pharmacy",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    h.reconcile_group("pharmacy").await;
    let replicas = || async {
        h.api::<Deployment>()
            .get("pharmacy-consumer")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas
    };
    assert_eq!(replicas().await, Some(4), "patch_scale → Deployment");

    // The command users type, when kubectl is on PATH (it is on the machines CI runs on).
    let Some(out) =
        common::plane().kubectl(&["scale", "cg", "pharmacy", "--replicas=3", "-n", &h.ns])
    else {
        eprintln!("kubectl not on PATH: `kubectl scale` part skipped");
        return;
    };
    assert!(
        out.status.success(),
        "kubectl scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("scaled"));
    h.reconcile_group("pharmacy").await;
    assert_eq!(replicas().await, Some(3), "kubectl scale cg → Deployment");
}

#[tokio::test]
async fn another_field_manager_conflicts_until_it_forces_and_the_operator_takes_the_field_back() {
    let h = harness().await;
    h.create_relay(&relay("orders", json!({}))).await;
    h.reconcile_relay("orders").await;
    let edit = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "orders-relay"},
        "spec": {"replicas": 5}
    });
    let deployments = h.api::<Deployment>();
    match deployments
        .patch(
            "orders-relay",
            &PatchParams::apply("platform-team"),
            &Patch::Apply(&edit),
        )
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 409, "{s:?}");
            assert!(
                s.message.contains(operator::plan::FIELD_MANAGER)
                    && s.message.contains(".spec.replicas"),
                "the conflict names the owner and the field: {}",
                s.message
            );
        }
        other => panic!("an unforced apply of an owned field must conflict, got {other:?}"),
    }
    deployments
        .patch(
            "orders-relay",
            &PatchParams::apply("platform-team").force(),
            &Patch::Apply(&edit),
        )
        .await
        .unwrap();
    h.reconcile_relay("orders").await;
    let dep = deployments.get("orders-relay").await.unwrap();
    assert_eq!(dep.spec.unwrap().replicas, Some(2), "the spec wins again");
    assert_eq!(
        common::field_managers(&dep.metadata, "/f:spec/f:replicas"),
        [operator::plan::FIELD_MANAGER],
        "one owner of spec.replicas"
    );
}

#[tokio::test]
async fn deleting_a_resource_lets_the_garbage_collector_remove_its_children() {
    let h = harness().await;
    h.create_group(&group("pharmacy", json!({}))).await;
    h.reconcile_group("pharmacy").await;
    assert!(h
        .api::<Deployment>()
        .get_opt("pharmacy-consumer")
        .await
        .unwrap()
        .is_some());
    h.api::<ConsumerGroup>()
        .delete("pharmacy", &Default::default())
        .await
        .unwrap();
    test_support::wait_for(
        "the controller-manager's garbage collector",
        Duration::from_secs(20),
        || async {
            let dep = h
                .api::<Deployment>()
                .get_opt("pharmacy-consumer")
                .await
                .ok()?;
            let pdb = h
                .api::<PodDisruptionBudget>()
                .get_opt("pharmacy-consumer")
                .await
                .ok()?;
            (dep.is_none() && pdb.is_none()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_verb_missing_from_the_role_surfaces_as_forbidden_on_the_resource() {
    let plane = common::plane();
    let admin_client = plane.client().await;
    common::install_crds(&admin_client).await;
    // The chart's ClusterRole without `create` on Deployments (a second release, so the other tests keep theirs).
    let client = common::operator_client_with(plane, "limited", |role| {
        for rule in role["rules"].as_array_mut().unwrap() {
            if rule["resources"] == json!(["deployments"]) {
                rule["verbs"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|v| v != "create");
            }
        }
    })
    .await;
    let (ctx, admin, connections) = context(&client);
    let h = Harness {
        admin_client,
        ns: plane.namespace("forbidden").await,
        real: true,
        ctx,
        admin,
        connections,
    };
    h.create_database_secret().await;
    h.create_relay(&relay("orders", json!({}))).await;
    let err = reconcile_relay(h.relay("orders").await, h.ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "KubeApi");
    let st = h.relay("orders").await.status.clone().unwrap();
    let ready = condition(&st.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Forbidden")
    );
    for part in [
        "cannot create resource \"deployments\"",
        "limited-outbox-operator",
        &h.ns,
    ] {
        assert!(
            ready.message.contains(part),
            "{part:?} in {}",
            ready.message
        );
    }
    assert_eq!(condition(&st.conditions, "Stalled").unwrap().status, "True");
    assert!(h.has_event("Forbidden", "deployments").await);
}

/// A relay and a group with every secured connection setting, and the Secrets they name.
async fn secured(h: &Harness) -> serde_json::Value {
    h.put_secret(
        "kafka-ca",
        &[("ca.crt", "-----BEGIN CERTIFICATE-----\nCA\n")],
    )
    .await;
    h.put_secret("shop-user", &[("password", "hunter2")]).await;
    h.put_secret("pg-ca", &[("ca.crt", "PGCA")]).await;
    h.put_secret("pg-client", &[("tls.crt", "CRT"), ("tls.key", "KEY")])
        .await;
    json!({
        "kafka": {
            "bootstrap": "my-cluster-kafka-bootstrap:9093",
            "tls": {"trustedCertificates": [{"secretName": "kafka-ca", "certificate": "ca.crt"}]},
            "authentication": {"type": "scram-sha-512", "username": "shop",
                "passwordSecret": {"secretName": "shop-user", "password": "password"}},
        },
        "database": {
            "secretRef": {"name": "orders-db", "key": "url"},
            "tls": {"caSecretRef": {"name": "pg-ca", "key": "ca.crt"},
                "clientCertificate": {"secretName": "pg-client", "certificate": "tls.crt", "key": "tls.key"}},
        },
    })
}

fn pod_spec(d: &Deployment) -> k8s_openapi::api::core::v1::PodSpec {
    d.spec.clone().unwrap().template.spec.unwrap()
}

fn env_values(d: &Deployment) -> std::collections::BTreeMap<String, String> {
    pod_spec(d).containers[0]
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}

#[tokio::test]
async fn secured_connections_mount_the_secrets_and_point_the_clients_at_them() {
    let h = harness().await;
    let spec = secured(&h).await;
    h.create_relay(&relay("orders", spec.clone())).await;
    h.reconcile_relay("orders").await;
    let mut group_spec = spec.clone();
    group_spec["database"]["schema"] = json!("inbox");
    h.create_group(&group("pharmacy", group_spec)).await;
    h.reconcile_group("pharmacy").await;
    for name in ["orders-relay", "pharmacy-consumer"] {
        // Stored by the real API server, so what it validated and defaulted.
        let d = h.api::<Deployment>().get(name).await.unwrap();
        let pod = pod_spec(&d);
        let vol = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "outbox-secrets")
            .unwrap_or_else(|| panic!("{name}: no outbox-secrets volume"));
        let projected = vol.projected.unwrap();
        assert_eq!(projected.default_mode, Some(0o400), "{name}");
        let mut items: Vec<(String, String, String)> = projected
            .sources
            .unwrap()
            .into_iter()
            .flat_map(|s| {
                let s = s.secret.unwrap();
                s.items
                    .unwrap()
                    .into_iter()
                    .map(move |i| (s.name.clone(), i.key, i.path))
            })
            .collect();
        items.sort();
        assert_eq!(
            items,
            [
                ("kafka-ca", "ca.crt", "kafka/ca-0.crt"),
                ("pg-ca", "ca.crt", "database/ca.crt"),
                ("pg-client", "tls.crt", "database/client.crt"),
                ("pg-client", "tls.key", "database/client.key"),
                ("shop-user", "password", "kafka/sasl-password"),
            ]
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        );
        let mount = pod.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .find(|m| m.name == "outbox-secrets")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/etc/outbox", Some(true))
        );
        assert_eq!(
            pod.security_context.unwrap().fs_group,
            Some(65532),
            "the non-root process reads the 0400 files through its group"
        );
        let env = env_values(&d);
        for (k, v) in [
            ("KAFKA_TLS", "true"),
            ("KAFKA_CA_FILE", "/etc/outbox/kafka/ca-0.crt"),
            ("KAFKA_SASL_MECHANISM", "scram-sha-512"),
            ("KAFKA_SASL_USERNAME", "shop"),
            (
                "KAFKA_SASL_PASSWORD_FILE",
                "/etc/outbox/kafka/sasl-password",
            ),
            ("DATABASE_CA_FILE", "/etc/outbox/database/ca.crt"),
            ("DATABASE_CERT_FILE", "/etc/outbox/database/client.crt"),
            ("DATABASE_KEY_FILE", "/etc/outbox/database/client.key"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{name}: {k}");
        }
        assert!(
            !env.values().any(|v| v.contains("hunter2")),
            "no credential in the pod's environment"
        );
        let hash = d
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[operator::plan::SECRET_HASH_ANNOTATION]
            .clone();
        assert_eq!(hash.len(), 64, "a SHA-256 of the referenced keys: {hash}");
    }
    // The operator's own topic admin gets the same settings, with the Secret data inline.
    let (_, props) = h.connections.lock().unwrap().last().cloned().unwrap();
    let props: std::collections::BTreeMap<String, String> = props.into_iter().collect();
    assert_eq!(props["security.protocol"], "sasl_ssl");
    assert_eq!(props["ssl.ca.pem"], "-----BEGIN CERTIFICATE-----\nCA");
    assert_eq!(props["sasl.mechanism"], "SCRAM-SHA-512");
    assert_eq!(props["sasl.password"], "hunter2");
}

#[tokio::test]
async fn a_missing_secret_key_stalls_with_secret_error_naming_the_field() {
    let h = harness().await;
    let mut spec = secured(&h).await;
    spec["kafka"]["tls"]["trustedCertificates"][0]["certificate"] = json!("cluster-ca.crt");
    let cr = h.create_relay(&relay("orders", spec.clone())).await;
    let err = reconcile_relay(cr, h.ctx.clone()).await.unwrap_err();
    assert_eq!(err.reason(), "SecretError");
    let st = h.relay("orders").await.status.clone().unwrap();
    let ready = condition(&st.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SecretError")
    );
    assert_eq!(
        ready.message,
        "spec.kafka.tls.trustedCertificates[0]: Secret `kafka-ca` has no key `cluster-ca.crt`"
    );
    assert_eq!(condition(&st.conditions, "Stalled").unwrap().status, "True");
    assert!(
        h.api::<Deployment>()
            .get_opt("orders-relay")
            .await
            .unwrap()
            .is_none(),
        "nothing applied before every referenced key exists"
    );
    assert!(h.has_event("SecretError", "cluster-ca.crt").await);
    // A missing Secret, on a group.
    let mut spec = secured(&h).await;
    spec["database"]["tls"]["caSecretRef"]["name"] = json!("no-such-ca");
    let cr = h.create_group(&group("pharmacy", spec)).await;
    let err = reconcile_consumer(cr, h.ctx.clone()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.database.tls.caSecretRef: Secret `no-such-ca` not found"
    );
    // A property both `configSecretRef` and the typed settings set: refused on the resource, where the
    // relay process would exit 2 in a crash loop.
    h.put_secret(
        "kafka-extra",
        &[("props", "security.protocol=SSL,acks=all")],
    )
    .await;
    let mut spec = secured(&h).await;
    spec["kafka"]["configSecretRef"] = json!({"name": "kafka-extra", "key": "props"});
    let cr = h.create_relay(&relay("twice", spec)).await;
    let err = reconcile_relay(cr, h.ctx.clone()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.kafka.configSecretRef: `security.protocol` is also set by spec.kafka.tls/authentication; set it once"
    );
    assert!(h
        .api::<Deployment>()
        .get_opt("twice-relay")
        .await
        .unwrap()
        .is_none());
}

/// A property the guarantees rest on, set in `kafka.configSecretRef`: the process would exit 2 on it
/// (`contract::kafka_guard`), so the operator refuses the resource with `InvalidSpec` naming the field and
/// applies nothing — for a relay (`acks`) and for a group (`enable.auto.offset.store`).
#[tokio::test]
async fn a_guarded_kafka_property_in_the_config_secret_is_invalid_spec() {
    let h = harness().await;
    h.put_secret("relay-props", &[("props", "linger.ms=5,acks=1")])
        .await;
    let spec = json!({"kafka": {"bootstrap": "kafka:9092", "configSecretRef": {"name": "relay-props", "key": "props"}}});
    let cr = h.create_relay(&relay("guarded", spec)).await;
    let err = reconcile_relay(cr, h.ctx.clone()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.kafka.configSecretRef: `acks` is set by the relay (acks=all: nothing lost rests on it); it cannot be overridden"
    );
    assert!(h.has_event("InvalidSpec", "acks").await);
    let stored = h.relay("guarded").await;
    let ready = condition(&stored.status.as_ref().unwrap().conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(h
        .api::<Deployment>()
        .get_opt("guarded-relay")
        .await
        .unwrap()
        .is_none());

    h.put_secret("group-props", &[("props", "enable.auto.offset.store=true")])
        .await;
    let spec = json!({"kafka": {"bootstrap": "kafka:9092", "configSecretRef": {"name": "group-props", "key": "props"}}});
    let cr = h.create_group(&group("guarded", spec)).await;
    let err = reconcile_consumer(cr, h.ctx.clone()).await.unwrap_err();
    assert!(
        err.to_string().starts_with(
            "spec.kafka.configSecretRef: `enable.auto.offset.store` is set by the runtime"
        ),
        "{err}"
    );
    assert!(h.has_event("InvalidSpec", "enable.auto.offset.store").await);
}

#[tokio::test]
async fn rotating_a_referenced_secret_rolls_the_deployment() {
    let h = harness().await;
    let spec = secured(&h).await;
    h.create_relay(&relay("orders", spec)).await;
    h.reconcile_relay("orders").await;
    let replica_sets = || async {
        Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(h.admin_client.clone(), &h.ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|r| {
                r.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.name == "orders-relay")
            })
            .count()
    };
    test_support::wait_for("the first ReplicaSet", Duration::from_secs(30), || async {
        (replica_sets().await == 1).then_some(())
    })
    .await;
    let hash = |d: Deployment| {
        d.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[operator::plan::SECRET_HASH_ANNOTATION]
            .clone()
    };
    let before = hash(h.api::<Deployment>().get("orders-relay").await.unwrap());
    // Reconciling with unchanged Secrets changes nothing.
    h.reconcile_relay("orders").await;
    assert_eq!(
        hash(h.api::<Deployment>().get("orders-relay").await.unwrap()),
        before
    );
    // The SCRAM password is rotated: the next reconcile (at most `refresh` later) rolls the pods.
    h.put_secret("shop-user", &[("password", "correct-horse")])
        .await;
    h.reconcile_relay("orders").await;
    let after = hash(h.api::<Deployment>().get("orders-relay").await.unwrap());
    assert_ne!(after, before);
    test_support::wait_for(
        "a new ReplicaSet after the rotation",
        Duration::from_secs(30),
        || async { (replica_sets().await == 2).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_shared_topic_is_not_deleted_while_another_group_lists_it() {
    let h = harness().await;
    let plane = common::plane();
    let other_ns = plane.namespace("reconcile-other").await;
    common::put_secret(
        &h.admin_client,
        &other_ns,
        "orders-db",
        &[("url", "postgres://x@db/shop")],
    )
    .await;
    let delete =
        json!({"topics": [{"name": "shared", "partitions": 2, "deletionPolicy": "Delete"}]});
    h.create_group(&group("pharmacy", delete.clone())).await;
    h.reconcile_group("pharmacy").await;
    let mut other = group("billing", delete);
    other.metadata.namespace = Some(other_ns.clone());
    Api::<ConsumerGroup>::namespaced(h.admin_client.clone(), &other_ns)
        .create(&Default::default(), &other)
        .await
        .unwrap();
    assert!(h.admin.state().topics.contains_key("shared"));
    h.api::<ConsumerGroup>()
        .delete("pharmacy", &Default::default())
        .await
        .unwrap();
    h.reconcile_group("pharmacy").await;
    assert!(
        h.admin.state().topics.contains_key("shared"),
        "still listed by {other_ns}/billing"
    );
    assert!(
        h.has_event(
            "TopicKept",
            &format!("still listed by ConsumerGroup {other_ns}/billing")
        )
        .await
    );
    assert!(h
        .api::<ConsumerGroup>()
        .get_opt("pharmacy")
        .await
        .unwrap()
        .is_none());
    // The last group that lists it takes it along.
    let billing = Api::<ConsumerGroup>::namespaced(h.admin_client.clone(), &other_ns);
    reconcile_consumer(
        Arc::new(billing.get("billing").await.unwrap()),
        h.ctx.clone(),
    )
    .await
    .unwrap();
    billing
        .delete("billing", &Default::default())
        .await
        .unwrap();
    reconcile_consumer(
        Arc::new(billing.get("billing").await.unwrap()),
        h.ctx.clone(),
    )
    .await
    .unwrap();
    assert!(!h.admin.state().topics.contains_key("shared"));
}

#[tokio::test]
async fn a_pod_template_adds_to_the_pods_and_cannot_replace_the_operators_settings() {
    let h = harness().await;
    let template = json!({"template": {
        "pod": {
            "metadata": {"labels": {"team": "shop"}, "annotations": {"linkerd.io/inject": "enabled"}},
            "imagePullSecrets": [{"name": "registry"}],
            "serviceAccountName": "pharmacy-workload",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "outbox", "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100,
                "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "pharmacy"}}}}]}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "pharmacy"}}}],
            "priorityClassName": "outbox-critical",
            "volumes": [{"name": "rules", "configMap": {"name": "pharmacy-rules"}}],
        },
        "container": {
            "env": [{"name": "DEMO_REGION", "value": "eu"}],
            "envFrom": [{"secretRef": {"name": "pharmacy-extra"}}],
            "volumeMounts": [{"name": "rules", "mountPath": "/etc/rules", "readOnly": true}],
        },
    }});
    h.create_group(&group("pharmacy", template.clone())).await;
    h.reconcile_group("pharmacy").await;
    let d = h
        .api::<Deployment>()
        .get("pharmacy-consumer")
        .await
        .unwrap();
    let meta = d.spec.clone().unwrap().template.metadata.unwrap();
    assert_eq!(meta.labels.as_ref().unwrap()["team"], "shop");
    assert_eq!(
        meta.labels.as_ref().unwrap()["app.kubernetes.io/name"],
        "outbox-consumer"
    );
    assert_eq!(
        meta.annotations.as_ref().unwrap()["linkerd.io/inject"],
        "enabled"
    );
    assert_eq!(
        meta.annotations.as_ref().unwrap()["prometheus.io/scrape"],
        "true"
    );
    let pod = pod_spec(&d);
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("pharmacy-workload")
    );
    assert_eq!(pod.node_selector.unwrap()["kubernetes.io/os"], "linux");
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("dedicated")
    );
    assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
    assert_eq!(pod.topology_spread_constraints.unwrap()[0].max_skew, 1);
    assert_eq!(pod.priority_class_name.as_deref(), Some("outbox-critical"));
    let names: Vec<String> = pod.volumes.unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["tmp", "rules"]);
    let c = &pod.containers[0];
    assert_eq!(env_values(&d)["DEMO_REGION"], "eu");
    assert_eq!(
        c.env_from.as_ref().unwrap()[0]
            .secret_ref
            .as_ref()
            .unwrap()
            .name,
        "pharmacy-extra"
    );
    assert!(c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .any(|m| m.mount_path == "/etc/rules"));
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true),
        "the operator's security context stays"
    );

    // What would replace the operator's settings is refused, naming the field; nothing is applied.
    for (i, (bad, field)) in [
        (
            json!({"pod": {"metadata": {"labels": {"app.kubernetes.io/name": "x"}}}}),
            "spec.template.pod.metadata.labels[app.kubernetes.io/name]",
        ),
        (
            json!({"container": {"env": [{"name": "KAFKA_BOOTSTRAP", "value": "evil:9092"}]}}),
            "spec.template.container.env[0].name",
        ),
        (
            json!({"pod": {"volumes": [{"name": "x", "emptyDir": {}}]}, "container": {"volumeMounts": [{"name": "x", "mountPath": "/tmp"}]}}),
            "spec.template.container.volumeMounts[0].mountPath",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("bad{i}");
        h.create_group(&group(&name, json!({"template": bad}))).await;
        assert_eq!(h.reconcile_group(&name).await, Action::await_change());
        let st = h.group(&name).await.status.clone().unwrap();
        let ready = condition(&st.conditions, "Ready").unwrap();
        assert_eq!(ready.reason, "InvalidSpec");
        assert!(ready.message.starts_with(&format!("{field}: ")), "{}", ready.message);
        assert!(h
            .api::<Deployment>()
            .get_opt(&format!("{name}-consumer"))
            .await
            .unwrap()
            .is_none());
    }
    // A relay keeps the ServiceAccount its Lease Role is bound to.
    h.create_relay(&relay(
        "orders",
        json!({"template": {"pod": {"serviceAccountName": "mine"}}}),
    ))
    .await;
    h.reconcile_relay("orders").await;
    let st = h.relay("orders").await.status.clone().unwrap();
    assert!(condition(&st.conditions, "Ready")
        .unwrap()
        .message
        .starts_with("spec.template.pod.serviceAccountName: "));
}
