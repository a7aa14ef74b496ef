//! The leader's report into its `OutboxRelay` status: backlog and oldest pending age, which only the relay
//! knows. A JSON merge patch of the status subresource touches only these two fields: every other status
//! field has one writer, the operator (which also reads `leader` and `leaseTransitions` from the Lease;
//! `contract::status`).

use std::sync::Arc;
use std::time::Duration;

use contract::crd::OutboxRelay;
use kube::api::{Patch, PatchParams};
use kube::Api;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the leader reports (the operator promises at most 30 s old figures).
pub const REPORT_EVERY: Duration = Duration::from_secs(15);

/// The status fields this relay reports, from its metrics: a merge patch of the relay's own fields
/// ([`contract::status::RelayByRelay`]), so the operator's stay untouched.
pub fn status_patch(metrics: &Metrics) -> serde_json::Value {
    contract::status::merge_patch(&contract::status::RelayByRelay {
        backlog: metrics.pending.get(),
        oldest_pending_age_seconds: metrics.oldest_pending_age_seconds.get(),
    })
}

/// The `OutboxRelay` API in `namespace`.
pub fn api(client: kube::Client, namespace: &str) -> Api<OutboxRelay> {
    Api::namespaced(client, namespace)
}

/// One report: a JSON merge patch of the status subresource (the operator's conditions stay untouched).
pub async fn report(
    api: &Api<OutboxRelay>,
    name: &str,
    metrics: &Metrics,
) -> Result<(), kube::Error> {
    let patch = status_patch(metrics);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Patches the status of OutboxRelay `name` every [`REPORT_EVERY`] while this relay leads.
pub fn spawn_reporter(
    client: kube::Client,
    namespace: &str,
    name: String,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let api = self::api(client, namespace);
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REPORT_EVERY) => {}
            }
            if metrics.is_leader.get() != 1 {
                continue;
            }
            match report(&api, &name, &metrics).await {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    tracing::warn!("cannot report to OutboxRelay `{name}` status: {e}");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    });
}
