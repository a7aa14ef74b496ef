//! The IO of the election: reads and compare-and-swap writes of one `coordination.k8s.io/v1` Lease, each
//! bounded by the retry period so a hung API server cannot hold a keeper past its renew deadline.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

use crate::elector::{LeaseRecord, Read, Timings, Write, Written};

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

    /// The Lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The identity this client writes as holder.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The timings the Lease is written with.
    pub fn timings(&self) -> Timings {
        self.timings
    }
}
