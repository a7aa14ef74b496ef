//! `make bench-autoscale`: figures for `spec.autoscaling`, each compared with its limit.
//!
//! 1. Flapping: a noisy lag series (one sample per poll for 6 hours, lag around the boundary between two
//!    replica counts with bursts) through the decision rule; scale changes against the limit of one per
//!    stabilization window.
//! 2. Reaction: the operator's controller (in process, on the test bed's real control plane, lag from an
//!    in-memory topic admin) with a 1 s poll interval; time from the lag crossing the threshold to the
//!    Deployment's new replica count, against the limit poll interval + 1 s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use operator::autoscale::{decide, Inputs};
use operator::crd::{AutoscalingSpec, ConsumerGroup};
use operator::metrics::Metrics;
use operator::plan::Defaults;
use operator::reconcile::Context;
use operator::topics::{MemoryAdmin, TopicAdmin};
use serde_json::json;

/// Scale changes over `steps` polls (15 s apart) of a deterministic pseudo-random lag series: 3,000 ± 1,500
/// with a burst to 9,000 every 47 minutes, 12 partitions, starting at 3 replicas.
fn scale_changes(spec: &AutoscalingSpec, steps: i64) -> usize {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let (mut current, mut history, mut changes) = (3, Vec::new(), 0);
    for k in 0..steps {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let noise = (x % 3_001) as i64 - 1_500;
        let burst = if (k * 15) % (47 * 60) < 120 { 6_000 } else { 0 };
        let d = decide(&Inputs {
            spec,
            lag: 3_000 + noise + burst,
            partitions: 12,
            grow_partitions: false,
            current,
            history: &history,
            now: k * 15,
        });
        if d.desired != current {
            changes += 1;
        }
        current = d.desired;
        history = d.history;
    }
    changes
}

fn flapping() -> bool {
    let spec = AutoscalingSpec {
        min_replicas: 1,
        max_replicas: 12,
        lag_per_replica: 1_000,
        activation_lag: 1,
        scale_up_stabilization_seconds: 60,
        scale_down_stabilization_seconds: 300,
        poll_interval_seconds: 15,
    };
    let steps = 6 * 3600 / 15;
    let changes = scale_changes(&spec, steps);
    let hours = 6.0;
    let limit = (hours * 3600.0 / f64::from(spec.scale_up_stabilization_seconds)) as usize;
    let no_windows = AutoscalingSpec {
        scale_up_stabilization_seconds: 0,
        scale_down_stabilization_seconds: 0,
        ..spec.clone()
    };
    let nervous = scale_changes(&no_windows, steps);
    println!(
        "flapping: {steps} samples over {hours} h (lag 3000 ± 1500, bursts to 9000): {changes} scale changes \
         with windows 60 s up / 300 s down, {nervous} without windows; limit one per 60 s window = {limit}"
    );
    changes <= limit
}

async fn reaction() -> anyhow::Result<bool> {
    let plane = common::plane();
    let admin_client = plane.client().await;
    common::install_crds(&admin_client).await;
    let ns = plane.namespace("bench-autoscale").await;
    common::put_secret(
        &admin_client,
        &ns,
        "db",
        &[("url", "postgres://outbox@db/shop")],
    )
    .await;
    let memory = Arc::new(MemoryAdmin::default());
    let m = memory.clone();
    let ctx = Arc::new(Context::with_admins(
        common::operator_client(plane).await,
        Defaults {
            relay_image: "outbox-relay:bench".into(),
        },
        Arc::new(Metrics::default()),
        Box::new(move |_, _| Ok(m.clone() as Arc<dyn TopicAdmin>)),
    ));
    let controller = tokio::spawn(operator::reconcile::run(ctx, Some(ns.clone())));
    let cg: ConsumerGroup = serde_json::from_value(json!({
        "apiVersion": "outbox.dev/v1alpha1", "kind": "ConsumerGroup",
        "metadata": {"name": "bench"},
        "spec": {"groupId": "bench", "image": "c:1", "replicas": 1,
            "kafka": {"bootstrap": "127.0.0.1:9"},
            "database": {"secretRef": {"name": "db", "key": "url"}},
            "topics": [{"name": "orders", "partitions": 12}],
            "autoscaling": {"minReplicas": 1, "maxReplicas": 12, "lagPerReplica": 100,
                "scaleDownStabilizationSeconds": 0, "pollIntervalSeconds": 1}}
    }))?;
    Api::<ConsumerGroup>::namespaced(admin_client.clone(), &ns)
        .create(&Default::default(), &cg)
        .await?;
    let deployments = Api::<Deployment>::namespaced(admin_client, &ns);
    let replicas = || async {
        deployments
            .get_opt("bench-consumer")
            .await
            .ok()
            .flatten()
            .and_then(|d| d.spec?.replicas)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while replicas().await != Some(1) {
        anyhow::ensure!(Instant::now() < deadline, "no Deployment within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut took = Vec::new();
    for (round, lag) in [(0, 500), (1, 100), (2, 900), (3, 300), (4, 1_200), (5, 100)] {
        // Let the previous decision settle and desynchronise from the poll.
        tokio::time::sleep(Duration::from_millis(1_000 + 137 * round)).await;
        memory.with(|s| s.lag.insert("bench".into(), lag));
        let want = ((lag + 99) / 100).clamp(1, 12) as i32;
        let started = Instant::now();
        while replicas().await != Some(want) {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "replicas did not reach {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        took.push(started.elapsed());
    }
    controller.abort();
    took.sort();
    let worst = *took.last().unwrap();
    let limit = Duration::from_secs(2);
    println!(
        "reaction: lag change → Deployment replicas (poll 1 s, kube-apiserver {}): median {:?}, worst {:?}; \
         limit poll + 1 s = {limit:?}",
        test_support::control_plane::KUBERNETES_VERSION,
        took[took.len() / 2],
        worst
    );
    Ok(worst <= limit)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let steady = flapping();
    let quick = reaction().await?;
    println!("autoscale_within_limits={}", steady && quick);
    anyhow::ensure!(steady && quick, "a figure is over its limit");
    Ok(())
}
