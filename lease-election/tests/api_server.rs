//! The election against a real kube-apiserver (the test bed's control plane): compare-and-swap writes,
//! and candidates over time — one leads, the other stands by; a release hands over at the next attempt; a
//! holder whose Lease someone else wrote learns it within a renew deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use lease_election::{Candidate, LeaseClient, Observer, Read, Timings, Unobserved, Write, Written};
use test_support::control_plane;
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

#[tokio::test]
async fn lease_writes_are_compare_and_swap() {
    let (client, ns) = real_client("lease-cas").await;
    let a = LeaseClient::new(client.clone(), &ns, "relay", "a", Timings::default());
    let b = LeaseClient::new(client.clone(), &ns, "relay", "b", Timings::default());
    assert_eq!(a.read().await, Read::Missing);
    let Written::Ok(rv1) = a.write(&Write::Create { transitions: 0 }).await else {
        panic!("create failed")
    };
    assert_eq!(
        b.write(&Write::Create { transitions: 0 }).await,
        Written::Conflict,
        "a second create is a conflict"
    );
    let Written::Ok(rv2) = a
        .write(&Write::Update {
            resource_version: rv1.clone(),
            transitions: 0,
            takeover: false,
        })
        .await
    else {
        panic!("renew failed")
    };
    assert_ne!(rv1, rv2);
    assert_eq!(
        b.write(&Write::Update {
            resource_version: rv1,
            transitions: 1,
            takeover: true
        })
        .await,
        Written::Conflict,
        "a write with a stale resourceVersion is refused"
    );
    let lease = Api::<Lease>::namespaced(client, &ns)
        .get("relay")
        .await
        .unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert!(spec.renew_time.is_some());
    assert!(
        spec.acquire_time.is_some(),
        "a renewal keeps the acquire time"
    );
    assert!(
        spec.renew_time > spec.acquire_time,
        "renewed after the acquisition"
    );
    // Release clears the holder only for the holder.
    b.release().await;
    assert!(matches!(b.read().await, Read::Found(r) if r.holder.as_deref() == Some("a")));
    a.release().await;
    assert!(matches!(a.read().await, Read::Found(r) if r.holder.is_none()));
}

/// Counts what the election reports.
#[derive(Default)]
struct Counts {
    leading: std::sync::atomic::AtomicI64,
    stopped: std::sync::atomic::AtomicU32,
    standby: std::sync::atomic::AtomicU32,
    writes_ok: std::sync::atomic::AtomicU32,
}

impl Observer for Counts {
    fn lease_written(&self, outcome: &'static str, _: Duration) {
        if outcome == "ok" {
            self.writes_ok
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn leading(&self, epoch: i64) {
        self.leading
            .store(epoch, std::sync::atomic::Ordering::SeqCst);
    }
    fn stopped_leading(&self) {
        self.stopped
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn standby(&self, _: &str) {
        self.standby
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_candidate_leads_the_other_stands_by_and_a_release_hands_over_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let (client, ns) = real_client("lease-candidates").await;
    let (seen_a, seen_b) = (Arc::new(Counts::default()), Arc::new(Counts::default()));
    let mut a = Candidate::new(
        LeaseClient::new(client.clone(), &ns, "op", "a", fast()),
        seen_a.clone(),
    );
    let mut b = Candidate::new(
        LeaseClient::new(client.clone(), &ns, "op", "b", fast()),
        seen_b.clone(),
    );
    let shutdown = CancellationToken::new();
    let epoch = a.acquire(&shutdown).await.expect("a leads");
    let held = a.keep(epoch);
    assert_eq!(seen_a.leading.load(SeqCst), epoch);
    // b waits well past several lease durations of a's renewals.
    let b_task = tokio::spawn(async move {
        let stop = CancellationToken::new();
        let got = tokio::time::timeout(Duration::from_secs(8), b.acquire(&stop)).await;
        (got.ok().flatten(), b)
    });
    let (got, mut b) = b_task.await.unwrap();
    assert_eq!(got, None, "b took the Lease while a renewed it");
    assert!(seen_b.standby.load(SeqCst) > 5, "b reported its standby");
    assert!(!held.lost().is_cancelled(), "a kept it");
    assert!(
        seen_a.writes_ok.load(SeqCst) >= 8,
        "a renewed every retry period"
    );
    // A release clears the holder: b takes over at its next round, not after a lease duration.
    let _a = held.release().await;
    assert_eq!(seen_a.stopped.load(SeqCst), 1);
    let started = Instant::now();
    let epoch_b = b.acquire(&shutdown).await.expect("b leads");
    assert!(
        started.elapsed() < fast().lease_duration,
        "handover took {:?}",
        started.elapsed()
    );
    assert!(epoch_b > epoch, "a new epoch per takeover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_was_taken_learns_it_within_the_renew_deadline() {
    let (client, ns) = real_client("lease-lost").await;
    let mut a = Candidate::new(
        LeaseClient::new(client.clone(), &ns, "op", "a", fast()),
        Arc::new(Unobserved),
    );
    let epoch = a.acquire(&CancellationToken::new()).await.expect("a leads");
    let held = a.keep(epoch);
    // Someone else overwrites the Lease (as a takeover after a partition would).
    let api = Api::<Lease>::namespaced(client.clone(), &ns);
    let mut lease = api.get("op").await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    api.replace("op", &Default::default(), &lease)
        .await
        .unwrap();
    let taken = Instant::now();
    tokio::time::timeout(
        fast().renew_deadline + Duration::from_secs(1),
        held.lost().cancelled(),
    )
    .await
    .expect("the keeper reported the loss");
    assert!(taken.elapsed() <= fast().renew_deadline + Duration::from_millis(500));
    // Releasing afterwards leaves the other holder alone.
    let _a = held.release().await;
    let spec = api.get("op").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("intruder"));
}
