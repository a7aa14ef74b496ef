//! The reconcilers: plan (pure, [`crate::plan`], [`crate::topics`]) → server-side apply of the owned
//! objects under one field manager → topics through [`TopicAdmin`] → status with kstatus conditions.
//!
//! This module holds the context, the error, the per-object instrumentation and the controllers' wiring;
//! `apply` the server-side apply and status writes, `secrets` the Secret reads, `relay` and `consumer` the
//! two reconcilers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use contract::status::{GroupByOperator, RelayByOperator, Verdict};

use crate::conditions::{self, Outcome};
use crate::connection::{self, SecretData, SecretUse};
use crate::crd::{ConsumerGroup, DeletionPolicy, KafkaSpec, OutboxRelay};
use crate::metrics::{Backoff, FailureLabel, KindLabel, Metrics, ResourceLabel};
use crate::plan::{self, Defaults, FIELD_MANAGER};
use crate::topics::{plan_topics, AdminError, KafkaAdmin, TopicAdmin};

mod apply;
mod consumer;
mod relay;
mod secrets;

use apply::*;
pub use consumer::*;
pub use relay::*;
pub use secrets::*;

/// A namespaced object `Api<K>` can read and write.
pub trait Namespaced:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Namespaced for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
{
}

/// Finalizer of ConsumerGroups with `deletionPolicy: Delete` topics.
pub const TOPIC_FINALIZER: &str = "outbox.dev/delete-topics";

/// Why a reconcile failed (requeued with backoff, counted by reason).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The broker refused or failed.
    #[error("Kafka: {0}")]
    Kafka(#[from] AdminError),
    /// A referenced Secret is missing or unusable.
    #[error("{0}")]
    Secret(String),
    /// The spec cannot be acted on (the message names the field).
    #[error("{0}")]
    Spec(#[from] plan::SpecError),
}

impl Error {
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Kafka(_) => "KafkaError",
            Error::Secret(_) => "SecretError",
            Error::Spec(_) => "InvalidSpec",
        }
    }
}

/// Makes a [`TopicAdmin`] for a bootstrap and librdkafka properties.
pub type AdminFactory =
    dyn Fn(&str, &[(String, String)]) -> Result<Arc<dyn TopicAdmin>, AdminError> + Send + Sync;

/// What the reconcilers share.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// Operator-wide defaults (images).
    pub defaults: Defaults,
    /// Topic admin per Kafka cluster.
    pub admins: Box<AdminFactory>,
    /// Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-object error backoff.
    pub backoff: Backoff,
    /// Requeue after a success (status refresh; the promise is "at most 30 s old"). Also how soon a
    /// rotated Secret rolls the pods: Secrets are not watched (see [`secret_hash`]).
    pub refresh: Duration,
    /// The namespace the operator watches (`None`: all), where other ConsumerGroups may share a topic.
    pub namespace: Option<String>,
}

impl Context {
    /// A context whose topic admins are librdkafka AdminClients, cached per cluster.
    pub fn new(client: kube::Client, defaults: Defaults, metrics: Arc<Metrics>) -> Self {
        let cache: Mutex<HashMap<String, Arc<dyn TopicAdmin>>> = Mutex::default();
        let admins = move |bootstrap: &str, props: &[(String, String)]| {
            let key = format!("{bootstrap}|{props:?}");
            let mut c = cache.lock().unwrap();
            if let Some(a) = c.get(&key) {
                return Ok(a.clone());
            }
            let a: Arc<dyn TopicAdmin> = Arc::new(KafkaAdmin::new(bootstrap, props)?);
            c.insert(key, a.clone());
            Ok(a)
        };
        Self::with_admins(client, defaults, metrics, Box::new(admins))
    }

    /// A context with the given topic admin factory (tests pass an in-memory one).
    pub fn with_admins(
        client: kube::Client,
        defaults: Defaults,
        metrics: Arc<Metrics>,
        admins: Box<AdminFactory>,
    ) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            admins,
            metrics,
            backoff: Backoff::default(),
            refresh: Duration::from_secs(30),
            namespace: None,
        }
    }

    /// Writes Events naming `instance` as their reporting instance (the replica's identity in the leader
    /// Lease), instead of `POD_NAME`.
    pub fn reporting_as(mut self, instance: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(instance.into()),
        };
        self.recorder = Recorder::new(self.client.clone(), reporter);
        self
    }

    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An event that cannot be written must not fail the reconcile.
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!("cannot publish event {reason}: {e}");
        }
    }
}

pub(super) fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Runs `f`, counting it, timing it and keeping the per-object backoff.
pub(super) async fn instrumented<K, F>(obj: &K, ctx: &Context, f: F) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
    F: std::future::Future<Output = Result<Action, Error>>,
{
    let kind = KindLabel {
        kind: K::kind(&()).into_owned(),
    };
    let started = Instant::now();
    let result = f.await;
    ctx.metrics.reconciles.get_or_create(&kind).inc();
    ctx.metrics
        .duration
        .get_or_create(&kind)
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => ctx.backoff.succeeded(&key(obj)),
        Err(e) => {
            ctx.metrics
                .failures
                .get_or_create(&FailureLabel {
                    kind: kind.kind,
                    reason: e.reason().into(),
                })
                .inc();
        }
    }
    result
}

/// Requeue after a failure: exponential per object, reset by the next success.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    let delay = ctx.backoff.failed(&key(obj.as_ref()));
    tracing::warn!(object = %key(obj.as_ref()), "reconcile failed: {err}; retrying in {delay:?}");
    Action::requeue(delay)
}

pub(super) fn rollout(dep: &Deployment, want: i32) -> Outcome {
    let ready = dep
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    if ready >= want {
        Outcome::Ready
    } else {
        Outcome::Progressing {
            message: format!("{ready}/{want} pods ready"),
        }
    }
}

pub(super) fn previous_conditions(status: Option<&[Condition]>) -> Vec<Condition> {
    status.map(|c| c.to_vec()).unwrap_or_default()
}

/// A request the API server refused for want of RBAC rights cannot succeed on retry: it becomes
/// `Ready=False`/`Stalled=True` with reason `Forbidden` and the server's message (which names the verb,
/// resource and namespace), and a Warning event — so a role that lacks a verb shows on the resource.
pub(super) async fn surface_forbidden<K: Namespaced>(
    obj: &K,
    previous: Option<&[Condition]>,
    ctx: &Context,
    err: &Error,
) {
    let Error::Kube(kube::Error::Api(status)) = err else {
        return;
    };
    if status.code != 403 {
        return;
    }
    let outcome = Outcome::Stalled {
        reason: "Forbidden".into(),
        message: status.message.clone(),
    };
    let c = conditions::compute(
        &previous_conditions(previous),
        &outcome,
        obj.meta().generation,
        Timestamp::now(),
    );
    // Best effort: the status itself may be what is forbidden; the event and the log still say it.
    if let Err(e) = patch_status(ctx, obj, &verdict(c, None)).await {
        tracing::warn!("cannot write the Forbidden condition: {e}");
    }
    ctx.event(obj, true, "Forbidden", status.message.clone())
        .await;
}

pub(super) async fn stalled<K: Namespaced>(
    ctx: &Context,
    cg: &K,
    previous: &[Condition],
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let h = Outcome::Stalled {
        reason: reason.into(),
        message,
    };
    let generation = cg.meta().generation;
    let c = conditions::compute(previous, &h, generation, Timestamp::now());
    patch_status(ctx, cg, &verdict(c, generation)).await?;
    Ok(())
}

/// The operator's conditions for `generation` (`None` leaves the recorded generation as it is).
pub(super) fn verdict(conditions: Vec<Condition>, generation: Option<i64>) -> Verdict {
    Verdict {
        conditions,
        observed_generation: generation,
    }
}

/// Runs both controllers until SIGTERM/SIGINT. `namespace`: watch one namespace, or all.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    use futures::StreamExt;
    use kube::runtime::{watcher, Controller};
    fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: Namespaced,
    {
        match ns {
            Some(n) => Api::namespaced(client.clone(), n),
            None => Api::all(client.clone()),
        }
    }
    let c = &ctx.client;
    let cfg = watcher::Config::default;
    // Children carry the managed-by label (plan::labels): watching only those keeps the cache to the
    // operator's own objects instead of every Deployment, Service, Role, ... of the cluster. A child whose
    // label someone removed is still repaired by the periodic reconcile, which applies it again.
    let owned = || cfg().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    let relays = Controller::new(api::<OutboxRelay>(c, &namespace), cfg())
        .owns(api::<Deployment>(c, &namespace), owned())
        .owns(api::<Service>(c, &namespace), owned())
        .owns(api::<ServiceAccount>(c, &namespace), owned())
        .owns(api::<Role>(c, &namespace), owned())
        .owns(api::<RoleBinding>(c, &namespace), owned())
        .owns(api::<PodDisruptionBudget>(c, &namespace), owned())
        .shutdown_on_signal()
        .run(reconcile_relay, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let groups = Controller::new(api::<ConsumerGroup>(c, &namespace), cfg())
        .owns(api::<Deployment>(c, &namespace), owned())
        .owns(api::<Service>(c, &namespace), owned())
        .owns(api::<PodDisruptionBudget>(c, &namespace), owned())
        .shutdown_on_signal()
        .run(reconcile_consumer, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let sweeper = tokio::spawn(sweep_state_metrics(ctx.clone(), namespace.clone()));
    futures::join!(relays, groups);
    sweeper.abort();
}

/// Drops the per-resource metrics of resources that no longer exist, every minute: deleted objects are
/// never reconciled again, and a stale `resource_ready 0` would keep an alert firing.
pub(super) async fn sweep_state_metrics(ctx: Arc<Context>, namespace: Option<String>) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let relays = match &namespace {
            Some(n) => Api::<OutboxRelay>::namespaced(ctx.client.clone(), n),
            None => Api::<OutboxRelay>::all(ctx.client.clone()),
        }
        .list(&Default::default())
        .await;
        let groups = match &namespace {
            Some(n) => Api::<ConsumerGroup>::namespaced(ctx.client.clone(), n),
            None => Api::<ConsumerGroup>::all(ctx.client.clone()),
        }
        .list(&Default::default())
        .await;
        let (Ok(relays), Ok(groups)) = (relays, groups) else {
            continue;
        };
        let live: Vec<ResourceLabel> = relays
            .items
            .iter()
            .map(ResourceLabel::of)
            .chain(groups.items.iter().map(ResourceLabel::of))
            .collect();
        ctx.metrics.retain_resources(&live);
    }
}
