//! `helm install` for real: the chart installed, upgraded and uninstalled by Helm's own library
//! (helm-python-sdk, through `scripts/helm.py`) against the test bed's control plane, in namespaces that
//! enforce Pod Security `restricted`; with the demo stack, the operator binary runs as the chart's
//! ServiceAccount and every pod it creates is admitted, and its resources become Ready.

mod common;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, GroupVersionKind, ListParams};
use operator::crd::{ConsumerGroup, OutboxRelay};
use serde_json::{json, Value};
use test_support::control_plane;
use test_support::{free_port, wait_for};

const RESTRICTED: &[(&str, &str)] = &[
    ("pod-security.kubernetes.io/enforce", "restricted"),
    ("pod-security.kubernetes.io/enforce-version", "latest"),
];

fn chart() -> String {
    chart_at("../charts/outbox-operator")
}

/// A chart directory relative to this crate.
fn chart_at(relative: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(relative)
        .display()
        .to_string()
}

fn helm(action: &str, release: &str, ns: &str, values: &Value, kubeconfig: &Path) -> Value {
    helm_chart(&chart(), action, release, ns, values, kubeconfig)
}

/// `helm <action>` of the chart at `chart`.
fn helm_chart(
    chart: &str,
    action: &str,
    release: &str,
    ns: &str,
    values: &Value,
    kubeconfig: &Path,
) -> Value {
    let kubeconfig = kubeconfig.to_str().unwrap();
    let values = values.to_string();
    let chart = chart.to_string();
    let args: Vec<&str> = match action {
        "uninstall" => vec![action, release, ns, kubeconfig],
        _ => vec![action, &chart, release, ns, &values, kubeconfig],
    };
    control_plane::helm(&args).unwrap_or_else(|e| panic!("helm {action} {release}: {e:#}"))
}

/// Every object of a release's manifest exists on the server.
async fn all_exist(client: &kube::Client, manifest: &[Value]) -> Vec<String> {
    let mut seen = Vec::new();
    for doc in manifest {
        let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (
                String::new(),
                doc["apiVersion"].as_str().unwrap().to_owned(),
            ),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, doc["kind"].as_str().unwrap());
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("{gvk:?} not served: {e}"));
        let name = doc["metadata"]["name"].as_str().unwrap();
        let api: Api<DynamicObject> = match (caps.scope, doc["metadata"]["namespace"].as_str()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            _ => Api::all_with(client.clone(), &resource),
        };
        api.get(name)
            .await
            .unwrap_or_else(|e| panic!("{} {name} of the release: {e}", gvk.kind));
        seen.push(format!("{}/{name}", gvk.kind));
    }
    seen.sort();
    seen
}

/// Pods in `ns` per owner kind/name prefix, and the admission refusals the controllers recorded.
async fn pods_admitted(client: &kube::Client, ns: &str, want: usize) -> Vec<String> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), ns);
    wait_for(
        &format!("{want} pods admitted in {ns}"),
        Duration::from_secs(60),
        || async {
            let refused: Vec<String> = events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
                .map(|e| e.message.unwrap_or_default())
                .collect();
            assert!(refused.is_empty(), "pods refused: {refused:?}");
            let names: Vec<String> = pods
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .collect();
            (names.len() == want).then_some(names)
        },
    )
    .await
}

#[tokio::test]
async fn install_upgrade_and_uninstall_with_defaults() {
    let plane = common::plane();
    let client = plane.client().await;
    let ns = plane.namespace_labelled("helm-defaults", RESTRICTED).await;
    let installed = helm(
        "install",
        "outbox-operator",
        &ns,
        &json!({}),
        &plane.kubeconfig(),
    );
    assert_eq!(installed["revision"], 1);
    assert_eq!(installed["status"], "deployed");
    let manifest = installed["manifest"].as_array().unwrap();
    let objects = all_exist(&client, manifest).await;
    assert!(
        objects.contains(&"ClusterRole/outbox-operator".to_string())
            && objects.contains(&"Deployment/outbox-operator".to_string()),
        "{objects:?}"
    );
    // The namespace does enforce `restricted`: a bare pod is refused ...
    let bare: Pod = serde_json::from_value(json!({
        "metadata": {"name": "bare"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    match Api::<Pod>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &bare)
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains("violates PodSecurity"), "{}", s.message)
        }
        other => panic!("a bare pod must be refused under restricted, got {other:?}"),
    }
    // ... and the operator's pods (two leader-elected replicas by default) are admitted.
    let pods = pods_admitted(&client, &ns, 2).await;
    assert!(
        pods.iter().all(|p| p.starts_with("outbox-operator-")),
        "{pods:?}"
    );

    let upgraded = helm(
        "upgrade",
        "outbox-operator",
        &ns,
        &json!({
            "operator": {"logLevel": "debug", "podLabels": {"team": "platform"},
                "podAnnotations": {"linkerd.io/inject": "enabled"}, "priorityClassName": "platform-critical",
                "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway"}]},
            "imagePullSecrets": [{"name": "registry-credentials"}],
        }),
        &plane.kubeconfig(),
    );
    assert_eq!(upgraded["revision"], 2);
    assert_eq!(upgraded["status"], "deployed");
    let dep = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("outbox-operator")
        .await
        .unwrap();
    let template = dep.spec.unwrap().template;
    let meta = template.metadata.unwrap();
    assert_eq!(meta.labels.unwrap()["team"], "platform");
    assert_eq!(meta.annotations.unwrap()["linkerd.io/inject"], "enabled");
    let pod = template.spec.unwrap();
    assert_eq!(
        pod.image_pull_secrets.unwrap()[0].name,
        "registry-credentials"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("platform-critical")
    );
    assert_eq!(pod.topology_spread_constraints.unwrap().len(), 1);
    let env = pod.containers[0].env.clone().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")),
        "the upgrade changed the operator's RUST_LOG: {env:?}"
    );

    helm(
        "uninstall",
        "outbox-operator",
        &ns,
        &json!({}),
        &plane.kubeconfig(),
    );
    wait_for(
        "the release's objects gone",
        Duration::from_secs(30),
        || async {
            let d = Api::<Deployment>::namespaced(client.clone(), &ns)
                .get_opt("outbox-operator")
                .await
                .ok()?;
            d.is_none().then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_stack_runs_under_restricted_pod_security_and_becomes_ready() {
    let plane = common::plane();
    let client = plane.client().await;
    let ns = plane.namespace_labelled("helm-demo", RESTRICTED).await;
    // A broker the operator can manage topics on, in place of the demo's in-cluster Kafka (no kubelet runs
    // it here).
    let tansu = test_support::kafka::Tansu::start().unwrap();
    let values = json!({"demo": {"enabled": true, "kafka": {"bootstrap": tansu.bootstrap()},
        "kafkaUi": {"enabled": true}}});
    let installed = helm("install", "demo", &ns, &values, &plane.kubeconfig());
    all_exist(&client, installed["manifest"].as_array().unwrap()).await;

    // The operator binary, as the chart's ServiceAccount with the chart's ClusterRole, watching the
    // demo's namespace (what the chart's Deployment would run, were there a kubelet).
    let token = plane
        .service_account(&ns, "demo-outbox-operator")
        .await
        .unwrap();
    let port = free_port();
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-operator"))
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &token.kubeconfig)
        .env("OPERATOR_NAMESPACE", &ns)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Pods: the operator's two replicas (chart), PostgreSQL, the demo API, Kafka UI; from the operator:
    // 2 relays, 2 pharmacy, 1 notification consumer. All admitted under `restricted`.
    let pods = pods_admitted(&client, &ns, 10).await;
    for prefix in [
        "demo-outbox-operator-",
        "demo-outbox-operator-postgres-0",
        "demo-outbox-operator-demo-api-",
        "demo-outbox-operator-kafka-ui-",
        "orders-relay-",
        "pharmacy-consumer-",
        "notification-consumer-",
    ] {
        assert!(
            pods.iter().any(|p| p.starts_with(prefix)),
            "no pod {prefix}* among {pods:?}"
        );
    }

    // The kubelet stand-in marks every pod Ready; the resources follow, as `kubectl wait` sees them.
    control_plane::mark_pods_ready(&client, &ns, "", 100)
        .await
        .unwrap();
    let wait = [
        "wait",
        "--for=condition=Ready",
        "obr/orders",
        "cg/pharmacy",
        "cg/notification",
        "--timeout=60s",
        "-n",
        &ns,
    ];
    match plane.kubectl(&wait) {
        Some(out) => assert!(
            out.status.success(),
            "kubectl wait: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        None => {
            eprintln!("kubectl not on PATH: checking the conditions directly");
            wait_for("Ready resources", Duration::from_secs(60), || async {
                let r = Api::<OutboxRelay>::namespaced(client.clone(), &ns)
                    .get("orders")
                    .await
                    .ok()?;
                let ready = r
                    .status?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then_some(())
            })
            .await;
        }
    }
    let pharmacy = Api::<ConsumerGroup>::namespaced(client.clone(), &ns)
        .get("pharmacy")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(pharmacy.ready_replicas, 2);
    assert_eq!(
        pharmacy.partitions.get("orders"),
        Some(&6),
        "topic created on the broker"
    );
    operator.kill().await.unwrap();

    helm("uninstall", "demo", &ns, &json!({}), &plane.kubeconfig());
}

#[tokio::test]
async fn the_demo_with_its_own_kafka_is_admitted_under_restricted() {
    let plane = common::plane();
    let client = plane.client().await;
    let ns = plane.namespace_labelled("helm-kafka", RESTRICTED).await;
    // NodePorts are cluster-wide: another port than the other demo test's.
    let values = json!({"demo": {"enabled": true, "api": {"nodePort": 30090}}});
    let installed = helm("install", "kafka-demo", &ns, &values, &plane.kubeconfig());
    all_exist(&client, installed["manifest"].as_array().unwrap()).await;
    // No operator runs here: the chart's own pods only (two operator replicas, PostgreSQL, Kafka, demo API).
    let pods = pods_admitted(&client, &ns, 5).await;
    assert!(
        pods.iter()
            .any(|p| p == "kafka-demo-outbox-operator-kafka-0"),
        "{pods:?}"
    );
    helm(
        "uninstall",
        "kafka-demo",
        &ns,
        &json!({}),
        &plane.kubeconfig(),
    );
}

/// The upgrade path, on a control plane of its own (the CRDs' ownership is cluster-wide): the previous chart
/// (tests/fixtures/chart-a673ddc, its CRDs in crds/, which Helm never upgrades) is installed; a field only the
/// new CRDs have (`kafka.tls`) is silently dropped by the API server; the CRDs are adopted by the
/// `outbox-operator-crds` release as the README's "Upgrading" says, the operator chart is upgraded, and the
/// field is kept. Uninstalling the CRD release keeps the CRDs and the resources (`resource-policy: keep`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_from_the_previous_chart_delivers_the_new_crds() {
    let plane = tokio::task::spawn_blocking(control_plane::ControlPlane::start)
        .await
        .unwrap()
        .unwrap();
    let client = plane.client().await;
    let ns = plane.namespace("upgrade").await;
    let previous = chart_at("tests/fixtures/chart-a673ddc");
    let installed = helm_chart(
        &previous,
        "install",
        "outbox-operator",
        &ns,
        &json!({}),
        &plane.kubeconfig(),
    );
    assert_eq!(installed["revision"], 1);
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    wait_for(
        "the previous chart's CRDs",
        Duration::from_secs(30),
        || async {
            let crd = crds.get_opt("consumergroups.outbox.dev").await.ok()??;
            let conditions = crd.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let groups = Api::<ConsumerGroup>::namespaced(client.clone(), &ns);
    let group = |tls: bool| -> ConsumerGroup {
        let mut kafka = json!({"bootstrap": "my-cluster-kafka-bootstrap:9093"});
        if tls {
            kafka["tls"] =
                json!({"trustedCertificates": [{"secretName": "ca", "certificate": "ca.crt"}]});
        }
        serde_json::from_value(json!({
            "apiVersion": "outbox.dev/v1alpha1", "kind": "ConsumerGroup",
            "metadata": {"name": "pharmacy"},
            "spec": {"groupId": "pharmacy", "image": "c:1", "kafka": kafka,
                "database": {"secretRef": {"name": "db", "key": "url"}},
                "topics": [{"name": "orders", "partitions": 6}]}
        }))
        .unwrap()
    };
    // With the previous CRD, server-side apply refuses the new field and a create drops it silently.
    let refused = groups
        .patch(
            "pharmacy",
            &kube::api::PatchParams::apply("upgrade-test").force(),
            &kube::api::Patch::Apply(&group(true)),
        )
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains(".spec.kafka.tls: field not declared in schema"),
        "{refused}"
    );
    let old = groups
        .create(&Default::default(), &group(true))
        .await
        .unwrap();
    assert!(
        old.spec.kafka.tls.is_none(),
        "the previous CRD does not know kafka.tls: the API server drops it"
    );

    // The one-time adoption of CRDs that came from crds/ (no Helm ownership), as documented.
    let kubectl = |args: &[&str]| {
        let out = plane.kubectl(args).expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let names = ["outboxrelays.outbox.dev", "consumergroups.outbox.dev"];
    let mut label = vec!["label", "crd"];
    label.extend(names);
    label.extend(["app.kubernetes.io/managed-by=Helm", "--overwrite"]);
    kubectl(&label);
    let release_ns = format!("meta.helm.sh/release-namespace={ns}");
    let mut annotate = vec!["annotate", "crd"];
    annotate.extend(names);
    annotate.extend([
        "meta.helm.sh/release-name=outbox-operator-crds",
        &release_ns,
        "--overwrite",
    ]);
    kubectl(&annotate);
    let crd_chart = chart_at("../charts/outbox-operator-crds");
    let adopted = helm_chart(
        &crd_chart,
        "install",
        "outbox-operator-crds",
        &ns,
        &json!({}),
        &plane.kubeconfig(),
    );
    assert_eq!(adopted["status"], "deployed");
    let upgraded = helm(
        "upgrade",
        "outbox-operator",
        &ns,
        &json!({}),
        &plane.kubeconfig(),
    );
    assert_eq!(upgraded["revision"], 2);
    assert_eq!(upgraded["status"], "deployed");

    let new = groups
        .patch(
            "pharmacy",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"kafka": {"tls": {"trustedCertificates": [{"secretName": "ca", "certificate": "ca.crt"}]}}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        new.spec.kafka.tls.map(|t| t.trusted_certificates.len()),
        Some(1),
        "the upgraded CRD keeps kafka.tls"
    );
    // Removing the CRD release keeps the CRDs, and so the resources.
    helm_chart(
        &crd_chart,
        "uninstall",
        "outbox-operator-crds",
        &ns,
        &json!({}),
        &plane.kubeconfig(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in names {
        assert!(crds.get_opt(name).await.unwrap().is_some(), "{name} kept");
    }
    assert!(groups.get_opt("pharmacy").await.unwrap().is_some());
}
