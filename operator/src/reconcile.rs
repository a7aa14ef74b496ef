//! The reconcilers: plan (pure, [`crate::plan`], [`crate::topics`]) → server-side apply of the owned
//! objects under one field manager → topics through [`TopicAdmin`] → status with kstatus conditions.

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

use crate::conditions::{self, Health};
use crate::connection::{self, SecretData, SecretUse};
use crate::crd::{ConsumerGroup, DeletionPolicy, KafkaSpec, OutboxRelay};
use crate::metrics::{Backoff, FailureLabel, KindLabel, Metrics, ResourceLabel};
use crate::plan::{self, Defaults, FIELD_MANAGER};
use crate::topics::{plan_topics, AdminError, KafkaAdmin, TopicAdmin};

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

fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Runs `f`, counting it, timing it and keeping the per-object backoff.
async fn instrumented<K, F>(obj: &K, ctx: &Context, f: F) -> Result<Action, Error>
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

async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Namespaced + Serialize,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

async fn delete_if_present<K>(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<(), kube::Error>
where
    K: Namespaced,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Patches the status and records the object's state (Ready, Paused) in the metrics.
async fn patch_status<K>(
    ctx: &Context,
    obj: &K,
    status: serde_json::Value,
) -> Result<(), kube::Error>
where
    K: Namespaced,
{
    if let Some(c) = status.get("conditions") {
        let is_true = |t: &str| {
            c.as_array()
                .is_some_and(|a| a.iter().any(|c| c["type"] == t && c["status"] == "True"))
        };
        ctx.metrics
            .record_state(ResourceLabel::of(obj), is_true("Ready"), is_true("Paused"));
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Applies the Deployment and emits Created/Scaled events. Returns the applied object.
async fn apply_deployment<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    ns: &str,
    desired: &Deployment,
) -> Result<Deployment, Error> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    let before = Api::<Deployment>::namespaced(ctx.client.clone(), ns)
        .get_opt(&name)
        .await?;
    let after = apply(&ctx.client, ns, desired).await?;
    let want = desired.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    match before.and_then(|d| d.spec.and_then(|s| s.replicas)) {
        None => {
            ctx.event(
                owner,
                false,
                "Created",
                format!("created Deployment {name} with {want} replicas"),
            )
            .await
        }
        Some(had) if had != want => {
            ctx.event(
                owner,
                false,
                "Scaled",
                format!("scaled Deployment {name} from {had} to {want} replicas"),
            )
            .await
        }
        Some(_) => {}
    }
    Ok(after)
}

fn rollout(dep: &Deployment, want: i32) -> Health {
    let ready = dep
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    if ready >= want {
        Health::Ready
    } else {
        Health::Progressing {
            message: format!("{ready}/{want} pods ready"),
        }
    }
}

fn previous_conditions(status: Option<&[Condition]>) -> Vec<Condition> {
    status.map(|c| c.to_vec()).unwrap_or_default()
}

/// Reconciles one OutboxRelay.
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(kind = "OutboxRelay", namespace = obr.metadata.namespace.as_deref().unwrap_or_default(), name = obr.metadata.name.as_deref().unwrap_or_default(), generation = obr.metadata.generation, trace_id = tracing::field::Empty)
)]
pub async fn reconcile_relay(obr: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    process_kit::trace_id::record_trace_id(&tracing::Span::current());
    let result = instrumented(obr.as_ref(), &ctx, relay_inner(&obr, &ctx)).await;
    if let Err(e) = &result {
        let previous = obr.status.as_ref().map(|s| s.conditions.as_slice());
        surface_forbidden(obr.as_ref(), previous, &ctx, e).await;
    }
    result
}

/// A request the API server refused for want of RBAC rights cannot succeed on retry: it becomes
/// `Ready=False`/`Stalled=True` with reason `Forbidden` and the server's message (which names the verb,
/// resource and namespace), and a Warning event — so a role that lacks a verb shows on the resource.
async fn surface_forbidden<K: Namespaced>(
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
    let health = Health::Stalled {
        reason: "Forbidden".into(),
        message: status.message.clone(),
    };
    let c = conditions::compute(
        &previous_conditions(previous),
        &health,
        obj.meta().generation,
        Timestamp::now(),
    );
    // Best effort: the status itself may be what is forbidden; the event and the log still say it.
    if let Err(e) = patch_status(ctx, obj, json!({ "conditions": c })).await {
        tracing::warn!("cannot write the Forbidden condition: {e}");
    }
    ctx.event(obj, true, "Forbidden", status.message.clone())
        .await;
}

async fn relay_inner(obr: &OutboxRelay, ctx: &Context) -> Result<Action, Error> {
    let ns = obr.namespace().unwrap_or_default();
    let generation = obr.metadata.generation;
    let previous = previous_conditions(obr.status.as_ref().map(|s| s.conditions.as_slice()));
    let now = Timestamp::now();
    if plan::is_paused(obr) {
        let c = conditions::paused(&previous, generation, now);
        patch_status(ctx, obr, json!({ "conditions": c })).await?;
        return Ok(Action::await_change());
    }
    let children = match plan::desired_relay(obr, &ctx.defaults) {
        Ok(c) => c,
        Err(e) => {
            let h = Health::Stalled {
                reason: "InvalidSpec".into(),
                message: e.to_string(),
            };
            let c = conditions::compute(&previous, &h, generation, now);
            patch_status(
                ctx,
                obr,
                json!({ "conditions": c, "observedGeneration": generation }),
            )
            .await?;
            ctx.event(obr, true, "InvalidSpec", e.to_string()).await;
            return Ok(Action::await_change());
        }
    };
    let uses = plan::relay_secret_uses(obr);
    // `admin_props` checks `configSecretRef` against the typed settings as the relay process would (exit 2),
    // so the conflict shows on the resource instead of in a crash-looping pod.
    let secrets = read_secrets(&ctx.client, &ns, &uses)
        .await
        .and_then(|data| admin_props(&obr.spec.kafka, &data).map(|_| data));
    let data = match secrets {
        Ok(d) => d,
        Err(e) => {
            stalled(ctx, obr, &previous, "SecretError", e.to_string()).await?;
            ctx.event(obr, true, "SecretError", e.to_string()).await;
            return Err(e);
        }
    };
    apply(&ctx.client, &ns, &children.service_account).await?;
    apply(&ctx.client, &ns, &children.role).await?;
    apply(&ctx.client, &ns, &children.role_binding).await?;
    let deployment = plan::with_secret_hash(children.deployment, &secret_hash(&data));
    let dep = apply_deployment(ctx, obr, &ns, &deployment).await?;
    apply(&ctx.client, &ns, &children.service).await?;
    let child = plan::relay_child_name(obr);
    match &children.pdb {
        Some(p) => drop(apply(&ctx.client, &ns, p).await?),
        None => delete_if_present::<PodDisruptionBudget>(&ctx.client, &ns, &child).await?,
    }
    let lease = Api::<Lease>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&child)
        .await?
        .and_then(|l| l.spec);
    if let Some(st) = &obr.status {
        ctx.metrics.record_backlog(
            ResourceLabel::of(obr),
            st.backlog,
            st.oldest_pending_age_seconds,
        );
    }
    let health = rollout(&dep, obr.spec.replicas);
    let c = conditions::compute(&previous, &health, generation, now);
    let mut status = json!({ "conditions": c, "observedGeneration": generation });
    if let Some(l) = lease {
        status["leader"] = json!(l.holder_identity);
        status["leaseTransitions"] = json!(l.lease_transitions);
    }
    patch_status(ctx, obr, status).await?;
    Ok(Action::requeue(ctx.refresh))
}

/// Reads every Secret key in `uses` (each Secret once). A missing Secret or key is an [`Error::Secret`]
/// naming the spec field, the Secret and the key.
async fn read_secrets(
    client: &kube::Client,
    ns: &str,
    uses: &[SecretUse],
) -> Result<SecretData, Error> {
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    let mut secrets: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    let mut data = SecretData::new();
    for u in uses {
        if !secrets.contains_key(&u.secret) {
            secrets.insert(u.secret.clone(), api.get_opt(&u.secret).await?);
        }
        let secret = secrets[&u.secret].as_ref().ok_or_else(|| {
            Error::Secret(format!("{}: Secret `{}` not found", u.field, u.secret))
        })?;
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&u.key))
            .ok_or_else(|| {
                Error::Secret(format!(
                    "{}: Secret `{}` has no key `{}`",
                    u.field, u.secret, u.key
                ))
            })?;
        data.insert((u.secret.clone(), u.key.clone()), value.0.clone());
    }
    Ok(data)
}

/// A hash of the data of every key the pods read (SHA-256, hex), for [`plan::with_secret_hash`].
pub fn secret_hash(data: &SecretData) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for ((secret, key), value) in data {
        for part in [secret.as_bytes(), key.as_bytes(), value.as_slice()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
    }
    format!("{:x}", h.finalize())
}

/// The topic admin's librdkafka properties: `kafka.tls`/`kafka.authentication` with the Secret data
/// inline, and the `k=v,k=v` of `kafka.configSecretRef`; a property both set is refused.
fn admin_props(kafka: &KafkaSpec, data: &SecretData) -> Result<Vec<(String, String)>, Error> {
    let typed = connection::admin_properties(kafka, data);
    let Some(r) = &kafka.config_secret_ref else {
        return Ok(typed);
    };
    let raw = data
        .get(&(r.name.clone(), r.key.clone()))
        .cloned()
        .unwrap_or_default();
    let text = String::from_utf8(raw).map_err(|_| {
        Error::Secret(format!(
            "spec.kafka.configSecretRef: key `{}` is not UTF-8",
            r.key
        ))
    })?;
    let mut props = Vec::new();
    for p in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = p.split_once('=').ok_or_else(|| {
            Error::Secret(format!(
                "spec.kafka.configSecretRef: `{p}` is not key=value"
            ))
        })?;
        let k = k.trim().to_owned();
        if typed.iter().any(|(t, _)| *t == k) {
            return Err(Error::Secret(format!(
                "spec.kafka.configSecretRef: `{k}` is also set by spec.kafka.tls/authentication; set it once"
            )));
        }
        props.push((k, v.trim().to_owned()));
    }
    props.extend(typed);
    Ok(props)
}

/// Reconciles one ConsumerGroup.
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(kind = "ConsumerGroup", namespace = cg.metadata.namespace.as_deref().unwrap_or_default(), name = cg.metadata.name.as_deref().unwrap_or_default(), generation = cg.metadata.generation, trace_id = tracing::field::Empty)
)]
pub async fn reconcile_consumer(
    cg: Arc<ConsumerGroup>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    process_kit::trace_id::record_trace_id(&tracing::Span::current());
    let result = instrumented(cg.as_ref(), &ctx, consumer_inner(&cg, &ctx)).await;
    if let Err(e) = &result {
        let previous = cg.status.as_ref().map(|s| s.conditions.as_slice());
        surface_forbidden(cg.as_ref(), previous, &ctx, e).await;
    }
    result
}

fn wants_finalizer(cg: &ConsumerGroup) -> bool {
    cg.spec
        .topics
        .iter()
        .any(|t| t.deletion_policy == DeletionPolicy::Delete)
}

async fn set_finalizer(ctx: &Context, cg: &ConsumerGroup, present: bool) -> Result<(), Error> {
    let mut f: Vec<String> = cg
        .finalizers()
        .iter()
        .filter(|f| *f != TOPIC_FINALIZER)
        .cloned()
        .collect();
    if present {
        f.push(TOPIC_FINALIZER.into());
    }
    let api: Api<ConsumerGroup> =
        Api::namespaced(ctx.client.clone(), &cg.namespace().unwrap_or_default());
    // The resourceVersion makes this a compare-and-swap: a concurrent change to the list is not lost.
    let patch =
        json!({ "metadata": { "finalizers": f, "resourceVersion": cg.resource_version() } });
    api.patch(
        &cg.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn stalled<K: Namespaced>(
    ctx: &Context,
    cg: &K,
    previous: &[Condition],
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let h = Health::Stalled {
        reason: reason.into(),
        message,
    };
    let generation = cg.meta().generation;
    let c = conditions::compute(previous, &h, generation, Timestamp::now());
    patch_status(
        ctx,
        cg,
        json!({ "conditions": c, "observedGeneration": generation }),
    )
    .await?;
    Ok(())
}

async fn consumer_inner(cg: &ConsumerGroup, ctx: &Context) -> Result<Action, Error> {
    let ns = cg.namespace().unwrap_or_default();
    let generation = cg.metadata.generation;
    let previous = previous_conditions(cg.status.as_ref().map(|s| s.conditions.as_slice()));
    let has_finalizer = cg.finalizers().iter().any(|f| f == TOPIC_FINALIZER);
    if cg.metadata.deletion_timestamp.is_some() {
        if has_finalizer {
            let uses = plan::kafka_secret_uses(&cg.spec.kafka);
            let data = read_secrets(&ctx.client, &ns, &uses).await?;
            let props = admin_props(&cg.spec.kafka, &data)?;
            let admin = (ctx.admins)(&cg.spec.kafka.bootstrap, &props)?;
            let others = match &ctx.namespace {
                Some(n) => Api::<ConsumerGroup>::namespaced(ctx.client.clone(), n),
                None => Api::<ConsumerGroup>::all(ctx.client.clone()),
            }
            .list(&Default::default())
            .await?;
            let held = plan::topics_held_by_others(cg, &others.items);
            for t in cg
                .spec
                .topics
                .iter()
                .filter(|t| t.deletion_policy == DeletionPolicy::Delete)
            {
                if let Some(holders) = held.get(&t.name) {
                    ctx.event(
                        cg,
                        false,
                        "TopicKept",
                        format!(
                            "kept topic {} (deletionPolicy: Delete): still listed by ConsumerGroup {}",
                            t.name,
                            holders.join(", ")
                        ),
                    )
                    .await;
                    continue;
                }
                admin.delete(&t.name).await?;
                ctx.event(
                    cg,
                    false,
                    "TopicDeleted",
                    format!("deleted topic {} (deletionPolicy: Delete)", t.name),
                )
                .await;
            }
            set_finalizer(ctx, cg, false).await?;
        }
        return Ok(Action::await_change());
    }
    if plan::is_paused(cg) {
        let c = conditions::paused(&previous, generation, Timestamp::now());
        patch_status(ctx, cg, json!({ "conditions": c })).await?;
        return Ok(Action::await_change());
    }
    if let Err(e) = plan::validate_consumer(cg) {
        stalled(ctx, cg, &previous, "InvalidSpec", e.to_string()).await?;
        ctx.event(cg, true, "InvalidSpec", e.to_string()).await;
        return Ok(Action::await_change());
    }
    if wants_finalizer(cg) != has_finalizer {
        set_finalizer(ctx, cg, !has_finalizer).await?;
    }

    let uses = plan::consumer_secret_uses(cg);
    let secrets = match read_secrets(&ctx.client, &ns, &uses)
        .await
        .and_then(|data| Ok((admin_props(&cg.spec.kafka, &data)?, data)))
    {
        Ok(p) => p,
        Err(e) => {
            stalled(ctx, cg, &previous, "SecretError", e.to_string()).await?;
            ctx.event(cg, true, "SecretError", e.to_string()).await;
            return Err(e);
        }
    };
    let (props, data) = secrets;
    let names: Vec<String> = cg.spec.topics.iter().map(|t| t.name.clone()).collect();
    let topic_result = async {
        let admin = (ctx.admins)(&cg.spec.kafka.bootstrap, &props)?;
        let observed = admin.describe(&names).await?;
        // With autoscaling, the replicas the topics and the Deployment are planned for are the decision's.
        let scaled = match &cg.spec.autoscaling {
            Some(a) => Some(autoscale_decision(cg, a, admin.as_ref(), &names, &observed).await?),
            None => None,
        };
        let mut spec = cg.spec.clone();
        if let Some((d, _)) = &scaled {
            spec.replicas = d.desired;
        }
        let plan = plan_topics(&spec, &observed);
        for t in &plan.create {
            admin.create(t).await?;
            ctx.event(
                cg,
                false,
                "TopicCreated",
                format!("created topic {} with {} partitions", t.name, t.partitions),
            )
            .await;
        }
        for (name, from, to) in &plan.grow {
            admin.grow(name, *to).await?;
            ctx.event(
                cg,
                false,
                "PartitionsIncreased",
                format!("topic {name}: partitions {from} → {to}"),
            )
            .await;
        }
        Ok::<_, AdminError>((admin, plan, scaled))
    }
    .await;
    let (admin, plan, scaled) = match topic_result {
        Ok(x) => x,
        Err(e) => {
            stalled(ctx, cg, &previous, "KafkaError", e.to_string()).await?;
            ctx.event(cg, true, "KafkaError", e.to_string()).await;
            return Err(e.into());
        }
    };
    let autoscaling_status = match &scaled {
        Some((decision, lag)) => Some(apply_autoscaling(ctx, cg, decision, *lag).await?),
        None => None,
    };
    for r in &plan.refused {
        ctx.event(cg, true, "PartitionsRefused", r.to_string())
            .await;
    }
    if let Some((requested, cap)) = plan.capped {
        ctx.event(
            cg,
            true,
            "ScaleCapped",
            format!("{requested} replicas requested but the topics have at most {cap} partitions; running {cap} (partitionPolicy: Cap)"),
        )
        .await;
    }

    // Validated above, before any topic was touched.
    let children = plan::desired_consumer(cg, plan.effective_replicas)?;
    let deployment = plan::with_secret_hash(children.deployment, &secret_hash(&data));
    let dep = apply_deployment(ctx, cg, &ns, &deployment).await?;
    apply(&ctx.client, &ns, &children.service).await?;
    match &children.pdb {
        Some(p) => drop(apply(&ctx.client, &ns, p).await?),
        None => {
            delete_if_present::<PodDisruptionBudget>(
                &ctx.client,
                &ns,
                &plan::consumer_child_name(cg),
            )
            .await?
        }
    }
    let lag = match &scaled {
        Some((_, lag)) => Some(*lag),
        None => match admin.lag(&cg.spec.group_id, &names).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(group = %cg.spec.group_id, "cannot read lag: {e}");
                None
            }
        },
    };
    if let Some(l) = lag {
        ctx.metrics
            .group_lag
            .get_or_create(&crate::metrics::GroupLabel::of(cg))
            .set(l);
    }
    let health = if plan.refused.is_empty() {
        rollout(&dep, plan.effective_replicas)
    } else {
        Health::Stalled {
            reason: "NotSupported".into(),
            message: plan
                .refused
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        }
    };
    let c = conditions::compute(&previous, &health, generation, Timestamp::now());
    let dep_status = dep.status.unwrap_or_default();
    let selector = plan::selector_string(&plan::selector_labels("consumer", &cg.name_any()));
    let partitions: BTreeMap<String, i32> = plan.partitions.clone();
    patch_status(
        ctx,
        cg,
        json!({
            "conditions": c,
            "observedGeneration": generation,
            "replicas": dep_status.replicas.unwrap_or(0),
            "readyReplicas": dep_status.ready_replicas.unwrap_or(0),
            "selector": selector,
            "partitions": partitions,
            "totalPartitions": partitions.values().sum::<i32>(),
            "lag": lag,
            "autoscaling": autoscaling_status,
        }),
    )
    .await?;
    Ok(Action::requeue(match &cg.spec.autoscaling {
        Some(a) => Duration::from_secs(a.poll_interval_seconds.max(1) as u64).min(ctx.refresh),
        None => ctx.refresh,
    }))
}

/// Field manager of the autoscaler's writes to `spec.replicas` (through `/scale`), apart from the
/// reconciler's, so `kubectl get cg -o yaml --show-managed-fields` tells who set the replicas.
pub const AUTOSCALER_FIELD_MANAGER: &str = "outbox-operator-autoscaler";

/// Reads the group's lag and decides its replicas ([`crate::autoscale::decide`]); returns the decision
/// and the lag it used.
async fn autoscale_decision(
    cg: &ConsumerGroup,
    spec: &crate::crd::AutoscalingSpec,
    admin: &dyn TopicAdmin,
    names: &[String],
    observed: &BTreeMap<String, i32>,
) -> Result<(crate::autoscale::Decision, i64), AdminError> {
    let lag = admin.lag(&cg.spec.group_id, names).await?;
    let partitions = cg
        .spec
        .topics
        .iter()
        .map(|t| {
            observed
                .get(&t.name)
                .copied()
                .unwrap_or(0)
                .max(t.partitions)
        })
        .max()
        .unwrap_or(0);
    let status = cg.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    let decision = crate::autoscale::decide(&crate::autoscale::Inputs {
        spec,
        lag,
        partitions,
        grow_partitions: cg.spec.partition_policy == crate::crd::PartitionPolicy::GrowPartitions,
        current: status
            .map(|s| s.desired_replicas)
            .unwrap_or(cg.spec.replicas),
        history: status.map(|s| s.history.as_slice()).unwrap_or_default(),
        now: Timestamp::now().as_second(),
    });
    Ok((decision, lag))
}

/// Carries out a decision: `spec.replicas` through the `/scale` subresource, Events, metrics; returns the
/// `status.autoscaling` to write.
async fn apply_autoscaling(
    ctx: &Context,
    cg: &ConsumerGroup,
    decision: &crate::autoscale::Decision,
    lag: i64,
) -> Result<crate::crd::AutoscalingStatus, Error> {
    let previous = cg.status.as_ref().and_then(|s| s.autoscaling.clone());
    let before = previous
        .as_ref()
        .map(|s| s.desired_replicas)
        .unwrap_or(cg.spec.replicas);
    let label = crate::metrics::GroupLabel::of(cg);
    ctx.metrics
        .desired_replicas
        .get_or_create(&label)
        .set(i64::from(decision.desired));
    ctx.metrics
        .autoscale_decisions
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: decision.reason.as_str().into(),
        })
        .inc();
    if cg.spec.replicas != decision.desired {
        if cg.spec.replicas != before {
            ctx.event(
                cg,
                true,
                "ManualScaleOverwritten",
                format!(
                    "spec.replicas was set to {} by someone else; spec.autoscaling owns it and sets {} (lag {lag})",
                    cg.spec.replicas, decision.desired
                ),
            )
            .await;
        }
        let api: Api<ConsumerGroup> =
            Api::namespaced(ctx.client.clone(), &cg.namespace().unwrap_or_default());
        api.patch_scale(
            &cg.name_any(),
            &PatchParams {
                field_manager: Some(AUTOSCALER_FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(json!({ "spec": { "replicas": decision.desired } })),
        )
        .await?;
    }
    let mut last_scale_time = previous.and_then(|p| p.last_scale_time);
    if decision.desired != before {
        let (reason, verb) = if decision.desired > before {
            ("ScaledUp", "up")
        } else {
            ("ScaledDown", "down")
        };
        ctx.event(
            cg,
            false,
            reason,
            format!(
                "scaled {verb} from {before} to {} replicas (lag {lag}, {})",
                decision.desired,
                decision.reason.as_str()
            ),
        )
        .await;
        last_scale_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::now(),
        ));
    }
    Ok(crate::crd::AutoscalingStatus {
        desired_replicas: decision.desired,
        recommended_replicas: decision.recommended,
        reason: decision.reason.as_str().into(),
        lag,
        last_scale_time,
        history: decision.history.clone(),
    })
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
async fn sweep_state_metrics(ctx: Arc<Context>, namespace: Option<String>) {
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
