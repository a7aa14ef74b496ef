//! Writes to the API server: server-side apply under the operator's field manager, deletes of children
//! no longer wanted, status merge patches, and the Deployment apply with its Created/Scaled events.

use super::*;

pub(super) async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<K, kube::Error>
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

pub(super) async fn delete_if_present<K>(
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

/// Patches the operator's status fields (a JSON merge patch of a [`contract::status`] type: fields it
/// leaves out stay as they are) and records the object's state (Ready, Paused) in the metrics.
pub(super) async fn patch_status<K>(
    ctx: &Context,
    obj: &K,
    fields: &impl Serialize,
) -> Result<(), kube::Error>
where
    K: Namespaced,
{
    let patch = contract::status::merge_patch(fields);
    if let Some(c) = patch["status"].get("conditions") {
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
        &Patch::Merge(patch),
    )
    .await?;
    Ok(())
}

/// Applies the Deployment and emits Created/Scaled events. Returns the applied object.
pub(super) async fn apply_deployment<K: Resource<DynamicType = ()>>(
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
