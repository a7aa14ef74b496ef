//! A highly available operator on the real control plane: replicas of the `outbox-operator` binary, as the
//! chart's ServiceAccount, elect one leader through a Lease. Only the leader reconciles (the Events record
//! which replica wrote them); a SIGKILLed leader's standby reconciles a spec change within a lease duration
//! + 2 s; a stopped leader hands over at once; a leader whose Lease another holder wrote stops and exits 1.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Patch, PatchParams};
use kube::Api;
use operator::crd::OutboxRelay;
use serde_json::json;
use test_support::{free_port, wait_for};
use tokio::process::{Child, Command};

const LEASE_DURATION: Duration = Duration::from_secs(3);

/// One operator replica: its process, /readyz and /metrics port, and name.
struct Replica {
    name: &'static str,
    child: Child,
    port: u16,
}

impl Replica {
    fn start(name: &'static str, kubeconfig: &std::path::Path, watch: &str) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_outbox-operator"))
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--namespace", watch])
            .args([
                "--lease-duration",
                "3s",
                "--renew-deadline",
                "2s",
                "--retry-period",
                "250ms",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            // The identity by flag, not POD_NAME: the Events must carry it all the same.
            .args(["--identity", name])
            .env_remove("POD_NAME")
            .env("POD_NAMESPACE", common::OPERATOR_NS)
            // Error level only: stderr is a pipe read at exit, and must not fill up meanwhile.
            .env("RUST_LOG", "error")
            .env("TOKIO_WORKER_THREADS", "2")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { name, child, port }
    }

    async fn get(&self, path: &str) -> Option<String> {
        let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .ok()?;
        (r.status() == 200).then_some(())?;
        r.text().await.ok()
    }

    /// Waits until /readyz answers 200 with `"leader":<leader>`.
    async fn ready_as(&self, leader: bool) {
        let want = format!("\"leader\":{leader}");
        wait_for(
            &format!("{} ready with {want}", self.name),
            Duration::from_secs(30),
            || async { self.get("/readyz").await.filter(|b| b.contains(&want)) },
        )
        .await;
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.unwrap_or_default();
        test_support::metric_value(&text, name)
    }
}

/// (reporting instance, reason, event time) of every Event the operator wrote in `ns` (the Kubernetes
/// controllers write some too).
async fn events(client: &kube::Client, ns: &str) -> Vec<(String, String, jiff_time::Timestamp)> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("outbox-operator"))
        .map(|e| {
            (
                e.reporting_instance.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.event_time.map(|t| t.0).unwrap_or_default(),
            )
        })
        .collect()
}

use k8s_openapi::jiff as jiff_time;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_reconciles_and_a_standby_takes_over_when_it_dies_or_stops() {
    let plane = common::plane();
    let client = plane.client().await;
    common::install_crds(&client).await;
    let ns = plane.namespace("leader").await;
    common::put_secret(&client, &ns, "db", &[("url", "postgres://outbox@db/shop")]).await;
    let sa = common::apply_chart_rbac(plane, "outbox-operator", |_| {}).await;
    let kubeconfig = plane
        .service_account(common::OPERATOR_NS, &sa)
        .await
        .unwrap()
        .kubeconfig;
    let mut a = Replica::start("op-a", &kubeconfig, &ns);
    a.ready_as(true).await;
    let b = Replica::start("op-b", &kubeconfig, &ns);
    b.ready_as(false).await;
    let lease = Api::<Lease>::namespaced(client.clone(), common::OPERATOR_NS);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert_eq!(holder(lease.get("outbox-operator").await.unwrap()), "op-a");

    // The leader reconciles a new relay; the standby does not reconcile at all.
    let relay: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
        "metadata": {"name": "orders"},
        "spec": {"database": {"secretRef": {"name": "db", "key": "url"}}, "kafka": {"bootstrap": "127.0.0.1:1"}}
    }))
    .unwrap();
    let relays = Api::<OutboxRelay>::namespaced(client.clone(), &ns);
    relays.create(&Default::default(), &relay).await.unwrap();
    let relay_deployment = (&client, ns.as_str(), "orders-relay");
    common::wait_for_replicas(
        relay_deployment,
        2,
        "the relay's Deployment",
        Duration::from_secs(30),
    )
    .await;
    for _ in 0..4 {
        assert_eq!(b.metric("outbox_operator_reconciles_total").await, 0.0);
        assert_eq!(b.metric("outbox_operator_leader").await, 0.0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(a.metric("outbox_operator_reconciles_total").await >= 1.0);
    assert_eq!(a.metric("outbox_operator_leader").await, 1.0);

    // SIGKILL the leader and change the spec at once: the standby applies it within a lease duration + 2 s.
    a.child.kill().await.unwrap();
    let killed = Instant::now();
    let killed_at = jiff_time::Timestamp::now();
    let scale = |n: i32| {
        let relays = relays.clone();
        async move {
            relays
                .patch(
                    "orders",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": n}})),
                )
                .await
                .unwrap();
        }
    };
    scale(3).await;
    common::wait_for_replicas(
        relay_deployment,
        3,
        "the standby applies the spec change",
        LEASE_DURATION + Duration::from_secs(5),
    )
    .await;
    let took = killed.elapsed();
    println!("standby reconciled the spec change {took:?} after the leader's SIGKILL");
    assert!(
        took <= LEASE_DURATION + Duration::from_secs(2),
        "took {took:?}"
    );
    b.ready_as(true).await;
    assert_eq!(holder(lease.get("outbox-operator").await.unwrap()), "op-b");
    // Who wrote what: every Event before the kill came from op-a, every one after from op-b.
    let record = events(&client, &ns).await;
    assert!(
        record
            .iter()
            .any(|(who, why, _)| who == "op-a" && why == "Created"),
        "{record:?}"
    );
    assert!(
        record
            .iter()
            .any(|(who, why, _)| who == "op-b" && why == "Scaled"),
        "{record:?}"
    );
    for (who, why, at) in &record {
        match who.as_str() {
            "op-a" => assert!(*at < killed_at, "op-a wrote {why} after its SIGKILL"),
            "op-b" => assert!(*at >= killed_at, "op-b wrote {why} while op-a led"),
            other => panic!("an Event from {other:?}: {record:?}"),
        }
    }

    // A stopped leader (SIGTERM) hands the Lease over: the new standby leads well within a lease duration.
    let mut b = b;
    let c = Replica::start("op-c", &kubeconfig, &ns);
    c.ready_as(false).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopped = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), b.child.wait())
        .await
        .expect("op-b stopped")
        .unwrap();
    assert!(status.success(), "op-b exited {status:?}");
    c.ready_as(true).await;
    assert!(
        stopped.elapsed() < LEASE_DURATION,
        "handover after SIGTERM took {:?}",
        stopped.elapsed()
    );
    scale(4).await;
    common::wait_for_replicas(
        relay_deployment,
        4,
        "op-c reconciles",
        Duration::from_secs(10),
    )
    .await;

    // Another holder writes the Lease (a takeover this replica did not see): it stops reconciling and exits 1.
    let mut c = c;
    let mut l = lease.get("outbox-operator").await.unwrap();
    l.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    lease
        .replace("outbox-operator", &Default::default(), &l)
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), async {
        let status = c.child.wait().await.unwrap();
        let mut err = String::new();
        if let Some(mut e) = c.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            e.read_to_string(&mut err).await.unwrap();
        }
        (status, err)
    })
    .await
    .expect("op-c exited after losing the Lease");
    assert_eq!(out.0.code(), Some(1), "{}", out.1);
    assert!(out.1.contains("lost the leader Lease"), "{}", out.1);
}
