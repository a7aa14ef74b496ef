//! Figure: resident memory of the `outbox-operator` binary serving 100 custom resources on the test bed's
//! real control plane (kube-apiserver, kube-controller-manager, etcd on loopback; `make setup` unpacks them),
//! in a cluster that also holds `UNRELATED` (default 1,000) Deployments, Services and ServiceAccounts of
//! other applications, which the operator's label-filtered watches must not cache. Run:
//! `cargo build --release -p operator --bins --examples && ./target/release/examples/operator_rss`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use operator::crd::{ConsumerGroup, OutboxRelay};
use serde_json::json;
use test_support::control_plane;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let plane = common::plane();
    let client = plane.client().await;
    common::install_crds(&client).await;
    common::put_secret(
        &client,
        "default",
        "db",
        &[("url", "postgres://outbox@db/shop")],
    )
    .await;
    for i in 0..50 {
        let r: OutboxRelay = serde_json::from_value(json!({
            "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
            "metadata": {"name": format!("r{i}"), "namespace": "default"},
            "spec": {"database": {"secretRef": {"name": "db", "key": "url"}}, "kafka": {"bootstrap": "127.0.0.1:1"}}
        }))?;
        Api::<OutboxRelay>::namespaced(client.clone(), "default")
            .create(&Default::default(), &r)
            .await?;
        let g: ConsumerGroup = serde_json::from_value(json!({
            "apiVersion": "outbox.dev/v1alpha1", "kind": "ConsumerGroup",
            "metadata": {"name": format!("g{i}"), "namespace": "default"},
            "spec": {"groupId": format!("g{i}"), "image": "c:1", "kafka": {"bootstrap": "127.0.0.1:1"},
                "database": {"secretRef": {"name": "db", "key": "url"}}, "topics": [{"name": "t", "partitions": 1}]}
        }))?;
        Api::<ConsumerGroup>::namespaced(client.clone(), "default")
            .create(&Default::default(), &g)
            .await?;
    }

    let unrelated: usize = std::env::var("UNRELATED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let others = plane.namespace("other-apps").await;
    for i in 0..unrelated {
        // replicas 0: the controller-manager makes no pods; each Deployment is about 2 KB, like a small app's.
        let env: Vec<serde_json::Value> = (0..20)
            .map(|k| json!({"name": format!("SETTING_{k}"), "value": format!("value-{i}-{k}-0123456789abcdef")}))
            .collect();
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": format!("app-{i}"), "labels": {"app": format!("app-{i}"), "team": "other"}},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": format!("app-{i}")}},
                "template": {"metadata": {"labels": {"app": format!("app-{i}")}},
                    "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1", "env": env}]}}}
        }))?;
        Api::<Deployment>::namespaced(client.clone(), &others)
            .create(&Default::default(), &d)
            .await?;
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": format!("app-{i}")},
            "spec": {"selector": {"app": format!("app-{i}")}, "ports": [{"port": 80}]}
        }))?;
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &others)
            .create(&Default::default(), &svc)
            .await?;
        let sa: k8s_openapi::api::core::v1::ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": format!("app-{i}")}}))?;
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &others)
            .create(&Default::default(), &sa)
            .await?;
    }

    // `OUTBOX_OPERATOR_BIN` measures another build (e.g. an earlier commit's) on the same bed.
    let bin = match std::env::var_os("OUTBOX_OPERATOR_BIN") {
        Some(b) => std::path::PathBuf::from(b),
        None => std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("outbox-operator"))
            .ok_or_else(|| anyhow::anyhow!("no target dir"))?,
    };
    let mut child = tokio::process::Command::new(&bin)
        .args(["--http-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", plane.kubeconfig())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("error".into()),
        )
        .kill_on_drop(true)
        .spawn()?;
    // Measured once every relay has its Deployment (the groups stall on the unreachable broker, as
    // reconciled-with-error objects) and the watches have streamed for a while.
    let deployments = Api::<Deployment>::namespaced(client, "default");
    let started = std::time::Instant::now();
    loop {
        let made = deployments.list(&Default::default()).await?.items.len();
        if made >= 50 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the operator created {made} of the 50 relay Deployments within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reconciled = started.elapsed();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("operator exited"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?");
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?");
    println!(
        "outbox-operator with 100 CRs and {unrelated} unrelated Deployments/Services/ServiceAccounts on \
         kube-apiserver {}: 50 relay Deployments after {:.1} s; 10 s later {rss}, peak {hwm}",
        control_plane::KUBERNETES_VERSION,
        reconciled.as_secs_f64()
    );
    child.kill().await?;
    Ok(())
}
