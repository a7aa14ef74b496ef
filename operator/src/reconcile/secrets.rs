//! The Secrets a resource references: read once per reconcile (a missing Secret or key names the spec
//! field), hashed into the pod template, and the Kafka properties the topic admin needs.

use super::*;

/// Reads every Secret key in `uses` (each Secret once). A missing Secret or key is an [`Error::Secret`]
/// naming the spec field, the Secret and the key.
pub(super) async fn read_secrets(
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
pub(super) fn admin_props(
    kafka: &KafkaSpec,
    data: &SecretData,
    guard: Option<contract::kafka_guard::Process>,
) -> Result<Vec<(String, String)>, Error> {
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
        // What the process would refuse at start (exit 2) is refused on the resource.
        if let Some(why) = guard.and_then(|p| contract::kafka_guard::refusal(p, &k, v.trim())) {
            return Err(Error::Spec(crate::plan::SpecError {
                field: "spec.kafka.configSecretRef".into(),
                reason: why,
            }));
        }
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
