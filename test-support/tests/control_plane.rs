//! The control plane itself: it starts, the admin is admin, a ServiceAccount token is only what RBAC
//! grants, the controller-manager runs Deployments down to Pods, and the kubelet stand-in makes them Ready.

#![cfg(feature = "control-plane")]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use test_support::{control_plane, wait_for};

#[tokio::test]
async fn the_admin_can_do_anything_and_a_service_account_only_what_it_is_granted() {
    let plane = control_plane::shared();
    let admin = plane.client().await;
    let version = admin.apiserver_version().await.unwrap();
    assert_eq!(
        format!("{}.{}", version.major, version.minor),
        control_plane::KUBERNETES_VERSION
            .rsplit_once('.')
            .unwrap()
            .0
    );
    let ns = plane.namespace("sa").await;
    Api::<Secret>::namespaced(admin, &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    let sa = plane.service_account_client(&ns, "nobody").await.unwrap();
    match Api::<Secret>::namespaced(sa, &ns)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403);
            assert!(
                s.message
                    .contains(&format!("system:serviceaccount:{ns}:nobody")),
                "{}",
                s.message
            );
        }
        other => panic!("a ServiceAccount without a Role must be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn deployments_get_pods_which_the_kubelet_stand_in_makes_ready() {
    let plane = control_plane::shared();
    let admin = plane.client().await;
    let ns = plane.namespace("pods").await;
    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "web:1"}]}}
        }
    }))
    .unwrap();
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &ns);
    deployments
        .create(&PostParams::default(), &dep)
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(admin.clone(), &ns);
    wait_for(
        "two pods from the controller-manager",
        Duration::from_secs(20),
        || async {
            (pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .ok()?
                .items
                .len()
                == 2)
                .then_some(())
        },
    )
    .await;
    let marked = control_plane::mark_pods_ready(&admin, &ns, "app=web", 2)
        .await
        .unwrap();
    assert_eq!(marked, 2);
    wait_for("readyReplicas 2", Duration::from_secs(20), || async {
        let st = deployments.get("web").await.ok()?.status?;
        (st.ready_replicas == Some(2)).then_some(())
    })
    .await;
}

#[test]
fn kubectl_reads_the_admin_kubeconfig() {
    let Some(kubectl) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
    else {
        eprintln!("kubectl not on PATH: skipped");
        return;
    };
    let out = std::process::Command::new(kubectl)
        .args(["get", "namespace", "default", "-o", "name"])
        .env("KUBECONFIG", control_plane::shared().kubeconfig())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "namespace/default"
    );
}
