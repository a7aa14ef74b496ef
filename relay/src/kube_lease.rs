//! `--coordination lease`: the relay's side of [`lease_election`]. The election (rules, Lease IO, keeper)
//! is that crate's; this adapter adds what only the relay needs: the fence write on acquisition (the
//! Lease's epoch goes to `outbox.fence`, so a deposed holder cannot commit), the relay's role for
//! `/readyz`, and its Lease metrics.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lease_election::{Candidate, Held, LeaseClient, Observer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::coordinator::{Coordinator, Leadership};
use crate::health::{Health, Role};
use crate::metrics::{Metrics, Reason};
use crate::store::Store;

/// Relay metrics and role from the election's reports.
struct RelayObserver {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl Observer for RelayObserver {
    fn lease_written(&self, outcome: &'static str, took: Duration) {
        self.metrics
            .lease_write_seconds
            .get_or_create(&Reason::of(outcome))
            .observe(took.as_secs_f64());
    }

    fn leading(&self, epoch: i64) {
        self.metrics.is_leader.set(1);
        self.metrics.lease_transitions.set(epoch);
    }

    fn stopped_leading(&self) {
        self.metrics.is_leader.set(0);
    }

    fn standby(&self, why: &str) {
        self.health.set_role(Role::Standby(why.to_owned()));
    }
}

/// The Kubernetes Lease coordinator: one publisher per Lease, standbys take over after a full lease
/// duration without renewal, and the fencing epoch is the Lease's `leaseTransitions`.
pub struct LeaseCoordinator {
    /// Present while standing; taken by the keeper while leading.
    candidate: Option<Candidate>,
    held: Option<Held>,
    pool: PgPool,
    store: Store,
    scope: String,
}

impl LeaseCoordinator {
    /// A candidate for `client`'s Lease that fences `scope` in `store`'s schema.
    pub fn new(
        client: LeaseClient,
        pool: PgPool,
        store: Store,
        scope: String,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let observer = Arc::new(RelayObserver { health, metrics });
        Self {
            candidate: Some(Candidate::new(client, observer)),
            held: None,
            pool,
            store,
            scope,
        }
    }
}

/// Writes the epoch to the fence. `false` when the fence is already at or beyond it: this epoch is stale
/// (or the Lease was recreated), so the next acquisition must take an epoch above the fence.
async fn take_fence(
    store: &Store,
    pool: &PgPool,
    scope: &str,
    candidate: &mut Candidate,
    epoch: i64,
) -> anyhow::Result<bool> {
    // Waits for the row at most a renew deadline: the Lease is renewed between tries, so a paused old
    // holder's open transaction (which share-locks the row) delays the takeover but cannot lose it.
    let wait = candidate.client().timings().renew_deadline;
    let identity = candidate.client().identity().to_owned();
    if store
        .take_fence(pool, scope, &identity, Some(epoch), wait)
        .await?
        .is_some()
    {
        return Ok(true);
    }
    let current = store.fence_epoch(pool, scope).await?;
    tracing::warn!(
        epoch,
        fence = current,
        "the fence is ahead of the Lease epoch; taking the Lease again above it"
    );
    let elector = candidate.elector_mut();
    elector.step_down();
    elector.raise_epoch_floor(current.unwrap_or(epoch));
    Ok(false)
}

impl Coordinator for LeaseCoordinator {
    fn acquire<'a>(
        &'a mut self,
        shutdown: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Option<Leadership>>> {
        Box::pin(async move {
            // Cancellation-safe: the candidate stays in `self` until the keeper takes it.
            loop {
                let candidate = self
                    .candidate
                    .as_mut()
                    .expect("released before acquiring again");
                let Some(epoch) = candidate.acquire(shutdown).await else {
                    return Ok(None);
                };
                let retry = candidate.client().timings().retry_period;
                match take_fence(&self.store, &self.pool, &self.scope, candidate, epoch).await {
                    // The fence wait outlasted the renew deadline: renew (or take over again with a new
                    // epoch) in the next round before publishing.
                    Ok(true) if candidate.may_lead().is_none() => {
                        tracing::info!(
                            epoch,
                            "took the fence after the renew deadline; renewing first"
                        );
                    }
                    Ok(true) => {
                        tracing::info!(epoch, lease = %candidate.client().name(), "acquired the Lease; publishing");
                        let held = self.candidate.take().expect("present").keep(epoch);
                        let lost = held.lost();
                        self.held = Some(held);
                        return Ok(Some(Leadership {
                            epoch: Some(epoch),
                            lost,
                        }));
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!("cannot write the fence (retrying): {e:#}");
                        candidate.elector_mut().step_down();
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(None),
                            _ = tokio::time::sleep(retry) => {}
                        }
                    }
                }
            }
        })
    }

    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Only now: the publish loop has stopped before `release` is called.
            if let Some(held) = self.held.take() {
                self.candidate = Some(held.release().await);
            }
        })
    }
}
