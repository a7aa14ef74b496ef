//! The OutboxRelay reconciler: Secrets checked, children applied, the Lease read for `leader` and
//! `leaseTransitions`, status written.

use super::*;

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

pub(super) async fn relay_inner(obr: &OutboxRelay, ctx: &Context) -> Result<Action, Error> {
    let ns = obr.namespace().unwrap_or_default();
    let generation = obr.metadata.generation;
    let previous = previous_conditions(obr.status.as_ref().map(|s| s.conditions.as_slice()));
    let now = Timestamp::now();
    if plan::is_paused(obr) {
        let c = conditions::paused(&previous, generation, now);
        patch_status(ctx, obr, &verdict(c, None)).await?;
        return Ok(Action::await_change());
    }
    let children = match plan::desired_relay(obr, &ctx.defaults) {
        Ok(c) => c,
        Err(e) => {
            let h = Outcome::Stalled {
                reason: "InvalidSpec".into(),
                message: e.to_string(),
            };
            let c = conditions::compute(&previous, &h, generation, now);
            patch_status(ctx, obr, &verdict(c, generation)).await?;
            ctx.event(obr, true, "InvalidSpec", e.to_string()).await;
            return Ok(Action::await_change());
        }
    };
    let uses = plan::relay_secret_uses(obr);
    // `admin_props` checks `configSecretRef` against the typed settings as the relay process would (exit 2),
    // so the conflict shows on the resource instead of in a crash-looping pod.
    let secrets = read_secrets(&ctx.client, &ns, &uses)
        .await
        .and_then(|data| {
            admin_props(
                &obr.spec.kafka,
                &data,
                Some(contract::kafka_guard::Process::Relay),
            )
            .map(|_| data)
        });
    let data = match secrets {
        Ok(d) => d,
        Err(e) => {
            // SecretError, or InvalidSpec for a property the relay would refuse.
            stalled(ctx, obr, &previous, e.reason(), e.to_string()).await?;
            ctx.event(obr, true, e.reason(), e.to_string()).await;
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
    let outcome = rollout(&dep, obr.spec.replicas);
    let c = conditions::compute(&previous, &outcome, generation, now);
    let status = RelayByOperator {
        verdict: verdict(c, generation),
        leader: lease.as_ref().map(|l| l.holder_identity.clone()),
        lease_transitions: lease.as_ref().map(|l| l.lease_transitions),
    };
    patch_status(ctx, obr, &status).await?;
    Ok(Action::requeue(ctx.refresh))
}
