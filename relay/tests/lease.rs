//! Lease coordination on a real kube-apiserver (the test bed's control plane): the relay's coordinator
//! with the fence, and two relay processes sharing one Lease and one PostgreSQL — SIGKILL the leader —
//! under the Role the operator creates for relays, through a ServiceAccount token.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use lease_election::{LeaseClient, Timings};
use relay::coordinator::Coordinator;
use relay::health::Health;
use relay::kube_lease::LeaseCoordinator;
use relay::metrics::Metrics;
use relay::pipeline::Abort;
use test_support::control_plane;
use test_support::kafka::mock_cluster;
use test_support::{free_port, wait_for};
use tokio_util::sync::CancellationToken;

/// An admin client and a fresh namespace on the shared control plane.
async fn real_client(prefix: &str) -> (kube::Client, String) {
    let plane = control_plane::shared();
    (plane.client().await, plane.namespace(prefix).await)
}

fn fast() -> Timings {
    Timings {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(300),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_takes_the_epoch_above_a_fence_that_is_ahead_and_a_standby_waits() {
    let db = migrated_db().await;
    let store = relay::store::Store::new(outbox::SchemaName::default());
    // A fence left at epoch 7 (e.g. by single mode before): the Lease epoch must go above it.
    store
        .take_fence(&db.pool, "default", "old", Some(7), Duration::from_secs(5))
        .await
        .unwrap();
    let (client, ns) = real_client("lease-fence").await;
    let coordinator = |name: &str| {
        LeaseCoordinator::new(
            LeaseClient::new(client.clone(), &ns, "relay", name, fast()),
            db.pool.clone(),
            store.clone(),
            "default".into(),
            Arc::new(Health::default()),
            Arc::new(Metrics::new()),
        )
    };
    let shutdown = CancellationToken::new();
    let mut a = coordinator("a");
    let lead = tokio::time::timeout(Duration::from_secs(20), a.acquire(&shutdown))
        .await
        .expect("acquires")
        .unwrap()
        .unwrap();
    assert_eq!(lead.epoch, Some(8), "first epoch above the fence");
    assert_eq!(
        store.fence_epoch(&db.pool, "default").await.unwrap(),
        Some(8)
    );

    let mut b = coordinator("b");
    let standby = tokio::time::timeout(Duration::from_secs(2), b.acquire(&shutdown)).await;
    assert!(standby.is_err(), "b waits while a renews");

    a.release().await;
    // Released, not expired: b takes it at its next attempt, well before a 3 s lease duration could pass.
    let lead_b = tokio::time::timeout(Duration::from_secs(2), b.acquire(&shutdown))
        .await
        .expect("b acquires at its next attempt after a released")
        .unwrap()
        .unwrap();
    assert_eq!(lead_b.epoch, Some(9));
    assert!(!lead_b.lost.is_cancelled());
    b.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lease_relays_sigkill_the_leader_the_standby_publishes_after_expiry_and_the_fence_rejects_the_old_epoch(
) {
    let db = migrated_db().await;
    let mock = mock_cluster(1, &[(TOPIC, 4)]);
    let (admin, ns) = real_client("lease-failover").await;
    let access = relays_service_account(&admin, &ns, "orders").await;
    let kubeconfig = access.kubeconfig.to_str().unwrap().to_owned();
    // The relays find their namespace in the token's kubeconfig, as in a pod (POD_NAMESPACE there).
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let lease_args = |id: &'static str| {
        vec![
            "--coordination",
            "lease",
            "--lease-name",
            "orders-relay",
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "250ms",
            "--instance-id",
            id,
        ]
    };
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn_binary_with_env(
        &db.url,
        &mock.bootstrap_servers(),
        port_a,
        &lease_args("relay-a"),
        &env,
    );
    wait_for("relay A leading", Duration::from_secs(30), || async {
        http_get(port_a, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let mut b = spawn_binary_with_env(
        &db.url,
        &mock.bootstrap_servers(),
        port_b,
        &lease_args("relay-b"),
        &env,
    );
    let (_, body) = wait_for("relay B standing by", Duration::from_secs(30), || async {
        http_get(port_b, "/readyz")
            .await
            .filter(|(s, b)| *s == 503 && b.contains("held by relay-a"))
    })
    .await;
    assert!(body.contains("standby"), "{body}");
    let (_, m) = http_get(port_a, "/metrics").await.unwrap();
    assert_eq!(metric(&m, "outbox_relay_lease_is_leader"), 1.0);
    let old_epoch = metric(&m, "outbox_relay_lease_transitions") as i64;
    assert!(metric(&m, "outbox_relay_lease_write_seconds_count") >= 1.0);

    // Events flow while A leads; SIGKILL A mid-stream.
    insert_events(&db.pool, 20, 3_000, 0).await;
    wait_for("A mid-stream", Duration::from_secs(30), || async {
        (count(&db.pool, "outbox.events").await < 3_000).then_some(())
    })
    .await;
    sigkill(&mut a);
    let killed = Instant::now();
    insert_events(&db.pool, 20, 1_000, 1_000).await;
    let took_over = wait_for("B to lead", Duration::from_secs(30), || async {
        let (_, m) = http_get(port_b, "/metrics").await?;
        (metric(&m, "outbox_relay_lease_is_leader") == 1.0).then(|| killed.elapsed())
    })
    .await;
    wait_for("B to drain the outbox", Duration::from_secs(60), || async {
        (count(&db.pool, "outbox.events").await == 0).then_some(())
    })
    .await;
    println!(
        "lease failover (lease 3s, renew deadline 2s, retry 250ms): B leads {took_over:?} after SIGKILL of A"
    );
    // A renewed at most one retry period (250 ms) before the kill; B may take over only a full lease
    // duration (3 s) after it saw that renewal: not before 2.75 s after the kill.
    assert!(
        took_over >= Duration::from_millis(2_750),
        "B waited a full lease duration of its own observation ({took_over:?})"
    );

    let lease = Api::<Lease>::namespaced(admin.clone(), &ns)
        .get("orders-relay")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("relay-b"));
    let new_epoch = i64::from(lease.lease_transitions.unwrap());
    assert!(new_epoch > old_epoch, "{new_epoch} > {old_epoch}");
    let store = relay::store::Store::new(outbox::SchemaName::default());
    assert_eq!(
        store.fence_epoch(&db.pool, "default").await.unwrap(),
        Some(new_epoch),
        "B wrote its epoch to the fence"
    );

    // A deposed leader that resumes with the old epoch cannot commit a batch. B is stopped first so the
    // event given to the old epoch cannot be published by B meanwhile (the ledger stays exact).
    sigkill(&mut b);
    insert_events(&db.pool, 1, 1, 9_000).await;
    let old = in_process(&db.pool, config(), kafka(mock.bootstrap_servers()));
    match old.relay.run_batch(Some(old_epoch)).await {
        Err(Abort::Fenced(f)) => println!("old epoch refused: {f}"),
        other => panic!("old epoch must be fenced, got {other:?}"),
    }
    assert_eq!(
        count(&db.pool, "outbox.events").await,
        1,
        "the fenced batch left its event pending"
    );

    let ledger = check_order(&read(&mock.bootstrap_servers(), TOPIC));
    assert_eq!(ledger.distinct, 4_000, "nothing lost across the failover");
}

/// What the operator creates for OutboxRelay `name` — the CR itself, its ServiceAccount, Role and
/// RoleBinding — applied to `ns`, and a token for that ServiceAccount: the relays run with exactly the
/// rights the operator gives them.
async fn relays_service_account(
    admin: &kube::Client,
    ns: &str,
    name: &str,
) -> control_plane::ServiceAccountAccess {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::{Patch, PatchParams};
    use operator::crd::OutboxRelay;
    use serde_json::json;

    install_relay_crd(admin).await;
    let mut cr: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"database": {"secretRef": {"name": "orders-db", "key": "url"}}, "kafka": {"bootstrap": "kafka:9092"}},
    }))
    .unwrap();
    let ssa = PatchParams::apply("relay-tests").force();
    cr = Api::<OutboxRelay>::namespaced(admin.clone(), ns)
        .patch(name, &ssa, &Patch::Apply(&cr))
        .await
        .unwrap();
    let children = operator::plan::desired_relay(
        &cr,
        &operator::plan::Defaults {
            relay_image: "outbox-relay:test".into(),
        },
    )
    .unwrap();
    let sa_name = children.service_account.metadata.name.clone().unwrap();
    let role_name = children.role.metadata.name.clone().unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .patch(&role_name, &ssa, &Patch::Apply(&children.role))
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .patch(&role_name, &ssa, &Patch::Apply(&children.role_binding))
        .await
        .unwrap();
    control_plane::shared()
        .service_account(ns, &sa_name)
        .await
        .unwrap()
}

/// Applies the generated OutboxRelay CRD (`crds/`) and waits until it is Established.
async fn install_relay_crd(admin: &kube::Client) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/outboxrelays.outbox.dev.yaml");
    control_plane::install_crd_yaml(admin, &std::fs::read_to_string(path).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn lease_timings_that_do_not_nest_exit_2_naming_the_flags() {
    let mut child = spawn_binary(
        "postgres://127.0.0.1:1/none",
        "127.0.0.1:1",
        free_port(),
        &[
            "--coordination",
            "lease",
            "--lease-duration",
            "5s",
            "--renew-deadline",
            "5s",
        ],
    );
    let status = child.wait().unwrap();
    let err = stderr_of(&mut child);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--lease-duration") && err.contains("must exceed the renew deadline"),
        "{err}"
    );
}

#[tokio::test]
async fn the_leaders_status_report_sets_its_two_fields_and_leaves_the_operators_alone() {
    use kube::api::{Patch, PatchParams};
    use operator::crd::OutboxRelay;
    let (admin, ns) = real_client("status-report").await;
    // Under the relay's own Role, as in a pod.
    let access = relays_service_account(&admin, &ns, "orders").await;
    let client = control_plane::client_from(&access.kubeconfig)
        .await
        .unwrap();
    let typed: Api<OutboxRelay> = Api::namespaced(admin.clone(), &ns);
    let conditions = serde_json::json!([{"type": "Ready", "status": "True", "reason": "Published",
        "message": "", "lastTransitionTime": "2026-12-01T00:00:00Z"}]);
    typed
        .patch_status(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"conditions": conditions,
                "leader": "relay-b", "leaseTransitions": 3}})),
        )
        .await
        .unwrap();
    let metrics = Metrics::new();
    metrics.pending.set(42);
    metrics.oldest_pending_age_seconds.set(3.5);
    metrics.lease_transitions.set(7);
    relay::status::report(&relay::status::api(client.clone(), &ns), "orders", &metrics)
        .await
        .unwrap();
    let status = typed.get("orders").await.unwrap().status.unwrap();
    assert_eq!(status.backlog, Some(42));
    assert_eq!(status.oldest_pending_age_seconds, Some(3.5));
    // One writer per field: the leader and epoch stay what the operator read from the Lease.
    assert_eq!(status.leader.as_deref(), Some("relay-b"));
    assert_eq!(status.lease_transitions, Some(3));
    assert_eq!(
        serde_json::to_value(&status.conditions).unwrap(),
        conditions,
        "the operator's conditions stay"
    );
    // The Role names this relay's resource only: another OutboxRelay's status is refused.
    match relay::status::report(&relay::status::api(client, &ns), "payments", &metrics).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("another relay's status must be forbidden, got {other:?}"),
    }
}
