//! The ConsumerGroup reconciler: the topic finalizer, topics through the admin, children applied at the
//! replicas the partition policy allows, lag, autoscaling through `/scale`, status written.

use super::*;
use contract::kafka_guard::Process;

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

pub(super) fn wants_finalizer(cg: &ConsumerGroup) -> bool {
    cg.spec
        .topics
        .iter()
        .any(|t| t.deletion_policy == DeletionPolicy::Delete)
}

// Hand-rolled rather than kube-runtime's `finalizer()`: that helper puts its finalizer on every object it
// sees, while this one is held only by groups with `deletionPolicy: Delete` topics (a group without them
// must delete at once, and removing the last such topic must drop the finalizer) — conditional, which the
// helper does not do.
pub(super) async fn set_finalizer(
    ctx: &Context,
    cg: &ConsumerGroup,
    present: bool,
) -> Result<(), Error> {
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

pub(super) async fn consumer_inner(cg: &ConsumerGroup, ctx: &Context) -> Result<Action, Error> {
    let ns = cg.namespace().unwrap_or_default();
    let generation = cg.metadata.generation;
    let previous = previous_conditions(cg.status.as_ref().map(|s| s.conditions.as_slice()));
    let has_finalizer = cg.finalizers().iter().any(|f| f == TOPIC_FINALIZER);
    if cg.metadata.deletion_timestamp.is_some() {
        if has_finalizer {
            let uses = plan::kafka_secret_uses(&cg.spec.kafka);
            let data = read_secrets(&ctx.client, &ns, &uses).await?;
            // Cleanup runs whatever the properties: a refused one must not keep the finalizer forever.
            let props = admin_props(&cg.spec.kafka, &data, None)?;
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
        patch_status(ctx, cg, &verdict(c, None)).await?;
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
        .and_then(|data| {
            Ok((
                admin_props(&cg.spec.kafka, &data, Some(Process::Consumer))?,
                data,
            ))
        }) {
        Ok(p) => p,
        Err(e) => {
            // SecretError, or InvalidSpec for a property the consumer would refuse.
            stalled(ctx, cg, &previous, e.reason(), e.to_string()).await?;
            ctx.event(cg, true, e.reason(), e.to_string()).await;
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
    let outcome = if plan.refused.is_empty() {
        rollout(&dep, plan.effective_replicas)
    } else {
        Outcome::Stalled {
            reason: "NotSupported".into(),
            message: plan
                .refused
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        }
    };
    let c = conditions::compute(&previous, &outcome, generation, Timestamp::now());
    let dep_status = dep.status.unwrap_or_default();
    let selector = plan::selector_string(&plan::selector_labels("consumer", &cg.name_any()));
    let partitions: BTreeMap<String, i32> = plan.partitions.clone();
    let status = GroupByOperator {
        verdict: verdict(c, generation),
        replicas: dep_status.replicas.unwrap_or(0),
        ready_replicas: dep_status.ready_replicas.unwrap_or(0),
        selector,
        total_partitions: partitions.values().sum::<i32>(),
        partitions,
        lag,
        autoscaling: autoscaling_status,
    };
    patch_status(ctx, cg, &status).await?;
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
pub(super) async fn autoscale_decision(
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
pub(super) async fn apply_autoscaling(
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
