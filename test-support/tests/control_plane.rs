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
    let Some(out) = control_plane::shared().kubectl(&["get", "namespace", "default", "-o", "name"])
    else {
        eprintln!("kubectl not on PATH: skipped");
        return;
    };
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

/// Not a test of its own: the child process of the test below (runs only with `OUTBOX_PLANE_CHILD` set).
#[test]
fn child_holds_a_control_plane_until_killed() {
    let Some(out) = std::env::var_os("OUTBOX_PLANE_CHILD") else {
        return;
    };
    let plane = control_plane::shared();
    let dir = plane.kubeconfig().parent().unwrap().to_path_buf();
    std::fs::write(&out, format!("{}\n{}\n", plane.url(), dir.display())).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_sigkilled_test_process_leaves_no_control_plane_behind() {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holds_a_control_plane_until_killed",
            "--nocapture",
        ])
        .env("OUTBOX_PLANE_CHILD", out.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let written = loop {
        let text = std::fs::read_to_string(out.path()).unwrap_or_default();
        if text.lines().count() == 2 {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child's control plane did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut lines = written.lines();
    let url = lines.next().unwrap().to_owned();
    let dir = std::path::PathBuf::from(lines.next().unwrap());
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the child's apiserver listens"
    );
    child.kill().unwrap(); // SIGKILL: no destructor, no panic hook runs
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "30 s after SIGKILL the apiserver still listens on {port} or {} still exists",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
