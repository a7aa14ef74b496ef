//! Prints, as one multi-document YAML stream, every object the operator would create for the resources in
//! `examples/` — `make check-manifests` validates them against the Kubernetes OpenAPI schemas.

use operator::crd::{ConsumerGroup, OutboxRelay};
use operator::plan::{desired_consumer, desired_relay, Defaults};

fn doc<T: serde::Serialize>(obj: &T) -> String {
    format!("---\n{}", serde_norway::to_string(obj).expect("serializes"))
}

fn main() -> anyhow::Result<()> {
    let defaults = Defaults {
        relay_image: "ghcr.io/outbox-operator/outbox-relay:0.1.0".into(),
    };
    let mut out = String::new();
    let mut paths: Vec<_> = std::fs::read_dir("examples")?.collect::<Result<_, _>>()?;
    paths.sort_by_key(|e| e.path());
    for entry in paths {
        let text = std::fs::read_to_string(entry.path())?;
        let value: serde_json::Value = serde_norway::from_str(&text)?;
        match value["kind"].as_str() {
            Some("OutboxRelay") => {
                let mut cr: OutboxRelay = serde_json::from_value(value)?;
                cr.metadata.namespace = Some("default".into());
                cr.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
                let c = desired_relay(&cr, &defaults)?;
                out += &doc(&c.service_account);
                out += &doc(&c.role);
                out += &doc(&c.role_binding);
                out += &doc(&c.deployment);
                out += &doc(&c.service);
                if let Some(p) = &c.pdb {
                    out += &doc(p);
                }
            }
            Some("ConsumerGroup") => {
                let mut cr: ConsumerGroup = serde_json::from_value(value)?;
                cr.metadata.namespace = Some("default".into());
                cr.metadata.uid = Some("00000000-0000-0000-0000-000000000002".into());
                let replicas = cr.spec.replicas;
                let c = desired_consumer(&cr, replicas)?;
                out += &doc(&c.deployment);
                out += &doc(&c.service);
                if let Some(p) = &c.pdb {
                    out += &doc(p);
                }
            }
            other => anyhow::bail!("{}: unexpected kind {other:?}", entry.path().display()),
        }
    }
    print!("{out}");
    Ok(())
}
