//! Shared by the operator's tests and the RSS example: a kube-fake-client that knows both CRDs.
#![allow(dead_code)]

use kube_fake_client::ClientBuilder;
use operator::crd::{ConsumerGroup, OutboxRelay};

/// `builder` with OutboxRelay and ConsumerGroup registered, each with its status subresource.
pub fn with_crds(builder: ClientBuilder) -> ClientBuilder {
    builder
        .with_resource::<OutboxRelay>()
        .with_resource::<ConsumerGroup>()
        .with_status_subresource::<OutboxRelay>()
        .with_status_subresource::<ConsumerGroup>()
}

/// Applies both generated CRDs (as `kubectl apply --server-side -f crds/` would) and waits until each is
/// Established; returns their names. Idempotent: every test of a binary may call it.
pub async fn install_crds(client: &kube::Client) -> Vec<String> {
    let mut names = Vec::new();
    for (file, yaml) in operator::crd::crd_files() {
        let name = test_support::control_plane::install_crd_yaml(client, &yaml)
            .await
            .unwrap_or_else(|e| panic!("crds/{file}: {e:#}"));
        names.push(name);
    }
    names.sort();
    names
}

/// Namespace the operator's ServiceAccount lives in on the test control plane.
pub const OPERATOR_NS: &str = "outbox-system";

/// The operator's RBAC exactly as the chart renders it (Helm's library) for `release`: ServiceAccount,
/// ClusterRole and ClusterRoleBinding in [`OPERATOR_NS`], applied by the admin; `edit` changes the
/// ClusterRole first. Returns the ServiceAccount's name.
pub async fn apply_chart_rbac(
    plane: &test_support::control_plane::ControlPlane,
    release: &str,
    edit: impl Fn(&mut serde_json::Value),
) -> String {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
    let admin = plane.client().await;
    let ns = k8s_openapi::api::core::v1::Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(OPERATOR_NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .patch(
            OPERATOR_NS,
            &PatchParams::apply("outbox-tests").force(),
            &Patch::Apply(&ns),
        )
        .await
        .unwrap();
    let docs =
        test_support::control_plane::render_chart(release, OPERATOR_NS, &serde_json::json!({}))
            .expect("render the chart with Helm's library");
    let mut service_account = None;
    for mut doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let (group, version, plural, namespaced) = match kind.as_str() {
            "ServiceAccount" => ("", "v1", "serviceaccounts", true),
            "ClusterRole" => ("rbac.authorization.k8s.io", "v1", "clusterroles", false),
            "ClusterRoleBinding" => (
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                false,
            ),
            _ => continue,
        };
        if kind == "ClusterRole" {
            edit(&mut doc);
        }
        if kind == "ServiceAccount" {
            service_account = doc["metadata"]["name"].as_str().map(String::from);
        }
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, &kind),
            plural,
        );
        let api: kube::Api<DynamicObject> = if namespaced {
            kube::Api::namespaced_with(admin.clone(), OPERATOR_NS, &resource)
        } else {
            kube::Api::all_with(admin.clone(), &resource)
        };
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        api.patch(
            &name,
            &PatchParams::apply("outbox-tests").force(),
            &Patch::Apply(&doc),
        )
        .await
        .unwrap_or_else(|e| panic!("apply the chart's {kind} {name}: {e}"));
    }
    service_account.expect("the chart renders a ServiceAccount")
}

/// A client for the ServiceAccount of chart release `release` whose ClusterRole `edit` changed.
pub async fn operator_client_with(
    plane: &test_support::control_plane::ControlPlane,
    release: &str,
    edit: impl Fn(&mut serde_json::Value),
) -> kube::Client {
    let sa = apply_chart_rbac(plane, release, edit).await;
    let client = plane
        .service_account_client(OPERATOR_NS, &sa)
        .await
        .unwrap();
    wait_until_authorized(&client).await;
    client
}

/// The authorizer learns new bindings through a watch: wait until the binding is in effect.
async fn wait_until_authorized(client: &kube::Client) {
    let relays = kube::Api::<operator::crd::OutboxRelay>::all(client.clone());
    test_support::wait_for(
        "the chart's ClusterRoleBinding in effect",
        std::time::Duration::from_secs(10),
        || async { relays.list(&Default::default()).await.ok().map(|_| ()) },
    )
    .await;
}

/// A client authenticated as the operator's ServiceAccount, holding exactly the chart's ClusterRole.
pub async fn operator_client(plane: &test_support::control_plane::ControlPlane) -> kube::Client {
    static APPLIED: tokio::sync::OnceCell<std::path::PathBuf> = tokio::sync::OnceCell::const_new();
    let kubeconfig = APPLIED
        .get_or_init(|| async {
            let sa = apply_chart_rbac(plane, "outbox-operator", |_| {}).await;
            plane
                .service_account(OPERATOR_NS, &sa)
                .await
                .expect("token for the operator's ServiceAccount")
                .kubeconfig
        })
        .await;
    let client = test_support::control_plane::client_from(kubeconfig)
        .await
        .unwrap();
    wait_until_authorized(&client).await;
    client
}

/// The shared control plane, started with both CRDs already installed (the garbage collector then knows
/// their resources from the start; see `ControlPlane::start_with_crds`).
pub fn plane() -> &'static test_support::control_plane::ControlPlane {
    test_support::control_plane::shared_with_crds(|| {
        operator::crd::crd_files()
            .into_iter()
            .map(|(_, yaml)| yaml)
            .collect()
    })
}

/// The field managers that own the field at `pointer` (in managedFields' `f:` notation, e.g.
/// `/f:spec/f:replicas`).
pub fn field_managers(meta: &kube::api::ObjectMeta, pointer: &str) -> Vec<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|f| {
            f.fields_v1
                .as_ref()
                .is_some_and(|v| v.0.pointer(pointer).is_some())
        })
        .map(|f| f.manager.clone().unwrap_or_default())
        .collect()
}

/// Creates or replaces Secret `name` in `ns` with these keys (what `kubectl create secret generic` makes).
#[allow(dead_code)]
pub async fn put_secret(client: &kube::Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    use kube::api::{Patch, PatchParams};
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::json!(k8s_openapi::ByteString(v.as_bytes().to_vec())),
            )
        })
        .collect();
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "data": data}))
            .unwrap();
    kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

/// Waits up to `timeout` until Deployment `name` in `ns` asks for `want` replicas (the operator reconciled
/// the spec that wants them); `what` names the wait in the failure.
pub async fn wait_for_replicas(
    (client, ns, name): (&kube::Client, &str, &str),
    want: i32,
    what: &str,
    timeout: std::time::Duration,
) {
    let deployments =
        kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), ns);
    test_support::wait_for(what, timeout, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get_opt(name).await.ok().flatten()?;
            (d.spec?.replicas == Some(want)).then_some(())
        }
    })
    .await;
}
