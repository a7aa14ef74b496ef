//! The `outbox-operator` binary: configuration errors exit 2 with one line; against the real control plane
//! of the test bed, as its ServiceAccount under the chart's ClusterRole, it serves /healthz, /readyz and
//! /metrics, reconciles what it lists, and follows changes through its watches.

mod common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::Api;
use operator::crd::{ConsumerGroup, OutboxRelay};
use serde_json::json;
use test_support::{free_port, wait_for};

#[test]
fn no_kubernetes_configuration_exits_2_naming_it() {
    test_support::cli::assert_refused(
        env!("CARGO_BIN_EXE_outbox-operator"),
        &["--http-addr", "127.0.0.1:0"],
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
        &["KUBERNETES_SERVICE_HOST"],
        "outbox-operator: invalid --kubeconfig (KUBECONFIG)",
    );
}

#[test]
fn leader_lease_timings_that_do_not_nest_exit_2_naming_the_flags() {
    let line = test_support::cli::assert_refused(
        env!("CARGO_BIN_EXE_outbox-operator"),
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--lease-duration",
            "5s",
            "--renew-deadline",
            "10s",
        ],
        &[],
        &[],
        "outbox-operator: invalid --lease-duration/--renew-deadline/--retry-period",
    );
    assert!(
        line.contains("lease duration must exceed the renew deadline"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_probes_and_metrics_and_follows_changes() {
    let plane = common::plane();
    let client = plane.client().await;
    common::install_crds(&client).await;
    let ns = plane.namespace("binary").await;
    common::put_secret(&client, &ns, "db", &[("url", "postgres://outbox@db/shop")]).await;
    let sa = common::apply_chart_rbac(plane, "outbox-operator", |_| {}).await;
    let kubeconfig = plane
        .service_account(common::OPERATOR_NS, &sa)
        .await
        .unwrap()
        .kubeconfig;
    let relay: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
        "metadata": {"name": "orders"},
        "spec": {"database": {"secretRef": {"name": "db", "key": "url"}}, "kafka": {"bootstrap": "127.0.0.1:1"}}
    }))
    .unwrap();
    Api::<OutboxRelay>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &relay)
        .await
        .unwrap();
    let port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-operator"))
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "error")
        .env("TOKIO_WORKER_THREADS", "2")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    };
    assert_eq!(
        wait_for("healthz", Duration::from_secs(30), || async {
            get("/healthz").await
        })
        .await
        .0,
        200
    );
    let (_, body) = wait_for(
        "readyz 200 (CRDs served)",
        Duration::from_secs(30),
        || async { get("/readyz").await.filter(|(s, _)| *s == 200) },
    )
    .await;
    assert!(body.contains("\"ready\":true"), "{body}");
    // The controller lists the relay and reconciles it: its Deployment appears.
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let relay_deployment = (&client, ns.as_str(), "orders-relay");
    common::wait_for_replicas(
        relay_deployment,
        2,
        "the relay's Deployment",
        Duration::from_secs(30),
    )
    .await;
    // Four ConsumerGroups whose broker does not answer: their topic calls wait out a 10 s timeout, and must
    // not hold up the runtime's two workers (TOKIO_WORKER_THREADS, set at spawn) while the relay needs them.
    for i in 0..4 {
        let g: ConsumerGroup = serde_json::from_value(json!({
            "apiVersion": "outbox.dev/v1alpha1", "kind": "ConsumerGroup",
            "metadata": {"name": format!("g{i}")},
            "spec": {"groupId": format!("g{i}"), "image": "c:1", "kafka": {"bootstrap": "127.0.0.1:1"},
                "database": {"secretRef": {"name": "db", "key": "url"}}, "topics": [{"name": "t", "partitions": 1}]}
        }))
        .unwrap();
        Api::<ConsumerGroup>::namespaced(client.clone(), &ns)
            .create(&Default::default(), &g)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Watches drive it from here: a spec change reaches the Deployment, and
    // a deleted Deployment (an owned object) is recreated — both well before the 30 s periodic requeue and
    // the groups' 10 s broker timeout.
    Api::<OutboxRelay>::namespaced(client.clone(), &ns)
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    common::wait_for_replicas(
        relay_deployment,
        3,
        "replicas 3 after the spec change",
        Duration::from_secs(5),
    )
    .await;
    let old_uid = deployments.get("orders-relay").await.unwrap().metadata.uid;
    deployments
        .delete("orders-relay", &Default::default())
        .await
        .unwrap();
    wait_for(
        "the deleted Deployment recreated",
        Duration::from_secs(5),
        || async {
            let d = deployments.get_opt("orders-relay").await.ok().flatten()?;
            (d.metadata.uid != old_uid && d.metadata.deletion_timestamp.is_none()).then_some(())
        },
    )
    .await;
    // The operator's status reaches the CR (observedGeneration of the spec change).
    wait_for(
        "status with observedGeneration 2",
        Duration::from_secs(10),
        || async {
            let r = Api::<OutboxRelay>::namespaced(client.clone(), &ns)
                .get("orders")
                .await
                .ok()?;
            (r.status?.observed_generation == Some(2)).then_some(())
        },
    )
    .await;
    // Deleting the CR: the garbage collector removes what it owns.
    Api::<OutboxRelay>::namespaced(client.clone(), &ns)
        .delete("orders", &Default::default())
        .await
        .unwrap();
    let deleted = std::time::Instant::now();
    wait_for(
        "the garbage collector to delete the relay's Deployment",
        Duration::from_secs(20),
        || async {
            deployments
                .get_opt("orders-relay")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    println!(
        "garbage collected {:?} after the OutboxRelay's deletion",
        deleted.elapsed()
    );
    let (_, metrics) = get("/metrics").await.unwrap();
    assert!(
        metrics.contains("outbox_operator_reconciles_total{kind=\"OutboxRelay\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("outbox_operator_reconcile_duration_seconds"));
    child.kill().await.unwrap();
}
