//! `--coordination lease`: the IO around [`crate::lease::Elector`]. Reads and compare-and-swap writes of a
//! `coordination.k8s.io/v1` Lease, the fence write on acquisition, and a keeper task that renews every
//! retry period and fires `lost` the instant the renew deadline passes, whatever the API server does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::coordinator::{Coordinator, Leadership};
use crate::health::{Health, Role};
use crate::lease::{Elector, LeaseRecord, Read, Step, Timings, Write, Written};
use crate::metrics::{Metrics, Reason};
use crate::store::Store;

/// Reads and writes one Lease object for one candidate.
#[derive(Clone)]
pub struct LeaseClient {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    /// When this candidate last took the Lease over: a replace sends the whole object, so renewals carry
    /// it along (as client-go does) instead of clearing it.
    acquired: Arc<std::sync::Mutex<Option<MicroTime>>>,
}

impl LeaseClient {
    /// The Lease `name` in `namespace`, written as `identity`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: impl Into<String>,
        identity: impl Into<String>,
        timings: Timings,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timings,
            acquired: Arc::default(),
        }
    }

    /// Every call is bounded: a hung API server must not hold the keeper past the renew deadline.
    fn call_timeout(&self) -> Duration {
        self.timings.retry_period
    }

    /// The Lease as the election sees it.
    pub async fn read(&self) -> Read {
        match tokio::time::timeout(self.call_timeout(), self.api.get_opt(&self.name)).await {
            Err(_) => Read::Error("timed out".into()),
            Ok(Err(e)) => Read::Error(e.to_string()),
            Ok(Ok(None)) => Read::Missing,
            Ok(Ok(Some(lease))) => {
                let spec = lease.spec.unwrap_or_default();
                Read::Found(LeaseRecord {
                    holder: spec.holder_identity,
                    transitions: spec.lease_transitions.unwrap_or(0).into(),
                    resource_version: lease.metadata.resource_version.unwrap_or_default(),
                })
            }
        }
    }

    /// Sends `write`: a create, or a replace carrying the expected `resourceVersion` (compare-and-swap).
    pub async fn write(&self, write: &Write) -> Written {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let (resource_version, transitions, takeover) = match write {
            Write::Create { transitions } => (None, *transitions, true),
            Write::Update {
                resource_version,
                transitions,
                takeover,
            } => (Some(resource_version.clone()), *transitions, *takeover),
        };
        let Ok(transitions) = i32::try_from(transitions) else {
            return Written::Error(format!("epoch {transitions} does not fit leaseTransitions"));
        };
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: resource_version.clone(),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.timings.lease_duration.as_secs() as i32),
                lease_transitions: Some(transitions),
                renew_time: Some(now.clone()),
                acquire_time: if takeover {
                    Some(now.clone())
                } else {
                    self.acquired.lock().unwrap().clone()
                },
                ..Default::default()
            }),
        };
        let pp = PostParams::default();
        let call = async {
            match resource_version {
                None => self.api.create(&pp, &lease).await,
                Some(_) => self.api.replace(&self.name, &pp, &lease).await,
            }
        };
        match tokio::time::timeout(self.call_timeout(), call).await {
            Err(_) => Written::Error("timed out".into()),
            Ok(Ok(l)) => {
                if takeover {
                    *self.acquired.lock().unwrap() = Some(now);
                }
                Written::Ok(l.metadata.resource_version.unwrap_or_default())
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => Written::Conflict,
            Ok(Err(e)) => Written::Error(e.to_string()),
        }
    }

    /// Clears the holder if it is still this candidate (compare-and-swap; errors are only logged: an
    /// unreleased Lease just expires).
    pub async fn release(&self) {
        let Read::Found(rec) = self.read().await else {
            return;
        };
        if rec.holder.as_deref() != Some(&self.identity) {
            return;
        }
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: Some(rec.resource_version),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                lease_transitions: i32::try_from(rec.transitions).ok(),
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                ..Default::default()
            }),
        };
        let pp = PostParams::default();
        let call = self.api.replace(&self.name, &pp, &lease);
        match tokio::time::timeout(self.call_timeout(), call).await {
            Ok(Ok(_)) => tracing::info!("released Lease `{}`", self.name),
            Ok(Err(e)) => tracing::warn!("could not release Lease `{}`: {e}", self.name),
            Err(_) => tracing::warn!("could not release Lease `{}`: timed out", self.name),
        }
    }
}

/// One election round: read, decide, write. Returns why it waits, if it does.
async fn round(client: &LeaseClient, elector: &mut Elector, metrics: &Metrics) -> Option<String> {
    let read = client.read().await;
    match elector.observe(Instant::now(), &read) {
        Step::Wait(why) => Some(why),
        Step::Write(w) => {
            let started = Instant::now();
            let result = client.write(&w).await;
            let label = match &result {
                Written::Ok(_) => "ok",
                Written::Conflict => "conflict",
                Written::Error(e) => {
                    tracing::warn!("Lease write failed: {e}");
                    "error"
                }
            };
            metrics
                .lease_write_seconds
                .get_or_create(&Reason::of(label))
                .observe(started.elapsed().as_secs_f64());
            elector.written(&result);
            None
        }
    }
}

/// The Kubernetes Lease coordinator: one publisher per Lease, standbys take over after a full lease
/// duration without renewal, and the fencing epoch is the Lease's `leaseTransitions`.
pub struct LeaseCoordinator {
    client: LeaseClient,
    elector: Option<Elector>,
    pool: PgPool,
    store: Store,
    scope: String,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    held: Option<(CancellationToken, tokio::task::JoinHandle<Elector>)>,
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
        Self {
            elector: Some(Elector::new(client.identity.clone(), client.timings)),
            client,
            pool,
            store,
            scope,
            health,
            metrics,
            held: None,
        }
    }
}

/// Writes the epoch to the fence. `false` when the fence is already at or beyond it: this epoch is stale
/// (or the Lease was recreated), so the next acquisition must take an epoch above the fence.
async fn take_fence(
    store: &Store,
    pool: &PgPool,
    scope: &str,
    identity: &str,
    elector: &mut Elector,
    epoch: i64,
) -> anyhow::Result<bool> {
    // Waits for the row at most a renew deadline: the Lease is renewed between tries, so a paused old
    // holder's open transaction (which share-locks the row) delays the takeover but cannot lose it.
    let wait = elector.timings().renew_deadline;
    if store
        .take_fence(pool, scope, identity, Some(epoch), wait)
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
            // Cancellation-safe: the elector stays in `self` until the keeper takes it.
            let Self {
                client,
                elector: slot,
                pool,
                store,
                scope,
                health,
                metrics,
                held,
            } = self;
            let retry = client.timings.retry_period;
            let mut announced = None;
            loop {
                if shutdown.is_cancelled() {
                    return Ok(None);
                }
                let elector = slot.as_mut().expect("released before acquiring again");
                let waiting = round(client, elector, metrics).await;
                if let Some(epoch) = elector.may_publish(Instant::now()) {
                    match take_fence(store, pool, scope, &client.identity, elector, epoch).await {
                        // The fence wait outlasted the renew deadline: renew (or take over again with
                        // a new epoch) in the next round before publishing.
                        Ok(true) if elector.may_publish(Instant::now()).is_none() => {
                            tracing::info!(
                                epoch,
                                "took the fence after the renew deadline; renewing first"
                            );
                        }
                        Ok(true) => {
                            tracing::info!(epoch, lease = %client.name, "acquired the Lease; publishing");
                            metrics.is_leader.set(1);
                            metrics.lease_transitions.set(epoch);
                            let lost = CancellationToken::new();
                            let stop = CancellationToken::new();
                            let keeper = tokio::spawn(keep(
                                client.clone(),
                                slot.take().expect("present"),
                                metrics.clone(),
                                lost.clone(),
                                stop.clone(),
                            ));
                            *held = Some((stop, keeper));
                            return Ok(Some(Leadership {
                                epoch: Some(epoch),
                                lost,
                            }));
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!("cannot write the fence (retrying): {e:#}");
                            elector.step_down();
                        }
                    }
                }
                let why = waiting.unwrap_or_else(|| "acquiring the Lease".into());
                // The "unchanged for" counter changes every round: log only a new reason.
                let reason = why.split(" (").next().unwrap_or_default().to_owned();
                if announced.as_ref() != Some(&reason) {
                    tracing::info!("standby: {why}");
                    announced = Some(reason);
                }
                health.set_role(Role::Standby(why));
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        })
    }

    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some((stop, keeper)) = self.held.take() {
                stop.cancel();
                let mut elector = match keeper.await {
                    Ok(e) => e,
                    Err(_) => Elector::new(self.client.identity.clone(), self.client.timings),
                };
                elector.step_down();
                self.metrics.is_leader.set(0);
                // Only now: the publish loop has stopped before `release` is called.
                self.client.release().await;
                self.elector = Some(elector);
            }
        })
    }
}

/// Renews every retry period; fires `lost` when the renew deadline passes without a successful renewal
/// or a write conflicts. Returns the elector when stopped.
async fn keep(
    client: LeaseClient,
    mut elector: Elector,
    metrics: Arc<Metrics>,
    lost: CancellationToken,
    stop: CancellationToken,
) -> Elector {
    let retry = client.timings.retry_period;
    loop {
        let Some(deadline) = elector.publish_deadline() else {
            tracing::error!(lease = %client.name, "lost the Lease (another holder wrote it); stopping publishing");
            break;
        };
        if elector.may_publish(Instant::now()).is_none() {
            tracing::error!(lease = %client.name, "renew deadline passed; stopping publishing");
            break;
        }
        let stopped = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep_until(deadline.into()) => false,
            _ = async {
                tokio::time::sleep(retry).await;
                round(&client, &mut elector, &metrics).await;
            } => false,
        };
        if stopped {
            return elector;
        }
    }
    metrics.is_leader.set(0);
    lost.cancel();
    stop.cancelled().await;
    elector
}
